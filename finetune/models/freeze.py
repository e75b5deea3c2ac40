"""Freezing rules -> a per-parameter plan, applying it, and BatchNorm modes.

Rules are glob patterns over parameter names (``layer4.*``, ``fc.weight``). A
pattern also matches everything below a module name, so ``layer4`` means
``layer4.*``; ``head`` names the model's new head in every family (``fc``,
``classifier.3``, ``heads.head``...). Precedence: the most specific matching pattern
wins, where specificity is the number of literal (non-wildcard) characters of the
pattern as resolved; on a tie, ``freeze.frozen`` wins over ``freeze.trainable``. A
parameter no pattern matches takes ``freeze.default``.

Frozen means inference mode: a frozen BatchNorm layer keeps its running statistics,
and dropout and stochastic depth are off inside frozen blocks, so a frozen block is
a fixed function of its input (what the feature cache relies on).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable

from finetune.config.schema import HEAD
from finetune.errors import Problem


@dataclass(frozen=True)
class Decision:
    trainable: bool
    rule: str  # e.g. "trainable: layer4.*" or "default: frozen"


def matches(pattern: str, name: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def resolve(pattern: str, head: str) -> str:
    """``head`` (and ``head.weight``, ``head.*``...) stands for the model's head module ``head``."""
    if pattern == HEAD or pattern.startswith(HEAD + "."):
        return head + pattern[len(HEAD):]
    return pattern


def specificity(pattern: str) -> int:
    """Literal characters in a pattern: ``layer4`` and ``layer4.*`` score 6; ``[34]`` counts as a wildcard."""
    pattern = re.sub(r"\[[^\]]*\]", "", pattern.removesuffix(".*"))
    return sum(ch not in "*?" for ch in pattern)


def plan_freeze(names: Iterable[str], freeze, epoch: int = 1, *, head: str) -> dict[str, Decision]:
    """Decide, for each parameter name, whether it trains in (1-based) ``epoch`` and which rule decided.

    ``freeze`` is the ``freeze`` section of the config; its stages that start by
    ``epoch`` add their patterns to ``freeze.trainable``. ``head`` is the model's head
    module (what the pattern ``head`` means). Patterns are checked by :func:`problems`.
    """
    rules = [(p, False, "frozen") for p in freeze.frozen] + [(p, True, "trainable") for p in freeze.trainable]
    rules += [(p, True, f"stage@{stage.epoch}") for stage in freeze.stages if stage.epoch <= epoch
              for p in stage.trainable]
    plan = {}
    for name in names:
        best = None
        for pattern, trainable, kind in rules:
            resolved = resolve(pattern, head)
            if matches(resolved, name):
                rank = (specificity(resolved), not trainable)  # ties go to frozen
                if best is None or rank > best[0]:
                    best = (rank, Decision(trainable, f"{kind}: {pattern}"))
        plan[name] = best[1] if best else Decision(freeze.default == "trainable", f"default: {freeze.default}")
    return plan


def problems(names: list[str], freeze, epochs: int, *, head: str, stages: str = "") -> list[Problem]:
    """Freeze rules that cannot work for a model with parameters ``names`` and head module ``head`` trained for
    ``epochs``: patterns that match no parameter (with the closest names and ``stages``, what the model's parts are
    called, e.g. for a pattern made for another family), stages that never start, and rules that leave nothing to
    train."""
    candidates = sorted(set(names) | {n.rsplit(".", i)[0] for n in names for i in range(1, n.count(".") + 1)})
    keyed = [(f"freeze.{kind}[{i}]", p) for kind in ("trainable", "frozen")
             for i, p in enumerate(getattr(freeze, kind))]
    keyed += [(f"freeze.stages[{s}].trainable[{i}]", p) for s, stage in enumerate(freeze.stages)
              for i, p in enumerate(stage.trainable)]
    found = []
    for key, pattern in keyed:
        if not any(matches(resolve(pattern, head), n) for n in names):
            close = difflib.get_close_matches(pattern.rstrip(".*"), candidates, n=3, cutoff=0.5)
            hint = f"closest names: {', '.join(close)}" if close else "run `finetune freeze-report` to list names"
            found.append(Problem(key, f"pattern {pattern!r} matches no parameter; {hint}{stages}"))
    found += [Problem(f"freeze.stages[{i}].epoch", f"is {stage.epoch} but train.epochs is {epochs}: the stage would "
                                                   "never start") for i, stage in enumerate(freeze.stages)
              if stage.epoch > epochs]
    if not found and not any(decision.trainable for decision in plan_freeze(names, freeze, head=head).values()):
        found.append(_nothing_to_train(freeze))
    return found


def _nothing_to_train(freeze) -> Problem:
    rules = f"freeze.trainable is {freeze.trainable}"
    if freeze.frozen:
        rules += f", freeze.frozen is {freeze.frozen}"
    return Problem("freeze.trainable", f"no parameter is trainable ({rules} and freeze.default is "
                                       f"{freeze.default!r}), so there is nothing to train. Add patterns to "
                                       "freeze.trainable (e.g. [head] for the head only) or set freeze.default: "
                                       "trainable")


def apply_plan(model, plan: dict[str, Decision]) -> None:
    """Set ``requires_grad`` on every parameter of ``model`` as ``plan`` says."""
    for name, param in model.named_parameters():
        param.requires_grad_(plan[name].trainable)


def batchnorm_modes(model, plan: dict[str, Decision], policy: str) -> dict[str, str]:
    """The mode ('train' or 'eval') each BatchNorm layer, and each dropout and stochastic depth layer, runs in
    while training.

    With policy 'eval' (``freeze.batchnorm``), a BatchNorm layer whose parameters are all frozen runs in eval
    mode, so its running statistics never change; a dropout or stochastic depth layer runs in eval mode (off)
    when the block it sits in (its nearest enclosing module with parameters) is all frozen. With 'train' every
    such layer runs in train mode, as in the usual tutorials.
    """
    modes = {}
    for name, module in model.named_modules():
        if is_batchnorm(module):
            owner = name
        elif is_random(module):
            owner = _enclosing_with_parameters(model, name)
        else:
            continue
        params = [f"{owner}.{p}" if owner else p for p, _ in model.get_submodule(owner).named_parameters()]
        frozen = all(not plan[p].trainable for p in params)
        modes[name] = "eval" if policy == "eval" and frozen else "train"
    return modes


def is_batchnorm(module) -> bool:
    from torch import nn

    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_random(module) -> bool:
    """A layer that draws random numbers in train mode: dropout (p > 0) or stochastic depth (p > 0)."""
    from torch import nn
    from torchvision.ops import StochasticDepth

    return isinstance(module, (nn.modules.dropout._DropoutNd, StochasticDepth)) and module.p > 0


def _enclosing_with_parameters(model, name: str) -> str:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:end])
        if any(True for _ in model.get_submodule(owner).parameters()):
            return owner
    return ""


def set_train_mode(model, bn_modes: dict[str, str]) -> None:
    """``model.train()``, then put the BatchNorm layers that stay frozen back in eval mode."""
    model.train()
    for name, module in model.named_modules():
        if bn_modes.get(name) == "eval":
            module.eval()


def frozen_tensors(model, plan: dict[str, Decision], bn_modes: dict[str, str]) -> dict:
    """Every tensor training must leave bit-identical: frozen parameters and the buffers of eval-mode BatchNorm."""
    tensors = {name: p for name, p in model.named_parameters() if not plan[name].trainable}
    for module_name, mode in bn_modes.items():
        if mode == "eval":  # dropout and stochastic depth have no buffers
            module = model.get_submodule(module_name)
            tensors.update({f"{module_name}.{b}": t for b, t in module.named_buffers()})
    return tensors
