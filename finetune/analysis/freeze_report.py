"""The freeze report: what is frozen, what trains, what the optimizer sees. Data only; render.py prints it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from finetune.config.schema import Config
from finetune.data.folders import data_classes
from finetune.models.build import Built, build
from finetune.training.optim import build_optimizer
from finetune.training.validate import validate
from finetune.utils.hardware import PrecisionChoice, precision_for_config


@dataclass
class GroupRow:
    module: str  # as the architecture groups parameters, e.g. stem, layer1.0 ... layer4.1, fc
    params: int
    trainable_params: int
    state: str  # trainable | frozen | mixed
    batchnorm: str  # train | eval | mixed | - (no BatchNorm)
    lr: str  # the learning rate of its trainable parameters ("-" when frozen, "mixed" when several)
    rule: str


@dataclass
class FreezeReport:
    total_params: int
    trainable_params: int
    frozen_params: int
    optimizer_params: int
    optimizer_tensors: int
    trainable_tensors: int
    epoch: int
    weights: str
    pretrained: bool
    num_classes: int
    precision: str  # what train.precision resolves to here: fp32 | bf16
    precision_reason: str
    parameters: list[dict] = field(default_factory=list)
    batchnorm: list[dict] = field(default_factory=list)
    groups: list[GroupRow] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data["groups"] = [asdict(g) for g in self.groups]
        return data


def build_freeze_report(config: Config, epoch: int = 1) -> FreezeReport:
    """Build the model exactly as ``train`` would for (1-based) ``epoch`` and report on it.

    Reads no image (only the class folders' names, when ``model.num_classes`` is null). Raises FinetuneError for a
    config with problems (see ``validate``).
    """
    validate(config)
    precision = precision_for_config(config)
    classes = data_classes(config) if config.model.num_classes is None else None
    built = build(config, classes, epoch=epoch)
    return freeze_report(built, build_optimizer(built.model, config.optim, built.arch), precision, epoch)


def freeze_report(built: Built, optimizer, precision: PrecisionChoice, epoch: int = 1) -> FreezeReport:
    """Summarise ``built``'s freeze state and check it against what ``optimizer`` holds."""
    params = list(built.model.named_parameters())
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    rows = [{"name": n, "shape": list(p.shape), "numel": p.numel(), "trainable": p.requires_grad,
             "rule": built.plan[n].rule, "lr": lr_of.get(id(p))} for n, p in params]
    trainable = sum(r["numel"] for r in rows if r["trainable"])
    total = sum(r["numel"] for r in rows)
    return FreezeReport(
        total_params=total,
        trainable_params=trainable,
        frozen_params=total - trainable,
        optimizer_params=sum(p.numel() for p in in_optimizer),
        optimizer_tensors=len(in_optimizer),
        trainable_tensors=sum(r["trainable"] for r in rows),
        epoch=epoch,
        weights=built.weights.source,
        pretrained=built.weights.pretrained,
        num_classes=built.num_classes,
        precision=precision.precision,
        precision_reason=precision.reason,
        parameters=rows,
        batchnorm=[{"module": m, "mode": mode} for m, mode in built.bn_modes.items()],
        groups=_group_rows(rows, built.bn_modes, built.arch.group),
    )


def _group_rows(rows: list[dict], bn_modes: dict[str, str], group_of) -> list[GroupRow]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(group_of(row["name"]), []).append(row)
    result = []
    for name, members in groups.items():
        flags = {r["trainable"] for r in members}
        modes = {mode for module, mode in bn_modes.items() if group_of(module) == name}
        rules = list(dict.fromkeys(r["rule"] for r in members))
        result.append(GroupRow(
            module=name,
            params=sum(r["numel"] for r in members),
            trainable_params=sum(r["numel"] for r in members if r["trainable"]),
            state="mixed" if len(flags) > 1 else ("trainable" if flags.pop() else "frozen"),
            batchnorm=modes.pop() if len(modes) == 1 else ("mixed" if modes else "-"),
            lr=_lr_text({r["lr"] for r in members if r["lr"] is not None}),
            rule=rules[0] if len(rules) == 1 else "; ".join(rules),
        ))
    return result


def _lr_text(rates: set) -> str:
    return f"{rates.pop():.3g}" if len(rates) == 1 else ("mixed" if rates else "-")
