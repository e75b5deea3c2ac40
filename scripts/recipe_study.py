"""Measure the accuracy recipes on a real small data set: final and best validation accuracy over seeds.

On scikit-learn's digits (``python scripts/digits.py DATA``: 1,437 train / 360 val, 32 px, 10 classes), ResNet-18
from random init, the whole network trained, every configuration at the same epoch budget: the defaults, the
defaults without zero-init residual branches, each recipe piece alone, configs/recipe-small-data.yaml, the defaults
in fp32 (auto picks bf16 where it is native) and timm's train.py recipe. Runs go
one after the other, seeds outermost (so a partial study has every configuration), and the results are written
after every run to OUT/results.json and OUT/results.md. Digits are not mirror-symmetric: the augmentation presets
run without flips (data.hflip: 0) and with crops of at least 35% of the image (data.crop_scale: 0.35).

    python scripts/recipe_study.py data/digits runs/recipe-study --epochs 3 --seeds 0 1 2
    python scripts/recipe_study.py data/digits runs/recipe-study-10 --epochs 10 --only default recipe

EMA's smoothness is the standard deviation of the epoch-to-epoch change of val_acc and ema_val_acc in the same runs,
over the whole curve and from epoch 2 on (without the first climb from chance), and how many epochs ended below the
one before (summed over the seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "recipe-small-data.yaml"
BASE = ["model.weights=none", "freeze.default=trainable", "data.image_size=32"]
PRESET = ["data.crop_scale=0.35", "data.hflip=0"]
TIMM = ["optim.schedule=cosine", "train.label_smoothing=0.1", "optim.nesterov=true", "optim.weight_decay=2e-5",
        "optim.no_decay_norm_bias=true"]
CONFIGS = {  # name -> (config file or None for the defaults, --set overrides); in the order they run
    "default": (None, []),
    "recipe": (RECIPE, []),
    "recipe with light crops": (RECIPE, ["data.augment=light"]),  # the file before it dropped the crops
    "recipe without mixing": (RECIPE, ["train.mixup=null", "train.cutmix=null"]),
    "ema": (None, ["train.ema={}"]),
    "light": (None, ["data.augment=light", *PRESET]),
    "mixup 0.2": (None, ["train.mixup=0.2"]),
    "cutmix 1.0": (None, ["train.cutmix=1.0"]),
    "label smoothing 0.1": (None, ["train.label_smoothing=0.1"]),
    "cosine": (None, ["optim.schedule=cosine"]),
    "trivialaugment": (None, ["data.augment=trivialaugment", *PRESET]),
    "random_erasing 0.25": (None, ["data.random_erasing=0.25"]),
    "randaugment": (None, ["data.augment=randaugment", *PRESET]),
    "augmix": (None, ["data.augment=augmix", *PRESET]),
    "no zero-init": (None, ["model.zero_init_residual=false"]),
    "fp32": (None, ["train.precision=fp32"]),  # precision: auto picks bf16 on a CPU with native bf16
    "fp32 + label smoothing 0.1": (None, ["train.precision=fp32", "train.label_smoothing=0.1"]),
    # timm's train.py recipe beside the lr 0.01, momentum 0.9, batch 32 and --warmup-epochs 0: cosine,
    # label smoothing 0.1, Nesterov SGD, weight decay 2e-5 off norm layers and biases (docs/recipes.md)
    "timm recipe": (None, TIMM),
    "timm recipe, no zero-init": (None, [*TIMM, "model.zero_init_residual=false"]),
}


def run_one(name: str, data: Path, out: Path, epochs: int, seed: int) -> dict:
    """Train configuration ``name`` once; its metrics."""
    from finetune.config.loading import load_config
    from finetune.training.reporter import Reporter
    from finetune.training.run import train

    path, sets = CONFIGS[name]
    run_dir = out / f"{name.replace(' ', '_')}-seed{seed}"
    config = load_config(path, [*BASE, *sets, f"data.root={data}", f"train.epochs={epochs}", f"train.seed={seed}"])
    summary = train(config, Reporter(), output_dir=run_dir, overwrite=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"config": name, "seed": seed, "epochs": epochs, "final_val_acc": rows[-1]["val_acc"],
              "best_val_acc": max(row["val_acc"] for row in rows), "served_best": summary["best_val_acc"],
              "best_weights": summary["best_weights"], "val_acc": [row["val_acc"] for row in rows],
              "train_seconds": summary["train_seconds"]}
    if "ema_val_acc" in rows[0]:
        result["ema_val_acc"] = [row["ema_val_acc"] for row in rows]
        result["final_ema_val_acc"] = rows[-1]["ema_val_acc"]
    return result


def jitter(curve: list[float]) -> float:
    """The standard deviation of the epoch-to-epoch change of an accuracy curve."""
    steps = [b - a for a, b in zip(curve, curve[1:])]
    return statistics.pstdev(steps) if len(steps) > 1 else float("nan")


def drops(curve: list[float]) -> int:
    """How many epochs ended below the epoch before them."""
    return sum(b < a for a, b in zip(curve, curve[1:]))


def table(results: list[dict]) -> str:
    """A markdown table: mean, min and max over the seeds of each configuration."""
    lines = ["| config | seeds | final val_acc mean (min-max) | best val_acc mean (min-max) | final EMA val_acc | "
             "std of epoch-to-epoch change: raw / EMA | the same from epoch 2 | drops: raw / EMA | train s per epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        runs = [r for r in results if r["config"] == name]
        if not runs:
            continue
        span = lambda key: (f"{100 * statistics.mean(r[key] for r in runs):.1f}% "  # noqa: E731
                            f"({100 * min(r[key] for r in runs):.1f}-{100 * max(r[key] for r in runs):.1f})")
        ema = span("final_ema_val_acc") if "ema_val_acc" in runs[0] else "-"
        smooth = later = fell = "-"
        if "ema_val_acc" in runs[0]:  # the whole curve; then without its first change, the climb from chance
            sides = [[r[key][start:] for r in runs] for start in (0, 1) for key in ("val_acc", "ema_val_acc")]
            smooth, later = (" / ".join(f"{100 * statistics.mean(map(jitter, curves)):.2f}" for curves in pair)
                             for pair in (sides[:2], sides[2:]))
            fell = " / ".join(str(sum(drops(r[key]) for r in runs)) for key in ("val_acc", "ema_val_acc"))
        per_epoch = statistics.mean(r["train_seconds"] / r["epochs"] for r in runs)
        lines.append(f"| {name} | {len(runs)} | {span('final_val_acc')} | {span('best_val_acc')} | {ema} | {smooth} | "
                     f"{later} | {fell} | {per_epoch:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the digits tree of scripts/digits.py")
    parser.add_argument("out", type=Path, help="folder for the runs and results.json / results.md")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configurations only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["config"], r["seed"]) for r in results}
    for seed in args.seeds:
        for name in args.only or CONFIGS:
            if (name, seed) in done:
                continue
            start = time.perf_counter()
            results.append(run_one(name, args.data.resolve(), args.out, args.epochs, seed))
            print(f"{name} seed {seed}: final {results[-1]['final_val_acc']:.2%} best {results[-1]['best_val_acc']:.2%}"
                  f" ({time.perf_counter() - start:.0f}s)", flush=True)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            (args.out / "results.md").write_text(f"{args.epochs} epochs\n\n" + table(results))
    print(table(results))


if __name__ == "__main__":
    main()
