"""The native ``SessionPool`` with its fork server against the same pool
starting every worker cold, and against ipykernel, side by side in one run.

Usage::

    .venv/bin/python benchmarks/bench_pool_fork.py [--sessions 20] [--runs 3]

Each run: a pool with 2 ready workers (``min_idle=2``, started and warm before
the clock starts), then ``--sessions`` ``pool.acquire()`` at once, each
session answering ``1+1``; the time until every one has answered:

- **fork server**: ``PoolConfig()`` (workers forked from the pool's own fork
  server, 8 at a time);
- **cold**: ``PoolConfig(fork_server=False)`` (every worker a new interpreter,
  ``max_concurrent_starts`` 2 as by default);
- **ipykernel**: as many kernels started at once through jupyter_client's
  ``AsyncKernelManager`` (``python3`` kernelspec) until each answered
  ``kernel_info`` and ``1+1``.

The three alternate within each run (the order rotates). Writes
``results/pool_fork.json`` and prints medians and the ratios fork
server/cold and fork server/ipykernel (below 1: the fork server faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_fork import burst
from bench_pool import IPYKERNEL, ratio

from pyrepl3_kernel import __version__
from pyrepl3_kernel.protocol import ExecuteMessage, MessageType
from pyrepl3_kernel.session import PoolConfig, Session, SessionPool

RESULTS = Path(__file__).resolve().parent / "results" / "pool_fork.json"
KINDS = ("fork_server", "cold", "ipykernel")


async def _answers(session: Session) -> None:
    msgs = [m async for m in session.execute(ExecuteMessage(code="1+1"))]
    reply = msgs[-1]
    if reply.type != MessageType.EXECUTE_REPLY or reply.status != "ok":
        raise RuntimeError(f"1+1 failed: {reply}")


async def pool_burst(n: int, fork_server: bool) -> dict[str, Any]:
    pool = SessionPool(PoolConfig(min_idle=2, max_sessions=n + 2, fork_server=fork_server))
    await pool.start()
    try:

        async def one() -> None:
            await _answers(await pool.acquire())

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - t0
        return {"s": elapsed, "fork_server": pool.fork_server_state}
    finally:
        await pool.stop()


async def ipykernel_burst(n: int) -> dict[str, Any]:
    """ipykernel as bench_fork starts it: ``n`` AsyncKernelManagers at once."""
    out = await burst(IPYKERNEL, n, None)
    if out["ready"] != n:
        raise RuntimeError(f"{n - out['ready']} ipykernels did not answer: {out['failures']}")
    return {"s": out["all_ready_s"]}


async def one_run(n: int, order: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in order:
        print(f"  {n} sessions at once: {kind}", file=sys.stderr)
        if kind == "ipykernel":
            out[kind] = await ipykernel_burst(n)
        else:
            out[kind] = await pool_burst(n, fork_server=kind == "fork_server")
        await asyncio.sleep(1.0)  # let the previous burst's processes go
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ["IPYTHONDIR"] = tempfile.mkdtemp(prefix="pyrepl3-bench-ipython-")
    runs = []
    for i in range(args.runs):
        order = list(KINDS[i % 3 :] + KINDS[: i % 3])
        runs.append(asyncio.run(one_run(args.sessions, order)))
    medians = {k: statistics.median(r[k]["s"] for r in runs) for k in KINDS}
    results = {
        "version": __version__,
        "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "load": os.getloadavg()},
        "sessions": args.sessions,
        "runs": runs,
        "median_s": medians,
        "ratio_fork_server_vs_cold": ratio(medians["fork_server"], medians["cold"]),
        "ratio_fork_server_vs_ipykernel": ratio(medians["fork_server"], medians["ipykernel"]),
        "ratio_cold_vs_ipykernel": ratio(medians["cold"], medians["ipykernel"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    n = args.sessions
    print(f"{n} sessions acquired at once to all answering 1+1 (median of {args.runs} runs)")
    for kind in KINDS:
        print(f"  {kind:<12} {medians[kind]:7.2f} s")
    print(f"  fork server / cold      {results['ratio_fork_server_vs_cold']:.2f}")
    print(f"  fork server / ipykernel {results['ratio_fork_server_vs_ipykernel']:.2f}")
    print(f"  cold / ipykernel        {results['ratio_cold_vs_ipykernel']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
