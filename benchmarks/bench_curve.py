"""What CurveZMQ transport encryption costs: the ``1+1`` round trip with
Curve on and off, pyrepl3 against ipykernel, side by side in one run.

Usage::

    .venv/bin/python benchmarks/bench_curve.py [--quick] [--out DIR]

Six kernels run at once: ``pyrepl3`` (leased warm from the daemon),
``pyrepl3-cold`` (``--no-pool``, one standalone process) and ipykernel
(``python3``), each started by a ``KernelManager`` with
``transport_encryption="required"`` (Curve on) and with ``"disabled"``
(Curve off). The round trip is bench_jupyter.py's: from sending
``execute_request`` to having both the ``execute_reply`` and the
``execute_result`` (then, untimed, the idle status), through
``KernelManager.client()``, which takes the Curve keys from the manager.
Turns alternate over the six kernels and the order rotates every turn, so a
shared machine's noise falls on all of them alike; the ratios are the result:

- ``curve_cost``: a kernel's Curve-on p50 over its Curve-off p50;
- ``vs_ipykernel_curve``: a pyrepl3 kernel's Curve-on p50 over ipykernel's
  Curve-on p50 (below 1: pyrepl3 is faster).

The kernelspecs are installed into a temporary prefix, the runtime dir (so
the daemon) is temporary and stopped at the end, and every kernel is shut
down and the temporary directory removed in a ``finally``. Writes
``results/curve.json`` next to this file and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import bench_jupyter
import zmq
from bench_jupyter import Client, rotations, run_meta, summary, temporary_daemon

KERNELS = {"pyrepl3": "pyrepl3", "pyrepl3-cold": "pyrepl3-cold", "ipykernel": "python3"}
POLICIES = {"curve": "required", "plain": "disabled"}
FULL = {"warmup": 30, "runs": 300}
QUICK = {"warmup": 10, "runs": 60}


@contextmanager
def started(kernel_name: str, policy: str) -> Iterator[Client]:
    with bench_jupyter.started(kernel_name, transport_encryption=policy) as (km, client):
        if (km.curve_publickey is not None) != (policy == "required"):
            raise RuntimeError(f"{kernel_name}: transport_encryption={policy} not applied")
        yield client


def measure(cfg: dict[str, int]) -> dict[str, Any]:
    targets = [f"{kernel}/{curve}" for kernel in KERNELS for curve in POLICIES]
    samples: dict[str, list[float]] = {t: [] for t in targets}
    with ExitStack() as stack:
        clients = {}
        for target in targets:
            kernel, curve = target.split("/")
            clients[target] = stack.enter_context(started(KERNELS[kernel], POLICIES[curve]))
        for client in clients.values():
            for _ in range(cfg["warmup"]):
                client.exec_round_trip()
        for order in rotations(targets, cfg["runs"]):
            for target in order:
                samples[target].append(clients[target].exec_round_trip() * 1000)
    return {t: {**summary(s), "samples": s} for t, s in samples.items()}


def ratios(results: dict[str, Any]) -> dict[str, float]:
    p50 = {t: r["p50"] for t, r in results.items()}
    out = {f"curve_cost/{k}": p50[f"{k}/curve"] / p50[f"{k}/plain"] for k in KERNELS}
    for k in ("pyrepl3", "pyrepl3-cold"):
        out[f"vs_ipykernel_curve/{k}"] = p50[f"{k}/curve"] / p50["ipykernel/curve"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if not zmq.has("curve"):
        print("this libzmq has no CurveZMQ support", file=sys.stderr)
        return 2
    cfg = QUICK if args.quick else FULL
    with temporary_daemon("pyrepl3-bench-curve-"):
        t0 = time.perf_counter()
        results = measure(cfg)
    rat = ratios(results)
    meta = {**run_meta(cfg, t0), "zmq": zmq.zmq_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(
        json.dumps({"meta": meta, "ratios": rat, "execute_1plus1_ms": results}, indent=1)
    )
    print(f"1+1 round trip, ms ({cfg['runs']} runs each, alternated; {meta['seconds']} s)")
    print(f"{'kernel':<14}{'curve p50':>11}{'p99':>8}{'plain p50':>11}{'p99':>8}{'on/off':>8}")
    for k in KERNELS:
        on, off = results[f"{k}/curve"], results[f"{k}/plain"]
        print(
            f"{k:<14}{on['p50']:>11.2f}{on['p99']:>8.2f}{off['p50']:>11.2f}{off['p99']:>8.2f}"
            f"{rat[f'curve_cost/{k}']:>8.2f}"
        )
    for k in ("pyrepl3", "pyrepl3-cold"):
        print(f"{k} with Curve / ipykernel with Curve (p50): {rat[f'vs_ipykernel_curve/{k}']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
