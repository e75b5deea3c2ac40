"""Benchmark: what TensorBoard logging costs a head-only run that trains from the feature cache.

    .venv/bin/python scripts/bench_tracking.py                 # about 5 minutes on 2 idle cores
    .venv/bin/python scripts/bench_tracking.py --rounds 1 --train-per-class 20 --epochs 2 --size 64  # a smoke run

The run: the shapes demo set (4 classes, --train-per-class training and 50 validation images each, 64 px drawn,
--size px trained), ResNet-18 from random weights with only fc trainable, so that the first epoch computes the
frozen prefix's features once and every later epoch trains the head from the feature cache: the fastest kind of
run finetune has, so the one where logging weighs most. The same config runs with train.loggers [] and
[tensorboard] (every step logged: train.log_every_steps 1, the most logging there is), in turns, round after round,
each in a fresh process (so TensorBoard's import is paid each time, as by a user). A figure is the time of the
`train()` call, wall and CPU; the table gives the median and the spread (min-max) of each, and the ratio of the
medians. On a shared machine that ratio is as noisy as the spread, so each run also measures the time spent inside
the run's Tracking calls (start, every step, every epoch, before each checkpoint, the end: status.json, the event
files, the end images), which is what logging adds, as a share of that run's own time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {"no loggers": "[]", "tensorboard": "[tensorboard]"}


def child(config_path: str, loggers: str, output_dir: str) -> None:
    """One run, timed: prints the wall and CPU seconds of the train() call and of the Tracking calls in it."""
    from finetune.config.loading import load_config
    from finetune.training.reporter import Reporter
    from finetune.training.run import train
    from finetune.training.tracking import Tracking

    inside = {"tracking_wall": 0.0, "tracking_cpu": 0.0}

    def timed(method):
        def call(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()  # the writer thread's own work is left out
            try:
                return method(*args, **kwargs)
            finally:
                inside["tracking_wall"] += time.perf_counter() - wall
                inside["tracking_cpu"] += time.thread_time() - cpu
        return call

    for name in ("step", "epoch", "checkpoint", "finish", "__exit__"):
        setattr(Tracking, name, timed(getattr(Tracking, name)))
    Tracking.start = classmethod(timed(Tracking.start.__func__))
    config = load_config(config_path, [f"train.loggers={loggers}", f"train.output_dir={output_dir}"])
    wall, cpu = time.perf_counter(), time.process_time()
    summary = train(config, Reporter(), overwrite=True)
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                      "val_acc": summary["final_val_acc"], **inside}))


def write_config(folder: Path, args) -> Path:
    from finetune.data.demo import make_shapes

    data = folder / "shapes"
    make_shapes(data, classes=4, train_per_class=args.train_per_class, val_per_class=50, image_size=64, seed=0)
    path = folder / "config.yaml"
    path.write_text(f"""model: {{arch: resnet18, weights: none}}
data: {{root: {data}, image_size: {args.size}}}
freeze: {{trainable: [fc]}}
train: {{epochs: {args.epochs}, batch_size: 32, precision: fp32, cache_features: "on", log_every_steps: 1}}
""")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each case (default 5)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    parser.add_argument("--train-per-class", type=int, default=250, help="training images per class (default 250)")
    parser.add_argument("--size", type=int, default=160, help="image size trained (default 160)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from finetune.utils.hardware import read_cpu

    print(f"CPU: {read_cpu().describe()}")
    print(f"run: ResNet-18 head-only from the feature cache, {4 * args.train_per_class} training + 200 validation "
          f"images at {args.size} px, {args.epochs} epochs, batch 32, fp32; {args.rounds} rounds")
    times: dict[str, list[dict]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="bench_tracking.") as tmp:
        config = write_config(Path(tmp), args)
        for round_ in range(args.rounds):
            order = list(CASES) if round_ % 2 == 0 else list(reversed(CASES))  # neither side always goes first
            for case in order:
                done = subprocess.run([sys.executable, __file__, "--child", str(config), CASES[case],
                                       str(Path(tmp) / "run")], capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{case} failed:\n{done.stderr}")
                times[case].append(json.loads(done.stdout.splitlines()[-1]))
                run = times[case][-1]
                print(f"  round {round_ + 1} {case:12s} wall {run['wall']:6.2f}s  cpu {run['cpu']:6.2f}s  "
                      f"in tracking: wall {run['tracking_wall']:.3f}s cpu {run['tracking_cpu']:.3f}s", flush=True)
    print(f"\n{'case':14s}{'wall median':>12s}{'wall min-max':>16s}{'cpu median':>12s}{'cpu min-max':>16s}"
          f"{'tracking share of wall, min-max':>34s}")
    for case, runs in times.items():
        walls, cpus = [r["wall"] for r in runs], [r["cpu"] for r in runs]
        shares = [r["tracking_wall"] / r["wall"] for r in runs]
        print(f"{case:14s}{statistics.median(walls):11.2f}s{min(walls):8.2f}-{max(walls):.2f}s"
              f"{statistics.median(cpus):11.2f}s{min(cpus):8.2f}-{max(cpus):.2f}s"
              f"{statistics.median(shares):18.2%} {min(shares):.2%}-{max(shares):.2%}")
    off, on = (statistics.median(r["wall"] for r in times[case]) for case in CASES)
    off_cpu, on_cpu = (statistics.median(r["cpu"] for r in times[case]) for case in CASES)
    print(f"tensorboard / no loggers: wall {on / off:.3f}x ({on - off:+.2f}s), cpu {on_cpu / off_cpu:.3f}x "
          f"({on_cpu - off_cpu:+.2f}s)")


if __name__ == "__main__":
    main()
