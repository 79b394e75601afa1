"""Benchmarks of the native protocol (Session and SessionPool, no Jupyter).

Measures:

* execute round trip of ``1+1`` (EXECUTE sent -> EXECUTE_REPLY received);
* warm pool acquisition (``acquire()`` with an idle session ready);
* stream latency of ``print()`` without flush: the cell prints
  ``time.time()`` stamps in a loop with short sleeps, the client subtracts
  each stamp from the time its OUTPUT message arrived;
* 100,000 printed lines: time until the reply, and that all lines arrived
  in order.

Writes ``benchmarks/results/native.json`` and prints a table.

    python benchmarks/bench_native.py [--runs 500] [--acquisitions 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyrepl3_kernel import __version__
from pyrepl3_kernel.protocol import ExecuteMessage, MessageType
from pyrepl3_kernel.session import PoolConfig, Session, SessionPool

RESULTS = Path(__file__).resolve().parent / "results" / "native.json"


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linearly interpolated."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary_ms(samples_s: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }


async def run_cell(session: Session, code: str) -> list[Any]:
    msgs = [m async for m in session.execute(ExecuteMessage(code=code))]
    reply = msgs[-1]
    if reply.type != MessageType.EXECUTE_REPLY or reply.status != "ok":
        raise RuntimeError(f"cell failed: {code!r}: {reply}")
    return msgs


async def bench_execute(session: Session, runs: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        await run_cell(session, "1+1")
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await run_cell(session, "1+1")
        samples.append(time.perf_counter() - start)
    return summary_ms(samples)


async def bench_acquire(acquisitions: int) -> dict[str, Any]:
    pool = SessionPool(PoolConfig(min_idle=1, max_sessions=2))
    samples = []
    try:
        await pool.start()
        for _ in range(acquisitions):
            while pool.stats["idle"] < 1:  # measure warm acquisitions only
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            session = await pool.acquire()
            samples.append(time.perf_counter() - start)
            await pool.release(session)
    finally:
        await pool.stop()
    return summary_ms(samples)


async def bench_stream_latency(session: Session, lines: int, sleep_s: float) -> dict[str, Any]:
    code = f"import time\nfor _ in range({lines}):\n    print(repr(time.time()))\n    time.sleep({sleep_s})"
    latencies = []
    pending = ""
    async for msg in session.execute(ExecuteMessage(code=code)):
        received = time.time()
        if msg.type == MessageType.OUTPUT and msg.stream == "stdout":
            pending += msg.data
            *complete, pending = pending.split("\n")
            latencies.extend(received - float(stamp) for stamp in complete if stamp)
    if len(latencies) != lines:
        raise RuntimeError(f"expected {lines} stamps, got {len(latencies)}")
    return summary_ms(latencies)


async def bench_many_lines(session: Session, lines: int) -> dict[str, Any]:
    code = f"for i in range({lines}):\n    print(i)"
    chunks = []
    messages = 0
    start = time.perf_counter()
    async for msg in session.execute(ExecuteMessage(code=code)):
        if msg.type == MessageType.OUTPUT and msg.stream == "stdout":
            chunks.append(msg.data)
            messages += 1
    elapsed = time.perf_counter() - start
    got = "".join(chunks).splitlines()
    in_order = got == [str(i) for i in range(lines)]
    return {
        "lines": lines,
        "seconds": round(elapsed, 3),
        "lines_per_s": round(lines / elapsed),
        "output_messages": messages,
        "all_lines_in_order": in_order,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "meta": {
            "pyrepl3_kernel": __version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    }
    session = Session()
    await session.start()
    try:
        results["execute_1plus1"] = await bench_execute(session, args.runs, args.warmup)
        results["stream_latency_print"] = await bench_stream_latency(session, args.stamps, 0.005)
        results["print_100k_lines"] = await bench_many_lines(session, args.lines)
    finally:
        await session.shutdown()
    results["pool_warm_acquire"] = await bench_acquire(args.acquisitions)
    results["meta"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def print_table(results: dict[str, Any]) -> None:
    rows = [
        ("execute 1+1 round trip", results["execute_1plus1"]),
        ("warm pool acquire", results["pool_warm_acquire"]),
        ("print() stream latency", results["stream_latency_print"]),
    ]
    print(f"{'benchmark':<26} {'n':>6} {'p50 ms':>10} {'p99 ms':>10} {'max ms':>10}")
    for name, r in rows:
        print(
            f"{name:<26} {r['n']:>6} {r['p50_ms']:>10.3f} {r['p99_ms']:>10.3f} {r['max_ms']:>10.3f}"
        )
    big = results["print_100k_lines"]
    print(
        f"{big['lines']:,} printed lines: {big['seconds']:.3f} s "
        f"({big['lines_per_s']:,} lines/s, {big['output_messages']} OUTPUT messages), "
        f"all in order: {big['all_lines_in_order']}"
    )
    meta = results["meta"]
    print(
        f"python {meta['python']}, {meta['cpus']} CPUs, load {meta['loadavg_before']} -> {meta['loadavg_after']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500, help="timed executions of 1+1")
    parser.add_argument("--warmup", type=int, default=50, help="untimed executions first")
    parser.add_argument("--acquisitions", type=int, default=30, help="warm pool acquisitions")
    parser.add_argument("--stamps", type=int, default=300, help="printed time stamps")
    parser.add_argument("--lines", type=int, default=100_000, help="lines for the bulk print")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    # Keep the benchmark's IPython history out of the user's database.
    os.environ.setdefault("IPYTHONDIR", tempfile.mkdtemp(prefix="pyrepl3-bench-ipython-"))
    results = asyncio.run(main(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"written to {args.output}")
    if not results["print_100k_lines"]["all_lines_in_order"]:
        sys.exit("lines were lost or reordered")
