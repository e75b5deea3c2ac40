"""Trained models out of finetune: loading them, exporting them, and using them.

- ``artifacts``: checkpoints and exported files (ONNX, TorchScript) loaded back, with their preprocessing;
- ``export``: write an export, verified against the checkpoint;
- ``inference``: evaluate on labelled images, predict classes;
- ``tta``: test-time augmentation, the softmax averaged over flipped or cropped views.
"""
