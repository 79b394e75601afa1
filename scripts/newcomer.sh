#!/usr/bin/env bash
# What a newcomer does with this project, checked end to end (issue 18's proof):
#
#  1. a fresh `git clone` of this repository (its committed HEAD) into a
#     temporary directory, and a fresh, empty HOME for everything below;
#  2. the README's two commands there: `bash scripts/demo.sh`, then
#     `bash scripts/test.sh` (its output must carry no setuptools notice, no
#     traceback; the demo must leave no process behind);
#  3. a non-editable `pip install .` into a second venv, then
#     `pyrepl3-kernel install --user`, `jupyter kernelspec list` (no warning),
#     one cell through jupyter_client, `pyrepl3-kernel gateway --help`, and
#     `pyrepl3-kernel gateway` without jupyter_server (a one-line error);
#  4. at the end, no process of this run may be left: the script waits
#     NEWCOMER_GRACE_S seconds (default 30), then lists what is left, ends it
#     and fails.
#
# Usage: bash scripts/newcomer.sh
#   NEWCOMER_PYTEST_ARGS="tests/test_cli.py -q"  arguments for scripts/test.sh's
#                         pytest (default: none, the whole suite, 6+ minutes)
#   NEWCOMER_KEEP=1       keep the temporary directory (default: removed)
#   PYTHON=python3.12     the Python the venvs are made with (as scripts/setup.sh)
# Exit code 0 if every step passed; the first failing step ends the run.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
GRACE=${NEWCOMER_GRACE_S:-30}
read -r -a PYTEST_ARGS <<<"${NEWCOMER_PYTEST_ARGS:-}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyrepl3-newcomer.XXXXXX")
NEWHOME=$WORK/home
CLONE=$WORK/pyrepl3-kernel
VENV2=$WORK/venv2
mkdir -p "$NEWHOME"

step() { printf '\n== %s\n' "$*"; }
fail() {
  printf 'newcomer: FAILED: %s\n' "$*" >&2
  exit 1
}

# Every step runs as a newcomer's shell would: a fresh HOME, and nothing of
# this shell's Jupyter, IPython, XDG or virtualenv settings.
as_newcomer() {
  env -u JUPYTER_PATH -u JUPYTER_DATA_DIR -u JUPYTER_CONFIG_DIR -u JUPYTER_RUNTIME_DIR \
    -u JUPYTER_PREFER_ENV_PATH -u JUPYTER_PLATFORM_DIRS -u IPYTHONDIR -u PYTHONPATH \
    -u VIRTUAL_ENV -u XDG_DATA_HOME -u XDG_CONFIG_HOME -u XDG_RUNTIME_DIR -u XDG_CACHE_HOME \
    -u PYREPL3_CHECKPOINT_DIR -u PYREPL3_TRANSACTION_POLICY \
    HOME="$NEWHOME" "$@"
}

# The processes of this run: every step runs with HOME=$NEWHOME, and
# processes inherit it (the manager daemon, its workers, what cells start).
our_processes() {
  local pid
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    [ "$pid" = "$$" ] && continue
    if grep -qszxF "HOME=$NEWHOME" "/proc/$pid/environ"; then
      echo "$pid"
    fi
  done
}

# Wait up to $1 seconds for every process of this run to exit; if some are
# left, list them, end them (by pid) and fail with $2.
expect_no_processes() {
  local grace=$1 what=$2 left="" deadline=$((SECONDS + $1))
  while :; do
    left=$(our_processes)
    [ -z "$left" ] && return 0
    [ "$SECONDS" -ge "$deadline" ] && break
    sleep 1
  done
  echo "left running $grace s after $what:" >&2
  # shellcheck disable=SC2086
  ps -o pid,ppid,etime,args -p "$(echo $left | tr ' ' ,)" >&2 || true
  # shellcheck disable=SC2086
  kill -TERM $left 2>/dev/null || true
  sleep 2
  left=$(our_processes)
  # shellcheck disable=SC2086
  [ -n "$left" ] && kill -KILL $left 2>/dev/null || true
  fail "processes left running after $what"
}

cleanup() {
  local rc=$?
  local left
  left=$(our_processes)
  # shellcheck disable=SC2086
  [ -n "$left" ] && kill -KILL $left 2>/dev/null || true
  if [ "${NEWCOMER_KEEP:-}" = 1 ] || [ "$rc" != 0 ]; then
    echo "newcomer: the run's files are in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# Output that must not appear in what a newcomer sees: setuptools' notices
# (and, but for the test run, tracebacks).
NOISE='BuildBackendWarning|Editable installation'
check_log() {
  local log=$1 what=$2 pattern=${3:-$NOISE|Traceback \(most recent call last\)}
  if grep -nE "$pattern" "$log"; then
    fail "$what printed the lines above"
  fi
}

step "git clone $REPO (HEAD $(git -C "$REPO" rev-parse --short HEAD)) into $CLONE; HOME=$NEWHOME"
git clone --quiet "$REPO" "$CLONE"
[ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ] ||
  echo "(uncommitted changes in $REPO are not part of this run)"

step "bash scripts/demo.sh"
(cd "$CLONE" && as_newcomer bash scripts/demo.sh) 2>&1 | tee "$WORK/demo.log" ||
  fail "scripts/demo.sh failed"
check_log "$WORK/demo.log" "scripts/demo.sh"
grep -qE '^pyrepl3 kernel answered in [0-9]+ ms \(KernelManager.start_kernel\(\) to the first kernel_info_reply' "$WORK/demo.log" ||
  fail "the demo did not say how long the kernel took to answer"
grep -q 'still answering' "$WORK/demo.log" || fail "the demo's kernel did not survive the crash"
expect_no_processes 10 "scripts/demo.sh"

step "bash scripts/test.sh ${PYTEST_ARGS[*]:-}"
(cd "$CLONE" && as_newcomer bash scripts/test.sh "${PYTEST_ARGS[@]}") 2>&1 | tee "$WORK/test.log" ||
  fail "scripts/test.sh failed"
check_log "$WORK/test.log" "scripts/test.sh" "$NOISE"

step "pip install . (not editable) into a second venv, $VENV2"
as_newcomer "$PYTHON" -m venv "$VENV2"
(cd "$WORK" && as_newcomer "$VENV2/bin/python" -m pip install --quiet "$CLONE") 2>&1 |
  tee "$WORK/pip.log" || fail "pip install . failed"
check_log "$WORK/pip.log" "pip install ."
ls "$VENV2"/lib/python*/site-packages/pyrepl3_kernel-*.dist-info/licenses/LICENSE >/dev/null ||
  fail "the installed distribution has no LICENSE"

step "pyrepl3-kernel install --user"
as_newcomer "$VENV2/bin/pyrepl3-kernel" install --user 2>"$WORK/install.err" |
  tee "$WORK/install.out" || fail "install --user failed: $(cat "$WORK/install.err")"
cat "$WORK/install.err" >&2
[ ! -s "$WORK/install.err" ] || fail "install --user warned (above)"
grep -qF "in $NEWHOME/.local/share/jupyter/kernels/pyrepl3" "$WORK/install.out" ||
  fail "install --user did not install into $NEWHOME"

step "jupyter kernelspec list"
as_newcomer "$VENV2/bin/jupyter" kernelspec list 2>"$WORK/list.err" | tee "$WORK/list.out" ||
  fail "jupyter kernelspec list failed: $(cat "$WORK/list.err")"
cat "$WORK/list.err" >&2
[ ! -s "$WORK/list.err" ] || fail "jupyter kernelspec list warned (above)"
grep -qE "^ +pyrepl3 +$NEWHOME/.local/share/jupyter/kernels/pyrepl3\$" "$WORK/list.out" ||
  fail "Jupyter does not use the pyrepl3 kernel spec just installed"

step "one cell through jupyter_client"
cat >"$WORK/one_cell.py" <<'EOF'
from jupyter_client.manager import start_new_kernel

km, kc = start_new_kernel(kernel_name="pyrepl3")
try:
    out = []
    reply = kc.execute_interactive(
        "import sys; print(6 * 7, sys.prefix)",
        output_hook=lambda m: out.append(m["content"].get("text", "")),
        timeout=60,
    )
    print("execute_reply:", reply["content"]["status"], "| stdout:", "".join(out).strip())
    assert reply["content"]["status"] == "ok" and "".join(out).startswith("42 "), out
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
EOF
(cd "$WORK" && as_newcomer "$VENV2/bin/python" one_cell.py) 2>&1 | tee "$WORK/cell.log" ||
  fail "the one-cell run failed"
grep -qF "stdout: 42 $VENV2" "$WORK/cell.log" || fail "the cell did not run in $VENV2"
check_log "$WORK/cell.log" "the one-cell run"

step "what the one-cell run left: the manager daemon, and how to stop it"
# The documented policy (docs/daemon.md): in the usual runtime dir a daemon
# started by a short-lived client keeps its warm pool for the next run, until
# it has had no lease for its idle timeout; `pyrepl3-kernel stop` ends it.
as_newcomer "$VENV2/bin/pyrepl3-kernel" status | tee "$WORK/status.out" ||
  fail "pyrepl3-kernel status failed"
as_newcomer "$VENV2/bin/pyrepl3-kernel" stop || fail "pyrepl3-kernel stop failed"

step "pyrepl3-kernel gateway --help"
as_newcomer "$VENV2/bin/pyrepl3-kernel" gateway --help || fail "gateway --help exited with $?"

step "pyrepl3-kernel gateway (no jupyter_server in a plain install)"
set +e
as_newcomer timeout 60 "$VENV2/bin/pyrepl3-kernel" gateway 2>"$WORK/gateway.err"
rc=$?
set -e
cat "$WORK/gateway.err"
[ "$rc" = 1 ] || fail "gateway without jupyter_server exited with $rc, not 1"
[ "$(wc -l <"$WORK/gateway.err")" = 1 ] && grep -qF "pyrepl3-kernel[server]" "$WORK/gateway.err" ||
  fail "gateway without jupyter_server did not say, in one line, which extra to install"

step "no process of this run left (waiting up to $GRACE s)"
expect_no_processes "$GRACE" "the run"
echo "none"

printf '\nnewcomer: all steps passed\n'
