#!/usr/bin/env bash
# Run the whole test suite, creating .venv/ first if it is missing. Extra arguments go to pytest.
# The tests run in one process per core (pytest-xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n auto "$@"
