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
# Debian packages the tests use: headless Chromium (tests/test_browser.py;
# Debian's package, never Playwright's own browser download), bubblewrap (the
# sandbox profile) and openssh-server (the remote-host tests' sshd on
# loopback). Installed only if missing, and only as root with apt-get (CI);
# without them the tests that need them are skipped and say why.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v bwrap >/dev/null || missing+=(bubblewrap)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
    echo "setup: warning: could not install ${missing[*]}; the tests that need them will be skipped" >&2
  fi
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/pyrepl3-kernel install --sys-prefix >/dev/null
# An editable install does not place data files: put the config that enables
# the jupyter_server extension where a wheel install would.
mkdir -p .venv/etc/jupyter/jupyter_server_config.d
cp jupyter-config/jupyter_server_config.d/pyrepl3_kernel.json .venv/etc/jupyter/jupyter_server_config.d/
echo "setup done: $(.venv/bin/pyrepl3-kernel --version), kernelspec 'pyrepl3' in .venv"
