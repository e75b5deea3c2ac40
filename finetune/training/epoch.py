"""The training step and the epoch: :func:`train_step` (one optimizer step, also lr-find's), :func:`train_one_epoch`
and :func:`evaluate`, with :class:`TrainState`, where a run is."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.models.fastpath import FastModel
from finetune.training.metrics import confusion_matrix, correct_count, top_k_hits
from finetune.training.optim import Schedule
from finetune.utils.distributed import Dist


@dataclass
class TrainState:
    """Where a run is: completed epochs, steps done in the current one, and the metrics so far."""
    epoch: int = 0
    step: int = 0
    seen: int = 0  # training images seen in the current epoch, and their summed loss and correct count
    loss_sum: float = 0.0
    correct: float = 0.0  # soft targets (MixUp/CutMix) count a share of an image: metrics.correct_count
    seconds: float = 0.0  # training time spent in the current epoch
    grad_norm_sum: float = 0.0  # of the global gradient norm (before clipping) over the epoch's steps
    frozen_checksums: dict[str, str] = field(default_factory=dict)  # taken when the run started
    history: list[dict] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_val_acc: float = -1.0  # the best score: val_acc, or val_map for model.task multilabel (summary.score_key),
    # of the weights the best epoch's checkpoint serves
    serves: str = "raw"  # the weights the last epoch's checkpoints serve: "raw" or "ema" (train.ema.use_for)
    best_serves: str = "raw"  # and those of the best epoch's
    total_seconds: float = 0.0
    monitor_best: Optional[float] = None  # early stopping: the best monitored value and epochs since it
    epochs_without_improvement: int = 0
    stopped: Optional[str] = None  # "early_stopping" or "time_limit" when the run ended before train.epochs

    def next_epoch(self) -> None:
        self.epoch, self.step, self.seen, self.loss_sum, self.correct = self.epoch + 1, 0, 0, 0.0, 0.0
        self.seconds = self.grad_norm_sum = 0.0


@dataclass
class Updated:
    """The tensors a step changes, which must stay finite: the trainable parameters (``named``) and the running
    statistics of BatchNorm layers in train mode (``buffers``)."""
    named: list[tuple[str, nn.Parameter]]
    buffers: list[tuple[str, torch.Tensor]]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    @classmethod
    def of(cls, model: nn.Module) -> "Updated":
        """What a step changes in ``model`` as it is now (its requires_grad flags and train/eval modes)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()
                   and model.get_submodule(n.rsplit(".", 1)[0]).training]
        return cls(named, buffers)


@dataclass
class Step:
    """What one :func:`train_step` did."""
    loss: float
    grad_norm: float  # the global gradient norm, before clipping
    logits: torch.Tensor
    targets: torch.Tensor  # on the model's device
    problem: Optional[str] = None  # why the step failed: a non-finite loss or gradient (no update was made), or
    # non-finite values after the update


def train_step(fast: FastModel, features: torch.Tensor, targets: torch.Tensor, loss_fn, optimizer, updated: Updated,
               *, grad_clip: Optional[float] = None) -> Step:
    """One optimizer step of the trainable part of ``fast`` on a batch of prefix features and their targets.

    Forward, backward, the global gradient norm (gradients clipped to ``grad_clip`` when set), the update. A
    non-finite loss or gradient leaves the weights as they were; :attr:`Step.problem` says what went wrong.
    """
    targets = targets.to(fast.device, non_blocking=True)
    logits = fast.head(features)
    loss = loss_fn(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in updated.params if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(updated.params, grad_clip)
    value = loss.item()
    if not math.isfinite(value) or not torch.isfinite(norm):
        culprit = next((n for n, p in fast.model.named_parameters()
                        if p.grad is not None and not torch.isfinite(p.grad).all()), None)
        return Step(value, norm.item(), logits, targets, f"the loss is {value}; first parameter with a non-finite "
                                                         f"gradient: {culprit or 'none (the loss itself overflowed)'}")
    optimizer.step()
    # BatchNorm statistics blown up by huge activations (their variance overflows while the normalised output and
    # the loss stay finite). The parameters are checked once per epoch (train_one_epoch): a pass over all of them
    # cost 7% of a ResNet-18 step at 32 px, and a parameter an update made non-finite also makes the next step's
    # loss non-finite, which stops training before that step updates anything.
    broken = first_non_finite(updated.buffers)
    problem = f"non-finite values in {broken} after the update" if broken else None
    return Step(value, norm.item(), logits, targets, problem)


def first_non_finite(named: list[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first tensor holding a NaN or an infinity, or None.

    One norm over all of them first: it is not finite when a value is not (nor when finite values overflow it,
    which the exact check then tells apart). On a CPU ``torch.isfinite`` makes several passes and a bool tensor: on
    every tensor of ResNet-18, 0.7 s a step against 6 ms for the norms (torch 2.14, 2-core AVX2 EPYC).
    """
    if not named or torch.isfinite(torch.nn.utils.get_total_norm([t for _, t in named])):
        return None
    return next((name for name, t in named if not torch.isfinite(t).all()), None)


def train_one_epoch(fast: FastModel, batches, loss_fn, optimizer, schedule: Schedule, state: TrainState, *,
                    grad_clip: Optional[float] = None, should_stop: Callable[[], bool] = lambda: False,
                    on_step: Callable[[TrainState], None] = lambda state: None, multilabel: bool = False) -> bool:
    """Train the trainable part of ``fast`` over (prefix features, targets) ``batches``, counting into ``state``.

    Targets are class indices, soft targets (MixUp/CutMix) or, for a ``multilabel`` model, multi-hot rows (mixed
    or not); ``on_step`` runs after each step (the weight EMA follows the weights there).

    Returns False when ``should_stop()`` said so after a step (the epoch is unfinished).
    Raises FinetuneError (exit code 1) when the loss, a gradient or an updated tensor is not finite.
    """
    updated = Updated.of(fast.model)
    tick = time.perf_counter()
    for features, targets in batches:
        step = train_step(fast, features, targets, loss_fn, optimizer, updated, grad_clip=grad_clip)
        if step.problem:
            raise _diverged(f"epoch {state.epoch + 1}, step {state.step + 1}: {step.problem}", optimizer)
        schedule.step()
        state.step += 1
        state.seen += len(step.targets)
        state.grad_norm_sum += step.grad_norm
        state.loss_sum += step.loss * len(step.targets)
        state.correct += correct_count(step.logits, step.targets, multilabel)
        now = time.perf_counter()
        state.seconds += now - tick
        tick = now
        on_step(state)
        if should_stop():  # under DDP every process agrees, so all stop at the same step
            _check_parameters(updated, state, optimizer)
            return False
    _check_parameters(updated, state, optimizer)
    return True


def _check_parameters(updated: Updated, state: TrainState, optimizer) -> None:
    """Before the weights are validated or saved: raise if an update left a trainable parameter non-finite (a
    finite but huge update; any other non-finite parameter would have made the next step's loss non-finite)."""
    broken = first_non_finite(updated.named)
    if broken:
        raise _diverged(f"epoch {state.epoch + 1}, by step {state.step}: non-finite values in {broken} after an "
                        "update", optimizer)


@torch.no_grad()  # not inference_mode: a compiled frozen prefix (train.compile) serves no_grad batches only
def evaluate(fast: FastModel, batches, loss_fn, num_classes: int, size: int, dist: Dist = Dist()) -> dict:
    """Loss, top-1 and top-5 accuracy, the confusion matrix and per-sample results in eval mode over
    (features, targets, sample indices) batches of a split of ``size`` samples.

    ``samples`` maps target, predicted, prob (of the predicted class) and loss (cross-entropy, unsmoothed) to a
    tensor indexed by sample, NaN for samples not evaluated (unreadable images skipped). Under DDP each process
    evaluates its shard and the sums are combined.
    """
    fast.model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    table, counts = torch.zeros(size, 4, dtype=torch.float64), torch.zeros(size, 1, dtype=torch.float64)
    loss_sum, top5, seen = 0.0, 0, 0
    for features, targets, indices in batches:
        logits = fast.head(features).cpu()
        loss_sum += loss_fn(logits, targets).item() * len(targets)
        top5 += top_k_hits(logits, targets).sum().item()
        predicted = logits.argmax(1)
        confusion += confusion_matrix(targets, predicted, num_classes)
        prob = logits.softmax(1).gather(1, predicted[:, None])[:, 0]
        table[indices] = torch.stack([targets, predicted, prob,
                                      nn.functional.cross_entropy(logits, targets, reduction="none")], 1).double()
        counts[indices] = 1
        seen += len(targets)
    loss_sum, top5, seen = dist.sum([loss_sum, top5, seen])
    confusion = dist.sum_tensor(confusion)
    table = dist.sum_tensor(table) / dist.sum_tensor(counts)  # a sample two processes held (padding) counts once
    samples = dict(zip(("target", "predicted", "prob", "loss"), table.T))
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan"), "top5": float("nan"), "confusion": confusion, "n": 0,
                "samples": samples}
    return {"loss": loss_sum / seen, "acc": confusion.diagonal().sum().item() / seen, "top5": top5 / seen,
            "confusion": confusion, "n": seen, "samples": samples}


def _diverged(what: str, optimizer) -> FinetuneError:
    return FinetuneError(
        f"Training diverged at {what}.\n"
        f"Lower optim.lr (now {optimizer.defaults['lr']}) or set optim.grad_clip (e.g. --set optim.grad_clip=1.0).",
        exit_code=1)
