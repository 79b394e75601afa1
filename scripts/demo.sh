#!/usr/bin/env bash
# Set up (scripts/setup.sh), then start a pyrepl3 kernel and show it at work.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/demo.py
