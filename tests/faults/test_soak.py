"""Soak: one pooled kernel's worker is crashed and restored over and over
while a second client works on a second pooled kernel of the same daemon.
Afterwards the daemon holds as many file descriptors as before and the
workers are the daemon's children (or its fork servers'), as many as
before: nothing leaked.

``PYREPL3_SOAK_SECONDS`` sets the duration (default 60, at most 600).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_helpers import KERNEL_NAME

from .helpers import Kernel, daemon_status, wait_until

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")

SOAK_SECONDS = min(max(float(os.environ.get("PYREPL3_SOAK_SECONDS", "60")), 1.0), 600.0)

CRASHES = [
    "import os\nos._exit(3)",
    "import ctypes\nctypes.string_at(0)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
]


def our_workers(servers: set[int]) -> dict[int, int]:
    """pid -> parent pid of every worker process started for this test
    session (its environment names this session's runtime dir), autosave
    children included: workers the daemon started (``-m
    pyrepl3_kernel.worker``) and workers its fork servers forked (they keep
    the server's command line, ``-m pyrepl3_kernel.worker.forkserver``).
    The fork servers (``servers``) are not workers."""
    runtime = os.environ["JUPYTER_RUNTIME_DIR"]
    found: dict[int, int] = {}
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if not any(arg.startswith("pyrepl3_kernel.worker") for arg in cmdline):
                continue
            if proc.pid in servers:
                continue
            if proc.environ().get("JUPYTER_RUNTIME_DIR") != runtime:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found[proc.pid] = proc.info["ppid"]
        except psutil.Error:
            continue
    return found


def settled(daemon: psutil.Process) -> dict[str, Any]:
    """The daemon's fds and workers once its pools are full again and no
    automatic checkpoint is being written."""

    seen: list[Any] = []

    def snapshot() -> dict[str, Any] | None:
        status = daemon_status()
        pools = status["pools"]
        servers = {s["pid"] for s in status.get("fork_servers", []) if s.get("pid")}
        workers = our_workers(servers)
        seen[:] = [pools, workers]
        if any(p["idle"] < p["min_idle"] or p["starting"] for p in pools):
            return None
        # Every worker is the daemon's child or its fork server's; any other
        # parent is an autosave child still at work (or an orphan).
        if any(ppid not in {daemon.pid, *servers} for ppid in workers.values()):
            return None
        return {"fds": daemon.num_fds(), "workers": set(workers)}

    try:
        return dict(wait_until(snapshot, 30, "the daemon to settle"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: pools {seen[0]}, workers {seen[1]}") from None


def test_soak_crash_and_restore(tmp_path: Path) -> None:
    crashing = Kernel(KERNEL_NAME, env={"PYREPL3_MAX_RESTARTS": "100000"})
    steady = Kernel(KERNEL_NAME)
    try:
        daemon = psutil.Process(daemon_status()["daemon"]["pid"])
        # One crash first: whatever the daemon creates lazily exists by now.
        crashing.ok("n = 0")
        assert crashing.execute(CRASHES[0]).status == "error"
        steady_worker = steady.worker_pid()
        before = settled(daemon)

        stop = threading.Event()
        steady_cells = [0]
        steady_errors: list[Any] = []

        def work() -> None:
            try:
                steady.ok("m = 0")
                while not stop.is_set():
                    run = steady.ok("m += 1\nm")
                    steady_cells[0] += 1
                    result = [x for x in run.iopub if x["msg_type"] == "execute_result"]
                    assert result[0]["content"]["data"]["text/plain"] == str(steady_cells[0])
            except BaseException as exc:  # reported by the main thread
                steady_errors.append(exc)

        worker = threading.Thread(target=work, name="steady-client")
        worker.start()
        crashes = 0
        expected = 0
        deadline = time.monotonic() + SOAK_SECONDS
        try:
            while time.monotonic() < deadline and not steady_errors:
                expected += 1
                crashing.wait_autosaved(crashing.ok("n += 1"))
                run = crashing.execute(CRASHES[crashes % len(CRASHES)])
                assert run.status == "error" and run.reply["content"]["ename"] == "WorkerDied"
                assert "a new worker is running; restored" in run.stderr(), run.stderr()
                crashes += 1
                assert crashing.value("n") == str(expected)
        finally:
            stop.set()
            worker.join(timeout=60)
        assert not steady_errors, steady_errors
        assert crashes >= max(3, SOAK_SECONDS / 10), crashes
        assert steady_cells[0] > crashes
        crashing.assert_never_restarted()
        steady.assert_never_restarted()
        assert steady.worker_pid() == steady_worker
        assert crashing.usage()["pyrepl3"]["restarts"] == crashes + 1

        after = settled(daemon)
        assert after["fds"] == before["fds"], (before, after)
        # As many workers as before, all the daemon's children (or its fork
        # servers'): the crashed ones are gone, none orphaned.
        assert before["workers"], before  # the walk finds the workers
        assert len(after["workers"]) == len(before["workers"]), (before, after)
        assert steady_worker in after["workers"]
        print(
            f"soak: {SOAK_SECONDS:g} s, {crashes} crashes restored, "
            f"{steady_cells[0]} cells on the other kernel, daemon fds {after['fds']}"
        )
    finally:
        crashing.close()
        steady.close()
