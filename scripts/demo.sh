#!/usr/bin/env bash
# Set up (scripts/setup.sh), then start a pyrepl3 kernel and show it at work.
# examples/demo.py stops the per-user manager daemon if it started it (a
# daemon that was already running is left running; its last line says which).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/demo.py
