"""The gradient checks behind ``finetune inspect-grads``.

The model is prepared exactly as ``train`` prepares it (``training.setup.prepare``). It takes N real batches (or one
random batch when ``data.root`` is not set), and backward accumulates their mean
gradient. Then five checks run:

1. frozen parameters have ``grad is None``: autograd never touched them;
2. trainable parameters have finite, non-zero gradients (and finite values: CPU kernels
   may swallow a NaN weight in the forward pass, so its gradient alone can look fine),
   except inside residual branches that start at zero (``model.zero_init_residual``):
   no gradient reaches those until the branch's last BatchNorm weight moves;
3. the head's gradient equals the closed form of softmax cross-entropy:
   dL/dW = (softmax(z) - q)^T h / B and dL/db = mean(softmax(z) - q), with q the
   (label-smoothed) targets - one-hot, or the soft targets of MixUp/CutMix when
   ``train.mixup``/``train.cutmix`` mix the batches as training does - and h the
   features entering the head (the final ``Linear`` the architecture description
   names: ``fc``, ``classifier.3``...); for ``model.task: multilabel``, of binary
   cross-entropy averaged over the B x C logits: dL/dz = (sigmoid(z) - q) / (B C),
   q the (smoothed, and mixed when training mixes) multi-hot targets;
4. float64 finite differences agree with autograd: ``torch.autograd.gradcheck`` on
   the head, and central differences along a random direction per trainable
   module group of the whole network (dropout and stochastic depth draw the same
   numbers in every forward pass: the loss is one function of the weights; the frozen
   prefix, the same in every pass, runs once; residual branches that start at zero get
   a last BatchNorm weight of ``FD_BRANCH_WEIGHT`` there: a zero branch leaves ReLUs
   exactly at their kink, where no finite difference agrees with any gradient);
5. one SGD step on a copy leaves frozen parameters and frozen BatchNorm buffers
   bit-identical and moves every trainable parameter.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.data.loaders import make_loader
from finetune.data.mixing import Mixer
from finetune.models.build import Built
from finetune.models.fastpath import frozen_prefix_length
from finetune.models.freeze import frozen_tensors, set_train_mode
from finetune.training.losses import validation_loss
from finetune.training.multilabel import binary_targets
from finetune.training.optim import build_optimizer
from finetune.training.setup import Setup, prepare
from finetune.training.validate import validate

HEAD_TOLERANCE = 1e-5  # max |autograd - closed form|, relative to max |closed form| (float32 sums)
FD_TOLERANCE = 1e-4  # relative error of float64 central differences
# ReLU and max-pool kinks make a step that crosses one disagree; a real autograd bug disagrees at every step.
FD_STEPS = (1e-6, 1e-7, 1e-8)
FD_SAMPLES = 4  # images in the float64 slice
FD_BRANCH_WEIGHT = 0.01


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class GradReport:
    data: str  # where the batches came from
    checks: list[Check] = field(default_factory=list)
    parameters: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_json(self) -> dict:
        return {"passed": self.passed, "data": self.data, "checks": [asdict(c) for c in self.checks],
                "parameters": self.parameters}


def inspect_grads(config: Config, batches: int = 1, epoch: int = 1) -> GradReport:
    """Prepare the model as ``train`` does for (1-based) ``epoch``, run ``batches`` batches forward and backward,
    and check the gradients. Raises FinetuneError for a config with problems (see ``validate``)."""
    validate(config)
    setup = prepare(config, epoch=epoch)
    images, targets, source = _batches(setup, batches)
    return check_gradients(setup.built, images, targets, config, source)


def check_gradients(built: Built, images: list[torch.Tensor], targets: list[torch.Tensor], config: Config,
                    source: str = "given batches") -> GradReport:
    """Run the batches through ``built.model`` (accumulating the mean gradient) and check it."""
    model = built.model
    before = {name: t.detach().clone() for name, t in frozen_tensors(model, built.plan, built.bn_modes).items()}
    start = copy.deepcopy(model)  # the weights the finite differences are taken at
    set_train_mode(model, built.bn_modes)
    features: list[torch.Tensor] = []
    hook = model.get_submodule(built.arch.head).register_forward_hook(
        lambda module, inputs, output: features.append(inputs[0].detach()))
    smoothing = config.train.label_smoothing
    loss_fn = validation_loss(config)  # the training loss without class weights
    logits = []
    try:
        for x, y in zip(images, targets):
            out = model(x)
            loss = loss_fn(out, y) / len(images)
            loss.backward()
            logits.append(out.detach())
    finally:
        hook.remove()

    report = GradReport(source)
    report.parameters = _parameter_rows(model, built)
    report.checks = [
        _frozen_untouched(model, built),
        _trainable_finite(model, built),
        _head_closed_form(model, built, features, logits, targets, smoothing, config.model.task == "multilabel"),
        _finite_differences(start, built, torch.cat(images)[:FD_SAMPLES], torch.cat(targets)[:FD_SAMPLES],
                            features, loss_fn),
        _one_step(model, built, before, config),
    ]
    return report


def _batches(setup: Setup, count: int):
    """Batches of (images, targets), mixed as the first batches of training are when MixUp/CutMix is on."""
    images, targets, source = _unmixed_batches(setup, count)
    mixer = Mixer.from_config(setup.config.train, setup.built.num_classes)
    if mixer is None:
        return images, targets, source
    mixed = [mixer(x, y, epoch=0, batch=i) for i, (x, y) in enumerate(zip(images, targets))]
    return [x for x, _ in mixed], [y for _, y in mixed], f"{source}, mixed by MixUp/CutMix (soft targets)"


def _unmixed_batches(setup: Setup, count: int):
    config = setup.config
    generator = torch.Generator().manual_seed(config.train.seed)
    if setup.data is None:
        size, batch = config.data.image_size, config.train.batch_size
        images = [torch.randn(batch, 3, size, size, generator=generator)]
        targets = [torch.randint(2, (batch, setup.built.num_classes), generator=generator).float()
                   if config.model.task == "multilabel"
                   else torch.randint(setup.built.num_classes, (batch,), generator=generator)]
        return images, targets, (f"one random batch of {batch} images at {size}x{size} "
                                 "(data.root is not set)")
    loader = make_loader(setup.data.train, config.train.batch_size, shuffle=True, seed=config.train.seed, epoch=0)
    images, targets = [], []
    for x, y in loader:
        images.append(x)
        targets.append(y)
        if len(images) == count:
            break
    return images, targets, (f"{len(images)} batch(es) of up to {config.train.batch_size} training images "
                             f"from {config.data.root}")


def _parameter_rows(model: nn.Module, built: Built) -> list[dict]:
    rows = []
    for name, p in model.named_parameters():
        grad = p.grad
        rows.append({"name": name, "module": built.arch.group(name), "trainable": built.plan[name].trainable,
                     "grad_norm": None if grad is None else grad.norm().item(),
                     "max_abs_grad": None if grad is None else grad.abs().max().item(),
                     "finite": True if grad is None else bool(torch.isfinite(grad).all())})
    return rows


def _frozen_untouched(model: nn.Module, built: Built) -> Check:
    frozen = [n for n, _ in model.named_parameters() if not built.plan[n].trainable]
    touched = [n for n, p in model.named_parameters() if not built.plan[n].trainable and p.grad is not None]
    if touched:
        return Check("frozen parameters have no gradient", False,
                     f"{len(touched)} of {len(frozen)} frozen tensors received a gradient: {', '.join(touched[:5])}")
    return Check("frozen parameters have no gradient", True, f"all {len(frozen)} frozen tensors have grad None")


def _trainable_finite(model: nn.Module, built: Built) -> Check:
    problems = []
    trainable = [(n, p) for n, p in model.named_parameters() if built.plan[n].trainable]
    silent = built.arch.silent_parameters(model)
    for name, p in trainable:
        if not torch.isfinite(p).all():
            problems.append(f"{name}: non-finite values in the parameter itself")
        elif p.grad is None:
            problems.append(f"{name}: no gradient")
        elif not torch.isfinite(p.grad).all():
            problems.append(f"{name}: non-finite gradient")
        elif not p.grad.any() and name not in silent:
            problems.append(f"{name}: all-zero gradient")
    if problems:
        return Check("trainable gradients are finite and non-zero", False,
                     f"{len(problems)} of {len(trainable)}: {'; '.join(problems[:5])}")
    quiet = sum(name in silent for name, _ in trainable)
    why = (f" ({quiet} of them zero: inside residual branches that start at zero, model.zero_init_residual, "
           "until their last BatchNorm weight moves)") if quiet else ""
    return Check("trainable gradients are finite and non-zero", True,
                 f"all {len(trainable)} trainable tensors have finite{'' if quiet else ', non-zero'} gradients{why}")


def _head_closed_form(model, built: Built, features, logits, targets, smoothing: float, binary: bool) -> Check:
    name = f"head gradient equals the {'sigmoid binary' if binary else 'softmax'} cross-entropy closed form"
    head = model.get_submodule(built.arch.head)
    if head.weight.grad is None and head.bias.grad is None:
        return Check(name, True, f"skipped: the head ({built.arch.head}) is frozen")
    expected_w, expected_b = _closed_form(features, logits, targets, smoothing, head.out_features, binary)
    errors = []
    for label, grad, expected in (("weight", head.weight.grad, expected_w), ("bias", head.bias.grad, expected_b)):
        if grad is None:
            continue
        scale = expected.abs().max().item() or 1.0
        errors.append((label, ((grad.double() - expected).abs().max().item()) / scale))
    worst = max(e for _, e in errors)
    detail = ", ".join(f"{label}: max rel. error {e:.2e}" for label, e in errors)
    passed = math.isfinite(worst) and worst <= HEAD_TOLERANCE
    return Check(name, passed, f"{detail} (tolerance {HEAD_TOLERANCE:.0e})")


def _closed_form(features, logits, targets, smoothing: float, classes: int, binary: bool):
    """dL/dW and dL/db of the mean over batches of mean cross-entropy (``binary``: of binary cross-entropy averaged
    over every logit), in float64."""
    grad_w = torch.zeros(classes, features[0].shape[1], dtype=torch.float64)
    grad_b = torch.zeros(classes, dtype=torch.float64)
    for h, z, y in zip(features, logits, targets):
        if binary:
            delta = (z.double().sigmoid() - binary_targets(y.double(), smoothing)) / y.numel() / len(features)
        else:  # class indices, or the soft targets of MixUp/CutMix
            hard = y if y.dim() == 2 else nn.functional.one_hot(y, classes)
            q = hard.double() * (1 - smoothing) + smoothing / classes
            delta = (z.double().softmax(1) - q) / len(y) / len(features)
        grad_w += delta.T @ h.double()
        grad_b += delta.sum(0)
    return grad_w, grad_b


def _finite_differences(start: nn.Module, built: Built, x, y, features, loss_fn) -> Check:
    name = "float64 finite differences agree with autograd"
    model = start.double()
    set_train_mode(model, built.bn_modes)
    zero_branches = built.arch.zero_branches(model)
    with torch.no_grad():
        for block, last in zero_branches:
            model.get_submodule(f"{block}.{last}").weight.fill_(FD_BRANCH_WEIGHT)
    x, y = x.double(), y.double() if y.is_floating_point() else y  # soft targets match the float64 logits
    loss_of = _loss_after_prefix(model, built, x, y, loss_fn)
    details, passed = [], True
    head_name = built.arch.head
    if any(built.plan[f"{head_name}.{p}"].trainable for p in ("weight", "bias")):
        h = features[0][:FD_SAMPLES].double()
        head = model.get_submodule(head_name)
        w = head.weight.detach().clone().requires_grad_(True)
        b = head.bias.detach().clone().requires_grad_(True)
        head_ok = torch.autograd.gradcheck(
            lambda w, b: loss_fn(h @ w.T + b, y), (w, b),
            eps=FD_STEPS[0], atol=1e-7, rtol=FD_TOLERANCE, raise_exception=False, fast_mode=True)
        passed &= head_ok
        details.append(f"gradcheck({head_name}): {'ok' if head_ok else 'MISMATCH'}")

    trainable = {n: p for n, p in model.named_parameters() if built.plan[n].trainable}
    if not trainable:
        return Check(name, False, "no trainable parameters")
    model.zero_grad(set_to_none=True)
    with _frozen_bn_buffers(model):
        loss_of().backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in trainable.items()}
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}
    for n in trainable:
        groups.setdefault(built.arch.group(n), []).append(n)
    worst = 0.0
    with torch.no_grad(), _frozen_bn_buffers(model):
        for group, names in groups.items():
            direction = {n: torch.randn(trainable[n].shape, generator=generator, dtype=torch.float64) for n in names}
            norm = math.sqrt(sum(d.pow(2).sum().item() for d in direction.values()))
            analytic = sum((grads[n] * direction[n]).sum().item() for n in names) / norm
            errors = []
            for step in FD_STEPS:
                numeric = _central_difference(loss_of, trainable, direction, norm, step)
                error = abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-10)
                errors.append(error if math.isfinite(error) else math.inf)
                if errors[-1] <= FD_TOLERANCE:
                    break  # a smaller step only matters where this one crossed a kink
            worst = max(worst, min(errors))
    passed &= worst <= FD_TOLERANCE
    details.append(f"directional derivatives on {len(groups)} module group(s) of {len(x)} images: "
                   f"max rel. error {worst:.2e} (best of steps {', '.join(f'{h:.0e}' for h in FD_STEPS)}; "
                   f"tolerance {FD_TOLERANCE:.0e})"
                   + (f"; {len(zero_branches)} zero-started residual branches at last BatchNorm weight "
                      f"{FD_BRANCH_WEIGHT:g}" if zero_branches else ""))
    return Check(name, passed, "; ".join(details))


def _loss_after_prefix(model: nn.Module, built: Built, x, y, loss_fn):
    """The loss as a function of the trainable weights: the frozen prefix, the same in every pass, runs once."""
    chain = built.arch.stages(model)
    split = frozen_prefix_length(chain, built.plan)
    with torch.no_grad(), _frozen_bn_buffers(model):
        prefix_out = x
        for _, module in chain[:split]:
            prefix_out = module(prefix_out)

    def loss_of():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same dropout masks in every pass
            out = prefix_out
            for _, module in chain[split:]:
                out = module(out)
            return loss_fn(out, y)
    return loss_of


def _central_difference(loss_of, params: dict, direction: dict, norm: float, step: float) -> float:
    """(L(p + step*d) - L(p - step*d)) / 2 step, along the unit direction d = direction / norm."""
    def shifted(sign: float) -> float:
        for n, d in direction.items():
            params[n].add_(d, alpha=sign * step / norm)
        value = loss_of().item()
        for n, d in direction.items():
            params[n].sub_(d, alpha=sign * step / norm)
        return value

    return (shifted(1.0) - shifted(-1.0)) / (2 * step)


@contextlib.contextmanager
def _frozen_bn_buffers(model: nn.Module):
    """Restore BatchNorm buffers afterwards: the repeated float64 forwards must not drift them."""
    saved = {n: b.clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


def _one_step(model: nn.Module, built: Built, before: dict, config: Config) -> Check:
    name = "one SGD step moves trainable parameters only"
    drifted = [n for n, t in frozen_tensors(model, built.plan, built.bn_modes).items() if not torch.equal(t, before[n])]
    stepped = copy.deepcopy(model)
    for source, target in zip(model.parameters(), stepped.parameters()):
        target.grad = None if source.grad is None else source.grad.clone()
    initial = {n: p.detach().clone() for n, p in stepped.named_parameters()}
    optimizer = build_optimizer(stepped, config.optim, built.arch)
    optimizer.step()
    changed_frozen = [n for n, t in frozen_tensors(stepped, built.plan, built.bn_modes).items()
                      if not torch.equal(t, before[n])]
    # No gradient reaches these yet: SGD leaves them as they are (but for weight decay).
    silent = {n for n in built.arch.silent_parameters(model) if built.plan[n].trainable}
    unmoved = [n for n, p in stepped.named_parameters()
               if built.plan[n].trainable and n not in silent and torch.equal(p, initial[n])]
    # A gradient so small that learning rate x gradient is below float32 resolution moves nothing either: the signal
    # vanishes before these tensors (random weights behind eval-mode BatchNorm can shrink activations to 1e-13).
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    params = dict(stepped.named_parameters())
    vanishing = [n for n in unmoved if _update_below_resolution(params[n], initial[n], rates.get(id(params[n])))]
    unmoved = [n for n in unmoved if n not in vanishing]
    problems = []
    if drifted:
        problems.append(f"forward passes changed frozen tensors: {', '.join(drifted[:5])}")
    if changed_frozen:
        problems.append(f"the step changed frozen tensors: {', '.join(changed_frozen[:5])}")
    if unmoved:
        problems.append(f"trainable tensors did not move: {', '.join(unmoved[:5])}")
    frozen_count = len(before)
    trainable_count = sum(built.plan[n].trainable for n, _ in model.named_parameters())
    if problems:
        return Check(name, False, "; ".join(problems))
    still = len(silent) + len(vanishing)
    moved = f"all {trainable_count}" if not still else f"{trainable_count - still} of {trainable_count}"
    detail = (f"{frozen_count} frozen tensors (parameters and eval-mode BatchNorm buffers) bit-identical; {moved} "
              "trainable tensors moved")
    if vanishing:
        largest = max(params[n].grad.abs().max().item() for n in vanishing)
        detail += (f"; {len(vanishing)} did not, as their gradients (at most {largest:.1e}) times the learning rate "
                   "are below float32 resolution: the signal reaching them is that small (random weights, or a "
                   f"layer scale near 0 as ConvNeXt's starts): {', '.join(vanishing[:3])}")
    return Check(name, True, detail)


def _update_below_resolution(param: torch.Tensor, initial: torch.Tensor, lr: Optional[float]) -> bool:
    """Whether a step of ``lr`` x gradient (twice that, for Nesterov momentum's first step) rounds back to the
    float32 weights everywhere."""
    if lr is None or param.grad is None:
        return False
    update = 2 * lr * param.grad.double()
    return torch.equal((initial.double() - update).to(initial.dtype), initial)
