"""``1+1`` on a kernel subshell while the main shell is busy: pyrepl3 against
ipykernel 7, side by side.

Usage::

    .venv/bin/python benchmarks/bench_subshells.py [--quick] [--out DIR]

Both kernels (the standalone ``pyrepl3-cold``, installed into a temporary
prefix by the script, and ipykernel's ``python3``) are started with
``jupyter_client.KernelManager``; each gets a subshell
(``create_subshell_request``) and a main-shell cell that keeps the main shell
busy until the script ends it. Measured, turn by turn on one kernel then the
other (the first swapped each turn, so a shared machine's noise falls on
both), the round trip of ``1+1`` on the subshell: execute_request to its
execute_reply and idle, with the main shell

- ``waiting``: in ``threading.Event().wait()`` (sleeping, as ``time.sleep``),
- ``computing``: in a pure-Python loop (holding the GIL between switches).

Reported: p50 per kernel and the ratio pyrepl3/ipykernel (below 1: pyrepl3 is
faster); also the idle main shell's ``1+1`` for scale. Writes
``results/subshells.json`` next to this file. Every kernel it starts is shut
down in a ``finally``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench_jupyter import NAMES, TIMEOUT, BenchError, alternate
from clients import Msg, PollingKernel, cold_kernels, options

FULL = {"warmup": 5, "runs": 100}
QUICK = {"warmup": 2, "runs": 20}
BUSY = {
    "waiting": "import threading\nbench_stop = threading.Event()\nbench_stop.wait(900)",
    "computing": (
        "import threading\nbench_stop = threading.Event()\n"
        "while not bench_stop.is_set():\n    sum(range(1000))"
    ),
}


class Kernel(PollingKernel):
    """One kernel with a subshell and a main-shell cell keeping it busy."""

    def __init__(self, kernel_name: str) -> None:
        super().__init__(kernel_name)
        self.subshell: str = ""
        self.busy_cell: str | None = None
        #: Ids of the requests whose shell reply was read.
        self.replied: set[str] = set()

    def recv(self, deadline: float) -> Iterator[tuple[str, Msg]]:
        for channel, msg in super().recv(deadline):
            if channel == "shell":
                self.replied.add(msg["parent_header"].get("msg_id"))
            yield channel, msg

    def control(self, msg_type: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
        msg_id = self.send("control", msg_type, content or {})
        deadline = time.perf_counter() + TIMEOUT
        for channel, msg in self.recv(deadline):
            if channel == "control" and msg["parent_header"].get("msg_id") == msg_id:
                return dict(msg["content"])
        raise AssertionError("unreachable")

    def execute(self, code: str, subshell: str | None = None, wait: bool = True) -> float:
        """Seconds from sending ``code`` to its reply and idle."""
        start = time.perf_counter()
        msg_id = self.send(
            "shell", "execute_request",
            {"code": code, "silent": False, "store_history": True, "user_expressions": {},
             "allow_stdin": False, "stop_on_error": True},
            subshell,
        )  # fmt: skip
        if not wait:
            self.busy_cell = msg_id
            return 0.0
        replied = idle = False
        for channel, msg in self.recv(start + TIMEOUT):
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if channel == "shell":
                if msg["content"]["status"] != "ok":
                    raise BenchError(f"{code!r}: {msg['content']}")
                replied = True
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            if replied and idle:
                return time.perf_counter() - start
        raise AssertionError("unreachable")

    def start_busy(self, code: str) -> None:
        self.execute(code, None, wait=False)
        # The main shell is in the cell once a subshell sees bench_stop.
        for _ in range(200):
            try:
                self.execute("bench_stop", self.subshell)
                return
            except BenchError:
                time.sleep(0.05)
        raise BenchError("the busy cell did not start")

    def end_busy(self) -> None:
        self.execute("bench_stop.set()", self.subshell)
        msg_id, self.busy_cell = self.busy_cell, None
        if msg_id in self.replied:
            return
        for channel, msg in self.recv(time.perf_counter() + TIMEOUT):
            if channel == "shell" and msg["parent_header"].get("msg_id") == msg_id:
                return


def measure(kernels: dict[str, Kernel], settings: dict[str, int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in NAMES:  # warm up, idle
        for _ in range(settings["warmup"]):
            kernels[name].execute("1+1")
    idle: dict[str, list[float]] = {name: [] for name in NAMES}
    for order in alternate(settings["runs"]):
        for name in order:
            idle[name].append(kernels[name].execute("1+1"))
    results["idle_main_1+1"] = idle
    for busy, code in BUSY.items():
        for kernel in kernels.values():
            kernel.start_busy(code)
        samples: dict[str, list[float]] = {name: [] for name in NAMES}
        try:
            for name in NAMES:
                for _ in range(settings["warmup"]):
                    kernels[name].execute("1+1", kernels[name].subshell)
            for order in alternate(settings["runs"]):
                for name in order:
                    samples[name].append(kernels[name].execute("1+1", kernels[name].subshell))
        finally:
            for kernel in kernels.values():
                kernel.end_busy()
        results[f"subshell_1+1_main_{busy}"] = samples
    return results


def main(argv: list[str] | None = None) -> int:
    args = options(__doc__, argv)
    settings = QUICK if args.quick else FULL
    with cold_kernels(Kernel, "bench-subshells-") as kernels:
        for kernel in kernels.values():
            kernel.subshell = kernel.control("create_subshell_request")["subshell_id"]
        samples = measure(kernels, settings)
    table: dict[str, Any] = {}
    print(f"{'metric':34} {'pyrepl3 p50':>12} {'ipykernel p50':>14} {'ratio':>7}")
    for metric, per_kernel in samples.items():
        p50 = {name: statistics.median(values) * 1000 for name, values in per_kernel.items()}
        ratio = p50["pyrepl3"] / p50["ipykernel"]
        table[metric] = {"p50_ms": p50, "ratio": round(ratio, 3), "n": settings["runs"]}
        print(f"{metric:34} {p50['pyrepl3']:10.2f}ms {p50['ipykernel']:12.2f}ms {ratio:7.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "subshells",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": settings,
        "results": table,
    }
    (args.out / "subshells.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
