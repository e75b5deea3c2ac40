"""Freezing rules -> a per-parameter plan, applying it, and BatchNorm modes.

Rules are glob patterns over parameter names (``layer4.*``, ``fc.weight``). A
pattern also matches everything below a module name, so ``layer4`` means
``layer4.*``. Precedence: the most specific matching pattern wins, where
specificity is the number of literal (non-wildcard) characters; on a tie,
``freeze.frozen`` wins over ``freeze.trainable``. A parameter no pattern
matches takes ``freeze.default``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable

from finetune.errors import Problem


@dataclass(frozen=True)
class Decision:
    trainable: bool
    rule: str  # e.g. "trainable: layer4.*" or "default: frozen"


def matches(pattern: str, name: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def specificity(pattern: str) -> int:
    """Literal characters in a pattern: ``layer4`` and ``layer4.*`` score 6; ``[34]`` counts as a wildcard."""
    pattern = re.sub(r"\[[^\]]*\]", "", pattern.removesuffix(".*"))
    return sum(ch not in "*?" for ch in pattern)


def plan_freeze(names: Iterable[str], freeze, epoch: int = 1) -> dict[str, Decision]:
    """Decide, for each parameter name, whether it trains in (1-based) ``epoch`` and which rule decided.

    ``freeze`` is the ``freeze`` section of the config; its stages that start by
    ``epoch`` add their patterns to ``freeze.trainable``. Patterns are checked by
    :func:`problems`.
    """
    rules = [(p, False, "frozen") for p in freeze.frozen] + [(p, True, "trainable") for p in freeze.trainable]
    rules += [(p, True, f"stage@{stage.epoch}") for stage in freeze.stages if stage.epoch <= epoch
              for p in stage.trainable]
    plan = {}
    for name in names:
        best = None
        for pattern, trainable, kind in rules:
            if matches(pattern, name):
                rank = (specificity(pattern), not trainable)  # ties go to frozen
                if best is None or rank > best[0]:
                    best = (rank, Decision(trainable, f"{kind}: {pattern}"))
        plan[name] = best[1] if best else Decision(freeze.default == "trainable", f"default: {freeze.default}")
    return plan


def problems(names: list[str], freeze, epochs: int) -> list[Problem]:
    """Freeze rules that cannot work for a model with parameters ``names`` trained for ``epochs``: patterns that
    match no parameter (with the closest names), stages that never start, and rules that leave nothing to train."""
    candidates = sorted(set(names) | {n.rsplit(".", i)[0] for n in names for i in range(1, n.count(".") + 1)})
    keyed = [(f"freeze.{kind}[{i}]", p) for kind in ("trainable", "frozen")
             for i, p in enumerate(getattr(freeze, kind))]
    keyed += [(f"freeze.stages[{s}].trainable[{i}]", p) for s, stage in enumerate(freeze.stages)
              for i, p in enumerate(stage.trainable)]
    found = []
    for key, pattern in keyed:
        if not any(matches(pattern, n) for n in names):
            close = difflib.get_close_matches(pattern.rstrip(".*"), candidates, n=3, cutoff=0.5)
            hint = f"closest names: {', '.join(close)}" if close else "run `finetune freeze-report` to list names"
            found.append(Problem(key, f"pattern {pattern!r} matches no parameter; {hint}"))
    found += [Problem(f"freeze.stages[{i}].epoch", f"is {stage.epoch} but train.epochs is {epochs}: the stage would "
                                                   "never start") for i, stage in enumerate(freeze.stages)
              if stage.epoch > epochs]
    if not found and not any(decision.trainable for decision in plan_freeze(names, freeze).values()):
        found.append(_nothing_to_train(freeze))
    return found


def _nothing_to_train(freeze) -> Problem:
    rules = f"freeze.trainable is {freeze.trainable}"
    if freeze.frozen:
        rules += f", freeze.frozen is {freeze.frozen}"
    return Problem("freeze.trainable", f"no parameter is trainable ({rules} and freeze.default is "
                                       f"{freeze.default!r}), so there is nothing to train. Add patterns to "
                                       "freeze.trainable (e.g. [fc] for the head only) or set freeze.default: "
                                       "trainable")


def apply_plan(model, plan: dict[str, Decision]) -> None:
    """Set ``requires_grad`` on every parameter of ``model`` as ``plan`` says."""
    for name, param in model.named_parameters():
        param.requires_grad_(plan[name].trainable)


def batchnorm_modes(model, plan: dict[str, Decision], policy: str) -> dict[str, str]:
    """The mode ('train' or 'eval') each BatchNorm layer runs in while training.

    With policy 'eval', a BatchNorm layer whose parameters are all frozen runs in
    eval mode, so its running statistics never change; with 'train' every
    BatchNorm layer updates its statistics, as in the usual tutorials.
    """
    from torch import nn

    modes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = all(not plan[f"{name}.{p}"].trainable for p, _ in module.named_parameters())
            modes[name] = "eval" if policy == "eval" and frozen else "train"
    return modes


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
        if mode == "eval":
            module = model.get_submodule(module_name)
            tensors.update({f"{module_name}.{b}": t for b, t in module.named_buffers()})
    return tensors
