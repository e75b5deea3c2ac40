"""Helpers every layer shares, none of them about training itself.

- ``files``: atomic writes and copies, loading torch files with ``weights_only=True``;
- ``hardware``: the CPU (model, instruction flags), the device, what ``train.precision: auto`` becomes;
- ``distributed``: torch.distributed process groups (``Dist``), the torchrun launcher;
- ``seeding``: seeded random draws any thread may make (augmentation in decode threads, mixing);
- ``plots``: the PNG figures (curves, confusion matrix, top losses, lr-find), drawn with matplotlib.
"""
