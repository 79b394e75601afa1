"""The JupyterLab debugger's cost: pyrepl3 against ipykernel, side by side.

Usage::

    .venv/bin/python benchmarks/bench_debugger.py [--quick] [--out DIR]

Both kernels (the standalone ``pyrepl3-cold``, installed into a temporary
prefix by the script, and ipykernel's ``python3``) are started with
``jupyter_client.KernelManager`` and driven by one client, alternately, turn
by turn, the first kernel swapped each turn, so a shared machine's noise falls
on both. Measured on each kernel:

- ``1+1`` round trip (execute_request to execute_reply and idle), with the
  debugger detached and then attached (``initialize`` + ``attach``, as
  JupyterLab's bug icon does);
- a cell that loops 10**6 times (``for i in range(10**6): pass``), detached
  and attached;
- execute_request to the ``debug_event`` ``stopped`` at a breakpoint in the
  cell (then ``continue``, and the cell's reply).

Reported: p50 per kernel, the cost of attaching on each kernel
(attached/detached), and the ratios pyrepl3/ipykernel (below 1: pyrepl3 is
faster). Writes ``results/debugger.json`` next to this file. Every kernel it
starts is shut down in a ``finally``.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from bench_jupyter import NAMES, TIMEOUT, BenchError, alternate
from clients import PollingKernel, cold_kernels, options

FULL = {"warmup": 5, "trip_runs": 100, "loop_runs": 8, "stop_runs": 20}
QUICK = {"warmup": 2, "trip_runs": 20, "loop_runs": 3, "stop_runs": 5}
LOOP = "for i in range(10**6):\n    pass"
STOP_CELL = "def f(a, b):\n    c = a + b\n    return c\n\nf(2, 3)"
INITIALIZE = {
    "clientID": "bench",
    "clientName": "bench",
    "adapterID": "python",
    "pathFormat": "path",
    "linesStartAt1": True,
    "columnsStartAt1": True,
    "supportsVariableType": True,
    "supportsVariablePaging": True,
    "locale": "en",
}


def p50(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


class Kernel(PollingKernel):
    """One kernel, its client and the debugger's requests."""

    def __init__(self, kernel_name: str) -> None:
        super().__init__(kernel_name)
        self._seq = itertools.count(1)

    def debug(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        msg_id = self.send(
            "control",
            "debug_request",
            {"type": "request", "seq": next(self._seq), "command": command,
             "arguments": arguments or {}},
        )  # fmt: skip
        kept = []
        try:
            for channel, msg in self.recv(time.perf_counter() + TIMEOUT):
                if channel == "control" and msg["parent_header"].get("msg_id") == msg_id:
                    return msg["content"]  # type: ignore[no-any-return]
                kept.append((channel, msg))
        finally:
            self.unread(kept)
        raise AssertionError("unreachable")

    def run(self, code: str, stop: bool = False) -> float:
        """Seconds from the execute_request to its reply and idle (with
        ``stop``: to the ``stopped`` event; the thread is then continued
        and the cell finished)."""
        content = {"code": code, "silent": False, "store_history": True,
                   "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}  # fmt: skip
        started = time.perf_counter()
        msg_id = self.send("shell", "execute_request", content)
        replied = idle = False
        elapsed = None
        for channel, msg in self.recv(started + TIMEOUT):
            if stop and elapsed is None and msg["msg_type"] == "debug_event":
                if msg["content"].get("event") == "stopped":
                    elapsed = time.perf_counter() - started
                    thread = msg["content"]["body"]["threadId"]
                    self.debug("continue", {"threadId": thread})
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if channel == "shell":
                replied = True
                if msg["content"]["status"] != "ok":
                    raise BenchError(f"cell failed: {msg['content']}")
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            if replied and idle:
                total = time.perf_counter() - started
                return total if elapsed is None else elapsed
        raise AssertionError("unreachable")

    def attach(self) -> None:
        for command, args in (("initialize", INITIALIZE), ("attach", {})):
            reply = self.debug(command, args)
            if not reply.get("success"):
                raise BenchError(f"{command} failed: {reply}")

    def breakpoint(self, code: str, line: int) -> None:
        source = self.debug("dumpCell", {"code": code})["body"]["sourcePath"]
        reply = self.debug(
            "setBreakpoints", {"breakpoints": [{"line": line}], "source": {"path": source}}
        )
        if not reply.get("success"):
            raise BenchError(f"setBreakpoints failed: {reply}")
        self.debug("configurationDone")


def measure(kernels: dict[str, Kernel], plan: dict[str, int]) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in kernels}

    def turns(metric: str, code: str, runs: int, stop: bool = False) -> None:
        for name in NAMES:
            for _ in range(plan["warmup"]):
                kernels[name].run(code, stop)
        for order in alternate(runs):
            for name in order:
                samples[name].setdefault(metric, []).append(kernels[name].run(code, stop))

    turns("trip_detached", "1+1", plan["trip_runs"])
    turns("loop_detached", LOOP, plan["loop_runs"])
    for kernel in kernels.values():
        kernel.attach()
    turns("trip_attached", "1+1", plan["trip_runs"])
    turns("loop_attached", LOOP, plan["loop_runs"])
    for kernel in kernels.values():
        kernel.breakpoint(STOP_CELL, 2)
    turns("to_stopped", STOP_CELL, plan["stop_runs"], stop=True)
    return samples


def report(samples: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    medians = {name: {m: p50(v) for m, v in ms.items()} for name, ms in samples.items()}
    py, ip = medians["pyrepl3"], medians["ipykernel"]
    ratios = {metric: py[metric] / ip[metric] for metric in py}
    cost = {
        name: {
            "trip": medians[name]["trip_attached"] / medians[name]["trip_detached"],
            "loop": medians[name]["loop_attached"] / medians[name]["loop_detached"],
        }
        for name in medians
    }
    return {"p50_s": medians, "ratio_pyrepl3_over_ipykernel": ratios, "attach_cost": cost}


def main(argv: list[str] | None = None) -> int:
    args = options(__doc__, argv)
    plan = QUICK if args.quick else FULL
    with cold_kernels(Kernel, "pyrepl3-bench-debugger-") as kernels:
        samples = measure(kernels, plan)
    result = report(samples)
    result.update(
        plan=plan,
        machine={"python": platform.python_version(), "cpus": os.cpu_count()},
        when=time.strftime("%Y-%m-%d %H:%M:%S"),
        samples=samples,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "debugger.json").write_text(json.dumps(result, indent=1))
    rows = [
        ("1+1, debugger detached", "trip_detached", 1e3, "ms"),
        ("1+1, debugger attached", "trip_attached", 1e3, "ms"),
        ("loop 10**6, detached", "loop_detached", 1e3, "ms"),
        ("loop 10**6, attached", "loop_attached", 1e3, "ms"),
        ("execute -> stopped", "to_stopped", 1e3, "ms"),
    ]
    print(f"{'p50':28} {'pyrepl3':>10} {'ipykernel':>10} {'ratio':>7}")
    for label, metric, scale, unit in rows:
        py = result["p50_s"]["pyrepl3"][metric] * scale
        ip = result["p50_s"]["ipykernel"][metric] * scale
        ratio = result["ratio_pyrepl3_over_ipykernel"][metric]
        print(f"{label:28} {py:8.2f}{unit} {ip:8.2f}{unit} {ratio:7.2f}")
    for name, cost in result["attach_cost"].items():
        print(f"attach cost on {name}: 1+1 x{cost['trip']:.2f}, loop x{cost['loop']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
