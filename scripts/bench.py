"""Benchmark: finetune's training engine against the plain loop of the PyTorch fine-tuning tutorial.

    .venv/bin/python scripts/bench.py            # about 15 minutes on 2 cores
    .venv/bin/python scripts/bench.py --rounds 1 --steps 2 --size 64   # a quick smoke run
    .venv/bin/python scripts/bench.py --only resnet18,mobilenet_v3_large   # the rows of these models
    .venv/bin/python scripts/bench.py --all-precisions   # bf16 cases even where bf16 is emulated (slow)

Each loop runs in a process of its own, as a user runs it: the plain loop's under glibc's malloc settings (what a
script run with python gets; ``--plain-malloc reuse`` gives it finetune's), finetune's under the setting its CLI
applies (freed memory kept for the next step: finetune/utils/allocator.py). The parent hands the cases to them one
at a time, so that they run interleaved and never at once (peak memory: the median of three child processes each).
224x224 (or the row's own size), batch 32, ResNet-18 (ResNet-50, MobileNetV3-Large, EfficientNet-B0, RegNetY-400MF
and ConvNeXt-Tiny for a head-only and a full row each, and a full bf16 row where bf16 is native; ResNet-18 at 32 px
for two more) with a 10-class head, on synthetic batches so that image decoding is left out (each side gets its
batch as its own DataLoader delivers it: finetune's collate makes it channels-last; finetune's fast path converts it
when its memory-format rule picks the default layout).
The cases run interleaved, round after round, each after a warm-up step; each round times an epoch of --steps
steps (finetune's loop checks the parameters once an epoch, as in a run; a run's epochs are longer), and the
figures are medians over the rounds of the time per step.

The header names the CPU and the flags that decide its speed. The bf16 cases run only where
``train.precision: auto`` would pick bf16 (native bf16: avx512_bf16 or amx_bf16); elsewhere
bf16 is emulated, several times slower than fp32, and they are skipped with the reason.

The plain loop: the model in train mode, every parameter handed to the optimizer,
``requires_grad=False`` on the frozen ones, fp32, the default memory format.
finetune: the same model and freeze prepared as `finetune train` prepares them (training.setup.prepare), trained
by finetune's own epoch loop (frozen prefix without autograd and in eval mode, the memory format its rule picks,
optional bf16 autocast, the frozen prefix compiled where ``train.compile: auto`` compiles it in a run long enough
to win the compile time back: the head-only and layer4+head rows in fp32; compiling is done before the timing).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The threading `finetune train` runs under (finetune/cli/app.py sets it before torch loads), for both loops.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.config.loading import load_config  # noqa: E402
from finetune.models.arch import get_arch  # noqa: E402
from finetune.models.fastpath import FeatureSource, compile_decision, memory_layout  # noqa: E402
from finetune.models.freeze import set_train_mode  # noqa: E402
from finetune.training.epoch import TrainState, train_one_epoch  # noqa: E402
from finetune.training.setup import prepare  # noqa: E402
from finetune.training.validate import validate  # noqa: E402
from finetune.utils.allocator import keep_freed_memory  # noqa: E402
from finetune.utils.hardware import precision_for, read_cpu  # noqa: E402

CLASSES = 10
BATCH = 32
FREEZES = {
    "head-only": ["head"],
    "layer4+head": ["layer4", "head"],
    "full": ["*"],
}
CASES = [  # (name, freeze, precision, target ratio, architecture, image size: None = --size)
    ("head-only fp32", "head-only", "fp32", 1.7, "resnet18", None),
    ("head-only bf16", "head-only", "bf16", 3.0, "resnet18", None),
    ("layer4+head fp32", "layer4+head", "fp32", None, "resnet18", None),
    ("full fp32", "full", "fp32", 1.25, "resnet18", None),
    ("full bf16", "full", "bf16", 2.4, "resnet18", None),
    ("r50 head-only fp32", "head-only", "fp32", None, "resnet50", None),
    ("r50 full fp32", "full", "fp32", None, "resnet50", None),
    ("mnv3-l head-only fp32", "head-only", "fp32", 1.3, "mobilenet_v3_large", None),
    ("mnv3-l full fp32", "full", "fp32", 1.0, "mobilenet_v3_large", None),
    ("mnv3-l full bf16", "full", "bf16", 1.8, "mobilenet_v3_large", None),
    ("effnet-b0 head-only fp32", "head-only", "fp32", 1.3, "efficientnet_b0", None),
    ("effnet-b0 full fp32", "full", "fp32", 1.0, "efficientnet_b0", None),
    ("effnet-b0 full bf16", "full", "bf16", 1.8, "efficientnet_b0", None),
    ("regnety-400 head-only fp32", "head-only", "fp32", 1.3, "regnet_y_400mf", None),
    ("regnety-400 full fp32", "full", "fp32", 1.0, "regnet_y_400mf", None),
    ("regnety-400 full bf16", "full", "bf16", 1.8, "regnet_y_400mf", None),
    ("convnext-t head-only fp32", "head-only", "fp32", 1.3, "convnext_tiny", None),
    ("convnext-t full fp32", "full", "fp32", 1.0, "convnext_tiny", None),
    ("convnext-t full bf16", "full", "bf16", 1.8, "convnext_tiny", None),
    ("r18@32 head-only fp32", "head-only", "fp32", 1.3, "resnet18", 32),
    ("r18@32 full fp32", "full", "fp32", 1.0, "resnet18", 32),
]


def config_for(freeze: str, precision: str, size: int, arch: str = "resnet18"):
    return load_config(None, [
        f"model.arch={arch}", "model.weights=none", f"model.num_classes={CLASSES}", f"data.image_size={size}",
        f"freeze.trainable={FREEZES[freeze]}", f"train.precision={precision}", f"train.batch_size={BATCH}",
        "freeze.batchnorm=eval", "optim.lr=0.001"])


def plain_step_fn(freeze: str, arch: str = "resnet18", size: int = 224):
    """The tutorial: requires_grad=False on frozen parameters, a new head, model.train(), SGD over all parameters."""
    model = get_arch(arch).build(CLASSES, size)  # torchvision's model, its final Linear replaced
    if freeze != "full":
        head = get_arch(arch).head
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(f"{head}.") or (name.startswith("layer4") and freeze == "layer4+head")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    def steps(x, y, n: int = 1):
        for _ in range(n):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()

    return steps


def prepared(freeze: str, precision: str, size: int, arch: str = "resnet18"):
    """finetune's setup for a case, as `finetune train` prepares it (no data: the batches are synthetic)."""
    config = config_for(freeze, precision, size, arch)
    validate(config)
    return prepare(config)


def finetune_step_fn(freeze: str, precision: str, size: int, arch: str = "resnet18"):
    """One step of finetune's own epoch loop (train_one_epoch) on the given batch, with the frozen prefix compiled
    where ``train.compile: auto`` compiles it for a long run (one whose images win the compile time back)."""
    setup = prepared(freeze, precision, size, arch)
    fast = setup.fast_model(setup.built.plan)
    compiling, _ = compile_decision(setup.config.train.compile, setup.built.arch, setup.precision.precision,
                                    fast.prefix_deterministic, fast.split > 0, math.inf, size)
    if compiling:
        fast.compile_prefix((BATCH, 3, size, size))
        print(f"  {arch} {freeze} {precision} {size} px: frozen prefix compiled in {fast.compile_seconds:.1f} s "
              f"{fast.compile_error}", file=sys.stderr, flush=True)

    def steps(x, y, n: int = 1):  # an epoch of n steps: what the loop does once per epoch is paid once per n
        train_one_epoch(fast, ((fast.features(x), y) for _ in range(n)), setup.loss_fn, setup.optimizer,
                        setup.schedule, TrainState())

    return steps


def timed(steps, x, y, n: int) -> float:
    """Seconds per step of ``n`` steps."""
    start = time.perf_counter()
    steps(x, y, n)
    return (time.perf_counter() - start) / n


def _side(kind: str, cases: list[tuple], steps: int, size: int, malloc: str, conn) -> None:
    """A process running one side's cases ("plain" or "finetune") on request: the name in, the seconds per step out."""
    keep_freed_memory(malloc)
    generator = torch.Generator().manual_seed(0)
    sizes = {case[5] or size for case in cases}
    x = {s: torch.randn(BATCH, 3, s, s, generator=generator) for s in sorted(sizes)}
    y = torch.randint(CLASSES, (BATCH,), generator=generator)
    if kind == "plain":
        plain = dict.fromkeys((arch, freeze, case_size or size) for _, freeze, _, _, arch, case_size in cases)
        runners = {f"plain {arch} {freeze} {s}": (plain_step_fn(freeze, arch, s), x[s]) for arch, freeze, s in plain}
    else:
        runners = {name: (finetune_step_fn(freeze, precision, case_size or size, arch),
                          x[case_size or size].contiguous(memory_format=torch.channels_last))  # as finetune's loader
                   for name, freeze, precision, _, arch, case_size in cases}
    conn.send(list(runners))
    while (name := conn.recv()) is not None:
        step, batch = runners[name]
        timed(step, batch, y, 1)  # warm-up
        conn.send(timed(step, batch, y, steps))  # an epoch of `steps` steps


def throughput(cases: list[tuple], rounds: int, steps: int, size: int, mallocs: dict[str, str]) -> list[tuple]:
    """Images/s of each case and of its plain loop: each side in a process of its own, as a user runs it, under its
    malloc setting (``mallocs``), the cases handed out one at a time, round after round, so that they run
    interleaved and never at once."""
    context = multiprocessing.get_context("spawn")
    sides, processes = {}, []
    for kind, malloc in mallocs.items():  # built one after the other
        conn, child_conn = context.Pipe()
        process = context.Process(target=_side, args=(kind, cases, steps, size, malloc, child_conn))
        process.start()
        sides |= dict.fromkeys(conn.recv(), conn)
        processes += [(process, conn)]
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, conn in sides.items():
            conn.send(name)
            times[name].append(conn.recv())
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    for process, conn in processes:
        conn.send(None)
        process.join()
    speed = {name: BATCH / statistics.median(t) for name, t in times.items()}
    return [(name, speed[f"plain {arch} {freeze} {case_size or size}"], speed[name], target)
            for name, freeze, _, target, arch, case_size in cases]


def cached_epoch(size: int, images: int, run_dir: Path) -> tuple[float, float]:
    """Seconds of a later head-only epoch from the feature cache, and of a plain-loop epoch, over the same data."""
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(images, 3, size, size, generator=generator),
                                          torch.randint(CLASSES, (images,), generator=generator))
    plain = plain_step_fn("head-only")
    start = time.perf_counter()
    for i in range(0, images, BATCH):
        plain(data.tensors[0][i:i + BATCH], data.tensors[1][i:i + BATCH])
    plain_seconds = time.perf_counter() - start

    setup = prepared("head-only", "fp32", size)
    fast = setup.fast_model(setup.built.plan)
    source = FeatureSource(fast, data, BATCH, shuffle=True, seed=0, workers=0, cache_bytes=2**30, folder=run_dir)
    seconds = []
    for epoch in range(3):  # epoch 0 fills the cache
        set_train_mode(setup.model, fast.bn_modes)
        start = time.perf_counter()
        train_one_epoch(fast, source.epoch(epoch), setup.loss_fn, setup.optimizer, setup.schedule,
                        TrainState(epoch=epoch))
        seconds.append(time.perf_counter() - start)
    source.close()
    return statistics.median(seconds[1:]), plain_seconds


def _status_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":"))) / 1024


def _peak_rss_child(kind: str, size: int, steps: int, malloc: str, queue) -> None:
    keep_freed_memory(malloc)
    torch.manual_seed(0)
    y = torch.randint(CLASSES, (BATCH,))
    if kind == "finetune":  # made channels-last from the start, as finetune's collate delivers it: no second copy
        x = torch.randn(BATCH, size, size, 3).permute(0, 3, 1, 2)
    else:
        x = torch.randn(BATCH, 3, size, size)
    step = plain_step_fn("head-only") if kind == "plain" else finetune_step_fn("head-only", "fp32", size)
    before = _status_mib("VmRSS")
    # VmHWM, not ru_maxrss (Linux carries that over from the parent); "5" resets it to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(steps):
        step(x, y)
    queue.put((_status_mib("VmHWM"), _status_mib("VmHWM") - before))


def peak_rss(kind: str, size: int, steps: int, malloc: str) -> tuple[float, float]:
    """Peak RSS (MiB) of a child process training head-only, and how far training took it above its start."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_rss_child, args=(kind, size, steps, malloc, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, default=3, help="steps of the epoch timed per case and round: "
                        "finetune's once-an-epoch work (the parameters' finite check) is paid once per epoch "
                        "(default 3)")
    parser.add_argument("--size", type=int, default=224, help="image size (default 224)")
    parser.add_argument("--cache-images", type=int, default=320, help="images in the cached-epoch comparison")
    parser.add_argument("--no-resnet50", action="store_true", help="leave out the two ResNet-50 rows")
    parser.add_argument("--only", help="only the rows of these models, comma-separated (e.g. resnet18,convnext_tiny)")
    parser.add_argument("--plain-malloc", choices=["default", "reuse"], default="default",
                        help="the plain loop's malloc settings: glibc's (default, what a script run with python "
                        "gets) or reuse, the setting finetune's CLI applies (to see how much of a ratio is the "
                        "allocator's)")
    parser.add_argument("--no-extras", action="store_true", help="skip the feature-cache epoch and peak-memory parts")
    parser.add_argument("--all-precisions", action="store_true",
                        help="run the bf16 cases even where bf16 is not native (emulated: slow)")
    args = parser.parse_args()

    only = set(args.only.split(",")) if args.only else None
    print(f"finetune benchmark: {args.size}x{args.size} (or the row's size), batch {BATCH}, {CLASSES} classes, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"CPU: {read_cpu().describe()}; torch CPU kernels: {torch.backends.cpu.get_cpu_capability()}")
    bf16 = precision_for("auto", "cpu")
    cases = [case for case in CASES if (case[2] != "bf16" or bf16.precision == "bf16" or args.all_precisions)
             and not (args.no_resnet50 and case[4] == "resnet50") and (only is None or case[4] in only)]
    if bf16.precision == "bf16":
        print(f"bf16 cases: run ({bf16.reason})")
    elif args.all_precisions:
        print(f"bf16 cases: run, as --all-precisions asks, although bf16 is emulated here ({bf16.reason})")
    else:
        print(f"bf16 cases: skipped ({bf16.reason}): bf16 is emulated here, several times slower than fp32; "
              "--all-precisions runs them")
    print("malloc: finetune's process keeps freed memory for reuse (as its CLI sets it), the plain loop's process "
          + ("too (--plain-malloc reuse)" if args.plain_malloc == "reuse" else "runs glibc's defaults"))
    mallocs = {"plain": args.plain_malloc, "finetune": "reuse"}  # finetune's: what its CLI sets
    rows = throughput(cases, args.rounds, args.steps, args.size, mallocs)
    print(f"\n{'case':<26} {'plain img/s':>12} {'finetune img/s':>15} {'ratio':>7} {'target':>7}  memory format")
    for (name, plain, fast, target), case in zip(rows, cases):
        goal = f">={target:g}x" if target else "-"
        layout = memory_layout(get_arch(case[4]), case[5] or args.size, case[2], trains_layers=case[1] != "head-only")
        layout = layout.why.split(" (")[0]
        print(f"{name:<26} {plain:>12.1f} {fast:>15.1f} {fast / plain:>6.2f}x {goal:>7}  {layout}")
    if args.no_extras:
        return
    with tempfile.TemporaryDirectory() as folder:
        cached, plain_epoch = cached_epoch(args.size, args.cache_images, Path(folder))
    # interleaved: plain, finetune, plain, ...
    runs = [peak_rss(kind, args.size, 3, mallocs[kind]) for _ in range(3) for kind in ("plain", "finetune")]
    memory = {kind: tuple(statistics.median(run[i] for run in runs[k::2]) for i in (0, 1))
              for k, kind in enumerate(("plain", "finetune"))}
    print(f"\nhead-only epoch of {args.cache_images} images: plain loop {plain_epoch:.2f} s, "
          f"finetune from the feature cache {cached:.3f} s -> {plain_epoch / cached:.0f}x (target >=50x)")
    (plain_peak, plain_training), (fast_peak, fast_training) = memory["plain"], memory["finetune"]
    print(f"peak RSS, head-only training: plain {plain_peak:.0f} MiB, finetune {fast_peak:.0f} MiB "
          f"-> {fast_peak / plain_peak:.2f}x; of which training itself (above the RSS before the first step): "
          f"plain {plain_training:.0f} MiB, finetune {fast_training:.0f} MiB "
          f"-> {fast_training / plain_training:.2f}x (target <=1x)")


if __name__ == "__main__":
    main()
