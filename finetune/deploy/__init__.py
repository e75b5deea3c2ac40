"""Trained models out of finetune: loading them, exporting them, and using them.

- ``artifacts``: checkpoints and exported files (ONNX, TorchScript) loaded back, with their preprocessing;
- ``export``: write an export, verified against the checkpoint;
- ``quantize``: int8 ONNX (static quantization), checked for accuracy and timed before it is written;
- ``calibrate``: fit a checkpoint's temperature on its validation split and store it;
- ``inference``: evaluate on labelled images, predict classes;
- ``benchmark``: latency, throughput and preprocessing time of a trained model on this CPU.
- ``tta``: test-time augmentation, the softmax averaged over flipped or cropped views.
"""
