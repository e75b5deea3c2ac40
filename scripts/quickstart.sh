#!/usr/bin/env bash
# Create .venv/, install finetune into it, and fine-tune ResNet-18 on the built-in demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/finetune train --config configs/quickstart.yaml "$@"
