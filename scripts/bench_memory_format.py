"""Benchmark behind the fast path's memory-format rule: channels-last against the default layout, per model and size.

    .venv/bin/python scripts/bench_memory_format.py                      # the families' rows, 32-224 px
    .venv/bin/python scripts/bench_memory_format.py --models resnet18 --sizes 32,224 --rounds 1

For each model and image size it times, in fp32 on synthetic batches of 16, the frozen backbone's forward pass
(no autograd, eval mode: what head-only training and the feature cache pay) and a full training step (forward,
backward, SGD), once with the model and batch channels-last and once in the default (contiguous) layout. The
cases run interleaved, round after round, each after a warm-up; the figures are medians. It prints the ratio
channels-last / contiguous (above 1: channels-last is faster) and the smallest size from which channels-last is
never slower, which is what ``finetune.models.fastpath.CHANNELS_LAST_FROM`` holds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.models.arch import get_arch  # noqa: E402
from finetune.utils.hardware import read_cpu  # noqa: E402

BATCH = 16
MODELS = ("resnet18", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "swin_t")
SIZES = (32, 64, 96, 128, 160, 224)


def runner(kind: str, name: str, size: int, channels_last: bool):
    """The ``features`` or full ``step`` callable of one model in one layout, on one fixed batch."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    arch = get_arch(name)
    x = torch.randn(BATCH, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(10, (BATCH,))
    if kind == "features":
        frozen = arch.build(10, size).eval().to(memory_format=fmt)
        backbone = nn.Sequential(*[module for unit, module in arch.stages(frozen) if unit != arch.head])

        def features():
            with torch.no_grad():
                backbone(x)

        return features
    model = arch.build(10, size).train().to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    def step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def seconds_per_call(fn, steps: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    models, sizes = args.models.split(","), [int(s) for s in args.sizes.split(",")]
    print(f"memory format benchmark: batch {BATCH}, fp32, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads\nCPU: {read_cpu().describe()}; torch CPU kernels: {torch.backends.cpu.get_cpu_capability()}")
    print(f"\n{'model':<20} {'size':>5} {'features cl/contig':>19} {'full step cl/contig':>20}")
    for name in models:
        wins_from = None
        for size in sizes:
            ratio = {}
            for kind in ("features", "step"):  # one kind at a time: the peak memory of two models, not four
                cases = {cl: runner(kind, name, size, cl) for cl in (True, False)}
                times = {cl: [] for cl in cases}
                for _ in range(args.rounds):
                    for cl, fn in cases.items():
                        times[cl] += seconds_per_call(fn, args.steps)
                ratio[kind] = statistics.median(times[False]) / statistics.median(times[True])
            wins = min(ratio.values()) >= 1.0
            wins_from = (wins_from or size) if wins else None
            print(f"{name:<20} {size:>5} {ratio['features']:>18.2f}x {ratio['step']:>19.2f}x", flush=True)
        print(f"{name:<20} channels-last never slower from: {wins_from or 'never'}")


if __name__ == "__main__":
    main()
