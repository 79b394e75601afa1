"""The worker monitor's accounting, on a stand-in worker (no kernel): a child
forked from the worker, in a session of its own (what the automatic
checkpoint's child is), neither doubles the worker's memory nor counts
toward the running cell's CPU time."""

from __future__ import annotations

import subprocess
import sys

import psutil

from pyrepl3_kernel.session.limits import Limits, WorkerMonitor

from .helpers import wait_until

FAKE_WORKER = """\
import os, sys, time
data = bytearray(b"\\x01") * (100 << 20)  # 100 MiB, touched
pid = os.fork()
if pid == 0:
    os.setsid()
    started = time.process_time()
    while time.process_time() - started < 3:
        pass
    os._exit(0)
print(pid, flush=True)
time.sleep(30)
"""


def cpu_of(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def test_a_forked_save_is_neither_memory_nor_cpu_of_the_cell() -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c", FAKE_WORKER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        monitor = WorkerMonitor(Limits(), kill=lambda reason: None, warn=lambda text: None)
        monitor.attach(worker.pid)
        wait_until(lambda: cpu_of(child) > cpu_of(worker.pid) + 0.5, 20, "the child to burn CPU")
        sample = monitor.sample()
        worker_cpu = cpu_of(worker.pid)
        assert sample["processes"] == 2
        worker_rss = psutil.Process(worker.pid).memory_info().rss
        assert worker_rss > 100 << 20
        # The child's copy-on-write pages are the worker's: not counted again.
        assert sample["rss"] < worker_rss + (30 << 20), (sample, worker_rss)
        # Only the worker's own CPU, not the child's.
        assert sample["cpu"] <= worker_cpu + 0.05, (sample, worker_cpu)
    finally:
        worker.kill()
        worker.wait()
