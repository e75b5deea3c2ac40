"""Training: the run and its epoch loop, and what it needs and writes.

- ``run``: a run's setup, state and epoch loop (``train``, ``fit``, ``train_one_epoch``, ``evaluate``);
- ``optim``: SGD param groups, per-layer learning rates, the schedule;
- ``losses``: the training loss, class weights and balanced sampling;
- ``ema``: the weight EMA (``train.ema``) and which weights a checkpoint serves;
- ``metrics``: confusion matrix, top-k, balanced accuracy, macro F1;
- ``checkpoint``: last.pt / best.pt and RNG states;
- ``rundir``: the run directory, what a resume may change, the run files;
- ``distributed``: torch.distributed process groups and the torchrun launcher;
- ``reporter``: the interface through which a run reports progress (the CLI implements it).
"""
