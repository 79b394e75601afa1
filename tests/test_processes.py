"""pyrepl3_kernel.processes: whether a process runs, and when it started,
against real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pyrepl3_kernel.processes import alive, started_at


def test_a_running_process_is_alive() -> None:
    assert alive(os.getpid())
    assert alive(os.getpid(), started_at(os.getpid()))


def test_a_zombie_is_not_alive_and_a_reaped_process_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        started = started_at(child.pid)
        assert started is not None
        # Not reaped: it is a zombie until wait().
        deadline = time.monotonic() + 30
        while alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(child.pid)
        assert started_at(child.pid) is not None  # the zombie is still there
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid)
    assert started_at(child.pid) is None


def test_a_process_that_reuses_the_pid_is_not_the_one_that_started() -> None:
    started = started_at(os.getpid())
    assert started is not None
    assert not alive(os.getpid(), started - 10)


def test_numbers_that_are_no_process_are_not_alive() -> None:
    for pid in (0, -1, 2**62):
        assert not alive(pid)
    assert started_at(2**62) is None
