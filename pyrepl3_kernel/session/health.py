"""The usage of a worker's process tree, as ipykernel's usage_reply has it."""

from __future__ import annotations

import contextlib
import socket
from typing import Any


class UsageMeter:
    """CPU and memory of a process tree. Process objects are kept between
    reports: ``cpu_percent`` measures from the previous report."""

    def __init__(self) -> None:
        self._processes: dict[int, Any] = {}

    def report(self, pid: int | None) -> dict[str, Any]:
        """ipykernel's usage_reply fields for the tree under ``pid`` (None:
        no process; the host's figures only)."""
        import psutil

        procs: list[Any] = []
        if pid:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
        self._processes = {p.pid: self._processes.get(p.pid, p) for p in procs}
        cpu = 0.0
        memory = 0
        for proc in self._processes.values():
            with contextlib.suppress(psutil.Error):
                cpu += proc.cpu_percent(None)
                info = proc.memory_full_info()
                memory += getattr(info, "pss", info.rss)
        return {
            "hostname": socket.gethostname(),
            "pid": pid,
            "kernel_cpu": cpu,
            "kernel_memory": memory,
            "cpu_count": psutil.cpu_count(logical=True),
            "host_virtual_memory": dict(psutil.virtual_memory()._asdict()),
        }
