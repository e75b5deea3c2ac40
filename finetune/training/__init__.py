"""Training: one validation, one setup, the run and its epoch loop, and what they need and write.

- ``validate``: every problem of a config, reported at once, before any work;
- ``setup``: ``prepare(config)`` -> what a training step needs (train, lr-find, inspect-grads and the benchmark use it);
- ``run``: a run's state and its epoch loop (``train``, ``fit``, ``Run``);
- ``epoch``: the training step (``train_step``), ``train_one_epoch`` and ``evaluate``;
- ``stopping``: early stopping, the time limit, signals; ``resume``: continuing from last.pt;
- ``summary``: the epoch rows and summary.json; ``rng``: the run's own random stream;
- ``optim``: SGD or AdamW param groups, per-layer learning rates, the schedule;
- ``losses``: the training loss, class weights and balanced sampling;
- ``multilabel``: the binary loss, per-label thresholds, mAP, F1 and exact match of ``model.task: multilabel``;
- ``ema``: the weight EMA (``train.ema``) and which weights a checkpoint serves;
- ``metrics``: confusion matrix, top-k, balanced accuracy, macro F1;
- ``calibration``: temperature scaling of the logits, fitted on validation (``train.calibrate``);
- ``checkpoint``: last.pt / best.pt and their format; ``rundir``: the run directory and the files a run writes;
- ``reporter``: the interface through which a run reports progress (the CLI implements it);
- ``tracking``: status.json and the trackers ``train.loggers`` names (TensorBoard, MLflow), beside the reporter.
"""
