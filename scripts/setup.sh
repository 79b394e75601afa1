#!/usr/bin/env bash
# Create .venv (if needed), install pyrepl3-kernel with its dev extras, and
# register the pyrepl3 kernelspec inside the venv. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/pyrepl3-kernel install --sys-prefix >/dev/null
# An editable install does not place data files: put the config that enables
# the jupyter_server extension where a wheel install would.
mkdir -p .venv/etc/jupyter/jupyter_server_config.d
cp jupyter-config/jupyter_server_config.d/pyrepl3_kernel.json .venv/etc/jupyter/jupyter_server_config.d/
echo "setup done: $(.venv/bin/pyrepl3-kernel --version), kernelspec 'pyrepl3' in .venv"
