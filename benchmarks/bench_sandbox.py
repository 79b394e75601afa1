"""Sandboxed sessions against plain ones (issue 17), side by side in one run.

Measures, on the native API (``Session``, ``SessionPool``), each with a
sandboxed and a plain worker, turn by turn (which goes first swaps every
turn, so the load of a shared machine falls on both):

* cold start: ``Session.start()`` until the worker is ready (a new
  interpreter; for the sandbox also bubblewrap, the cgroups and the store);
* pooled start: ``SessionPool.acquire()`` with a warm worker idle, to the
  reply of the first ``1+1``;
* ``1+1`` round trip (EXECUTE sent -> EXECUTE_REPLY received), p50 and p90;
* 100,000 printed lines (``for i in range(100000): print(i)``): time to the
  reply.

Writes ``benchmarks/results/sandbox.json`` and prints a table; the ratio is
sandboxed / plain (1.0: no cost; the goal for the round trip is 1.10 or
below).

    .venv/bin/python benchmarks/bench_sandbox.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyrepl3_kernel import __version__
from pyrepl3_kernel.protocol import ExecuteMessage, MessageType
from pyrepl3_kernel.session import PoolConfig, Session, SessionPool

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("plain", "sandboxed")


def percentile(values: list[float], q: float) -> float:
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


async def run_cell(session: Session, code: str) -> tuple[float, int]:
    """Seconds to the reply, and the number of output lines seen."""
    lines = 0
    start = time.perf_counter()
    async for msg in session.execute(ExecuteMessage(code=code)):
        if msg.type == MessageType.OUTPUT:
            lines += msg.data.count("\n")  # type: ignore[attr-defined]
        elif msg.type == MessageType.ERROR:
            raise RuntimeError(f"the cell failed: {msg}")
    return time.perf_counter() - start, lines


class Bench:
    def __init__(self, workdir: str, store_root: str) -> None:
        self.workdir = workdir
        self.profile = {"store_root": store_root}
        self.env = {**os.environ, "PYREPL3_SANDBOX": ""}

    def session(self, kind: str) -> Session:
        return Session(
            cwd=self.workdir,
            env=self.env,
            autosave=False,
            **({"sandbox": self.profile} if kind == "sandboxed" else {}),
        )

    def pool(self, kind: str) -> SessionPool:
        return SessionPool(
            PoolConfig(
                min_idle=1,
                max_sessions=2,
                cwd=self.workdir,
                env=self.env,
                autosave=False,
                sandbox=self.profile if kind == "sandboxed" else None,
            )
        )


def order(turn: int) -> tuple[str, ...]:
    return KINDS if turn % 2 == 0 else tuple(reversed(KINDS))


async def cold_starts(bench: Bench, turns: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for turn in range(turns):
        for kind in order(turn):
            session = bench.session(kind)
            start = time.perf_counter()
            await session.start()
            times[kind].append(time.perf_counter() - start)
            await session.shutdown()
    return times


async def pooled_starts(bench: Bench, turns: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    pools = {kind: bench.pool(kind) for kind in KINDS}
    try:
        for pool in pools.values():
            await pool.start()
        for turn in range(turns):
            for kind in order(turn):
                pool = pools[kind]
                for _ in range(600):  # a warm worker idle first (bounded wait)
                    if pool.stats["idle"] > 0:
                        break
                    await asyncio.sleep(0.05)
                start = time.perf_counter()
                session = await pool.acquire()
                await run_cell(session, "1+1")
                times[kind].append(time.perf_counter() - start)
                await session.shutdown()
    finally:
        for pool in pools.values():
            await pool.stop()
    return times


async def round_trips_and_lines(
    bench: Bench, runs: int, line_turns: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    sessions = {kind: bench.session(kind) for kind in KINDS}
    trips: dict[str, list[float]] = {k: [] for k in KINDS}
    lines: dict[str, list[float]] = {k: [] for k in KINDS}
    try:
        await asyncio.gather(*(s.start() for s in sessions.values()))
        for session in sessions.values():
            for _ in range(20):  # warm-up
                await run_cell(session, "1+1")
        for turn in range(runs):
            for kind in order(turn):
                elapsed, _ = await run_cell(sessions[kind], "1+1")
                trips[kind].append(elapsed)
        for turn in range(line_turns):
            for kind in order(turn):
                elapsed, seen = await run_cell(
                    sessions[kind], "for i in range(100000):\n    print(i)"
                )
                if seen != 100_000:
                    raise RuntimeError(f"{kind}: {seen} lines arrived, not 100000")
                lines[kind].append(elapsed)
    finally:
        await asyncio.gather(*(s.shutdown() for s in sessions.values()))
    return trips, lines


def summary(times: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        out[kind] = {
            "p50_ms": percentile(times[kind], 0.5) * 1000,
            "p90_ms": percentile(times[kind], 0.9) * 1000,
            "n": len(times[kind]),
        }
    out["ratio_p50"] = out["sandboxed"]["p50_ms"] / out["plain"]["p50_ms"]
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pyrepl3-bench-sandbox-") as tmp:
        workdir = os.path.join(tmp, "work")
        stores = os.path.join(tmp, "stores")
        os.makedirs(workdir)
        os.makedirs(stores)
        bench = Bench(workdir, stores)
        quick = args.quick
        cold = await cold_starts(bench, 4 if quick else 10)
        pooled = await pooled_starts(bench, 4 if quick else 10)
        trips, lines = await round_trips_and_lines(bench, 200 if quick else 1000, 1 if quick else 3)
    return {
        "cold_start": summary(cold),
        "pooled_start": summary(pooled),
        "round_trip_1plus1": summary(trips),
        "print_100k_lines": summary(lines),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for sandbox.json")
    args = parser.parse_args()
    if shutil.which("bwrap") is None:
        print("bench_sandbox: bubblewrap (bwrap) is not installed", file=sys.stderr)
        return 2
    results = asyncio.run(main_async(args))
    report = {
        "version": __version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "quick": args.quick,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sandbox.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'metric':<22} {'plain p50':>11} {'sandboxed p50':>14} {'ratio':>7}")
    for name, row in results.items():
        print(
            f"{name:<22} {row['plain']['p50_ms']:>9.2f}ms {row['sandboxed']['p50_ms']:>12.2f}ms "
            f"{row['ratio_p50']:>7.2f}"
        )
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; ratio = sandboxed/plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
