"""A standalone kernel (``python -m pyrepl3_kernel -f CONN``) exits when the
process named in ``JPY_PARENT_PID`` is gone, as ipykernel does; a parent
that exited but was not reaped yet (a zombie) is gone too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from jupyter_client.connect import write_connection_file

GONE = "is gone; shutting down"


@contextmanager
def standalone_kernel(tmp_path: Path, parent_pid: int) -> Iterator[subprocess.Popen[bytes]]:
    """The kernel with ``JPY_PARENT_PID=parent_pid``, once its worker runs;
    it and its worker are gone at the end. Its stderr goes to
    ``tmp_path / "kernel.log"``."""
    conn, _ = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1")
    with open(tmp_path / "kernel.log", "wb") as log:
        kernel = subprocess.Popen(
            [sys.executable, "-m", "pyrepl3_kernel", "-f", conn],
            # the standalone kernel itself, not handed to the daemon (handoff.py)
            env={**os.environ, "JPY_PARENT_PID": str(parent_pid), "PYREPL3_HANDOFF": "0"},
            stdin=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while not _workers_of(kernel.pid) and kernel.poll() is None:
            assert time.monotonic() < deadline, "the kernel's worker did not start"
            time.sleep(0.05)
        assert kernel.poll() is None, (tmp_path / "kernel.log").read_text()
        yield kernel
    finally:
        try:
            tree = [kernel.pid, *(p.pid for p in psutil.Process(kernel.pid).children(True))]
        except psutil.Error:
            tree = [kernel.pid]
        for pid in tree:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        kernel.wait()
        psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=10)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _exits(kernel: subprocess.Popen[bytes], within: float = 60.0) -> bool:
    try:
        kernel.wait(timeout=within)
    except subprocess.TimeoutExpired:
        return False
    return True


def _workers_of(kernel_pid: int) -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if f"--parent-pid {kernel_pid}" in " ".join(p.info["cmdline"] or [])
    ]


def test_the_kernel_exits_when_its_parent_is_gone(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with standalone_kernel(tmp_path, parent.pid) as kernel:
            parent.kill()
            parent.wait()
            assert _exits(kernel), "the kernel outlived its parent"
            assert kernel.returncode == 0
            assert f"parent process {parent.pid} {GONE}" in (tmp_path / "kernel.log").read_text()
            deadline = time.monotonic() + 10
            while _workers_of(kernel.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _workers_of(kernel.pid) == []
    finally:
        parent.kill()
        parent.wait()


def test_a_parent_that_exited_but_was_not_reaped_is_gone(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with standalone_kernel(tmp_path, parent.pid) as kernel:
            parent.kill()  # not waited for: a zombie until the finally below
            assert _exits(kernel), "the kernel took a zombie parent for a live one"
            assert kernel.returncode == 0
            assert f"parent process {parent.pid} {GONE}" in (tmp_path / "kernel.log").read_text()
    finally:
        parent.kill()
        parent.wait()
