"""The scripts in ``examples/`` run and print what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from jupyter_helpers import stop_daemon

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("basic.py", "Hello from subprocess!"),
        ("interactive_input.py", "Hello Alice, 30 years old!"),
        ("session_pool.py", ""),
        ("crash_recovery.py", "WorkerDied: the worker process died (exit code 3)"),
    ],
)
def test_example_runs(script, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
    assert "Traceback" not in done.stderr
    if script == "crash_recovery.py":
        assert "42\nrestarts: 1, last crash: exit code 3" in done.stdout, done.stdout


# -- examples/demo.py (what scripts/demo.sh runs) ------------------------------

ANSWERED = re.compile(
    r"^pyrepl3 kernel answered in \d+ ms \(KernelManager\.start_kernel\(\) to the first "
    r"kernel_info_reply; (.*)\)$",
    re.M,
)


def demo_env(kernelspec: Path, tmp_path: Path) -> dict[str, str]:
    """The ``pyrepl3`` kernelspec of the fixture, and a runtime dir (so a
    manager daemon) of the test's own."""
    env = dict(os.environ)
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    return env


def run_demo(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def processes_of(runtime_dir: Path) -> list[str]:
    """Command lines of the processes that name ``runtime_dir`` (a daemon does)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(runtime_dir) in cmdline:
            found.append(cmdline)
    return found


def test_demo_says_what_its_figure_is_and_stops_the_daemon_it_started(
    pyrepl3_kernelspec: Path, tmp_path: Path
) -> None:
    env = demo_env(pyrepl3_kernelspec, tmp_path)
    runtime_dir = tmp_path / "runtime"
    try:
        done = run_demo(env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        out = done.stdout
        # The figure is start_kernel() to the first kernel_info_reply (not
        # start_new_kernel(), whose wait_for_ready() ends with 0.2 s of
        # iopub silence), and it says how the kernel started.
        match = ANSWERED.search(out)
        assert match, out
        assert match.group(1).startswith(("a warm worker", "started cold")), match.group(1)
        assert "ready in" not in out
        assert "[stdout] still answering" in out
        assert re.search(r"^--- another pyrepl3 kernel: answered in \d+ ms \(", out, re.M), out
        # It started the daemon, so it stops it, and says so.
        stopped = re.search(
            r"^Stopped the pyrepl3 manager daemon this demo started \(pid (\d+); "
            r"`pyrepl3-kernel stop`\)",
            out,
            re.M,
        )
        assert stopped, out
        assert not psutil.pid_exists(int(stopped.group(1))) or (
            psutil.Process(int(stopped.group(1))).status() == psutil.STATUS_ZOMBIE
        )
        assert processes_of(runtime_dir) == []
    finally:
        stop_daemon(runtime_dir)


def test_demo_leaves_a_daemon_that_was_already_running(
    pyrepl3_kernelspec: Path, tmp_path: Path
) -> None:
    env = demo_env(pyrepl3_kernelspec, tmp_path)
    runtime_dir = tmp_path / "runtime"
    runtime_dir.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "pyrepl3_kernel.cli", "serve", "--runtime-dir", str(runtime_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status = [sys.executable, "-m", "pyrepl3_kernel.cli", "status"]
        for _ in range(600):
            if subprocess.run(status, env=env, capture_output=True, timeout=60).returncode == 0:
                break
            assert daemon.poll() is None, "the daemon exited"
            time.sleep(0.1)
        done = run_demo(env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert (
            f"Left running: the pyrepl3 manager daemon (pid {daemon.pid}), which was running "
            "before the demo" in done.stdout
        )
        assert "`pyrepl3-kernel stop`" in done.stdout
        assert daemon.poll() is None
    finally:
        stop_daemon(runtime_dir)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
