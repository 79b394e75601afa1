#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check pyrepl3_kernel tests benchmarks examples
.venv/bin/ruff format --check pyrepl3_kernel tests benchmarks examples
echo "== mypy"
.venv/bin/mypy pyrepl3_kernel
echo "== pytest"
.venv/bin/python -m pytest "$@"
