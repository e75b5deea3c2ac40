"""Imbalanced classes on the demo data: balanced accuracy with no remedy, class weights, and the balanced sampler.

Makes a shapes set whose first class has IMBALANCE times the images of the last (train and val alike), trains
the quick-start recipe on it three times (train.class_weights: none / balanced, data.sampler: balanced), evaluates
each run's last.pt on the validation images and prints a Markdown table (with the balanced accuracy of a few
earlier epochs, from metrics.jsonl). Everything goes under one folder.

    .venv/bin/python scripts/imbalance_demo.py [WORK_DIR] [--imbalance 10] [--epochs 12] [--train-per-class 2000]

It uses only the finetune command line, as a user would (about 3 x 100 s on 2 quiet cores with the defaults).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "none": [],
    "train.class_weights: balanced": ["train.class_weights=balanced"],
    "data.sampler: balanced": ["data.sampler=balanced"],
}
EARLY_EPOCHS = (2, 4, 6)  # how fast each remedy gets there, from metrics.jsonl


def finetune(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"finetune {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dir", nargs="?", type=Path, default=REPO / "runs" / "imbalance-demo")
    parser.add_argument("--imbalance", type=float, default=10.0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-per-class", type=int, default=2000, help="images of the first (largest) class")
    parser.add_argument("--val-per-class", type=int, default=400)
    args = parser.parse_args()
    data = args.work_dir / "data"
    if not data.exists():
        print(finetune("make-dataset", "shapes", str(data), "--train-per-class", str(args.train_per_class),
                       "--val-per-class", str(args.val_per_class), "--imbalance", f"{args.imbalance:g}").strip())
    rows = []
    for name, sets in SETTINGS.items():
        run_dir = args.work_dir / ("run-" + name.split(":")[0].replace(".", "-") + ("" if not sets else "-balanced"))
        if not (run_dir / "summary.json").exists():
            overrides = [f"data.root={data}", "data.demo=null", f"train.epochs={args.epochs}", *sets]
            finetune("train", "--config", str(REPO / "configs" / "quickstart.yaml"), "--output-dir", str(run_dir),
                     "--overwrite", "--quiet", *[arg for item in overrides for arg in ("--set", item)])
        report = json.loads(finetune("evaluate", str(run_dir / "last.pt"), "--json"))
        rarest = min(report["per_class"], key=lambda row: row["support"])
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        early = " / ".join(f"{history[e - 1]['val_balanced_acc']:.1%}" for e in EARLY_EPOCHS if e <= len(history))
        rows.append(f"| {name} | {early} | {report['top1']:.1%} | {report['balanced_accuracy']:.1%} | "
                    f"{report['macro_f1']:.1%} | {rarest['recall']:.1%} |")
    classes = ", ".join(f"{row['class']} {row['support']}" for row in report["per_class"])
    print(f"\nvalidation images per class: {classes}; each run evaluated at its last epoch\n")
    print(f"| remedy | balanced accuracy after epoch {' / '.join(map(str, EARLY_EPOCHS))} | accuracy | "
          f"balanced accuracy | macro F1 | recall of {rarest['class']} (rarest) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
