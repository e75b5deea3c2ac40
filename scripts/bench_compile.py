"""How much torch.compile speeds up a frozen prefix: the numbers behind ``train.compile: auto``.

    .venv/bin/python scripts/bench_compile.py resnet18 convnext_tiny --size 32
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) .venv/bin/python scripts/bench_compile.py resnet18 --size 224   # cold

For each model: its head-only frozen prefix exactly as `finetune train` runs it (training.setup.prepare; BatchNorm
folded, the memory format its rule picks), fp32, random weights, timed eagerly and then compiled as `train` compiles
it (inductor with freezing; the compile time is that of the first call: with inductor's on-disk cache cold, as in a
fresh machine, or warm from an earlier run), the two interleaved, the median of --rounds calls each. The output of
the compiled prefix is compared with the eager one. fastpath.COMPILE_GAIN holds what this measured at 32 and 224 px.
The process keeps freed memory for reuse, as finetune's CLI sets it (finetune/utils/allocator.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import prepared  # noqa: E402  (scripts/bench.py, beside this script)

from finetune.utils.allocator import keep_freed_memory  # noqa: E402
from finetune.utils.hardware import read_cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    keep_freed_memory()
    print(f"CPU: {read_cpu().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.size} px, batch {args.batch}, fp32")
    for name in args.models:
        setup = prepared("head-only", "fp32", args.size, name)  # bench.py's setup of its head-only rows
        fast = setup.fast_model(setup.built.plan)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        eager_run, eager_out = fast.prefix_run, fast.features(x)
        fast.compile_prefix(tuple(x.shape))
        if fast.compile_error:
            print(f"{name}: torch.compile failed: {fast.compile_error}")
            continue
        compiled_run, compiled_out = fast.prefix_run, fast.features(x)
        times = {"eager": [], "compiled": []}
        for _ in range(args.rounds):  # interleaved: the machine's drift touches both alike
            for kind, run in (("eager", eager_run), ("compiled", compiled_run)):
                fast.prefix_run = run
                began = time.perf_counter()
                fast.features(x)
                times[kind].append(time.perf_counter() - began)
        eager, compiled = (args.batch / statistics.median(times[kind]) for kind in ("eager", "compiled"))
        difference = ((compiled_out - eager_out).abs().max() / eager_out.abs().max()).item()
        print(f"{name}: eager {eager:.1f} img/s, compiled {compiled:.1f} img/s -> {compiled / eager:.2f}x; "
              f"compile {fast.compile_seconds:.1f} s; largest difference {difference:.1e} of the largest output",
              flush=True)


if __name__ == "__main__":
    main()
