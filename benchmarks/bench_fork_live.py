"""Forking a live kernel with 1 GiB of numpy state, to the new kernel
answering (issue 14's goal: under 100 ms), against starting a stock
ipykernel (empty) in the same run.

Usage::

    .venv/bin/python benchmarks/bench_fork_live.py [--quick] [--out DIR]

Measured, alternately, turn by turn:

- ``session.fork()``: a native ``Session`` holding ``np.ones(2**27)`` (1 GiB,
  every page touched) is forked; timed from calling ``fork()`` to the new
  session's ``1+1`` reply. The same with an empty session, for the cost of
  the state itself.
- ``%fork``: a ``pyrepl3`` kernel (leased from the daemon) holding the same
  1 GiB; timed from sending the ``%fork`` execute_request to a client on the
  printed connection file having the ``1+1`` execute_reply and result of the
  new kernel (connect, kernel_info, execute). The same for a standalone
  ``--no-pool`` kernel (its fork is handed to the daemon, which hosts it).
- the peer: ``KernelManager(kernel_name="python3").start_kernel()`` to its
  first ``1+1`` result: what a new kernel costs without a fork, even empty.

Each fork is shut down (untimed) before the next. Ratios: each fork time
over ipykernel's start (below 1: the fork is faster than starting even an
empty ipykernel). The kernelspecs go to a temporary prefix, the runtime dir
(so the daemon) is temporary, stopped and removed at the end. Writes
``results/fork_live.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from bench_jupyter import rotations, run_meta, started, stop, summary, temporary_daemon
from jupyter_client import KernelManager
from jupyter_client.blocking.client import BlockingKernelClient

FULL = {"runs": 15}
QUICK = {"runs": 5}
STATE = "import numpy as np\nbig = np.ones(2**27)  # 1 GiB, every page touched"


# -- native ------------------------------------------------------------------------


async def native_forks(runs: int, state: str) -> list[float]:
    from pyrepl3_kernel import Session
    from pyrepl3_kernel.protocol import ExecuteMessage

    async def one_plus_one(s: Session) -> None:
        async for msg in s.execute(ExecuteMessage(code="1+1")):
            if msg.type == "execute_reply":
                assert msg.status == "ok", msg  # type: ignore[attr-defined]

    parent = Session(autosave=False)
    await parent.start()
    samples = []
    try:
        if state:
            async for _ in parent.execute(ExecuteMessage(code=state)):
                pass
        for _ in range(runs):
            t0 = time.perf_counter()
            child = await parent.fork()
            await one_plus_one(child)
            samples.append((time.perf_counter() - t0) * 1000)
            await child.shutdown()
    finally:
        await parent.shutdown()
    return samples


# -- Jupyter ------------------------------------------------------------------------


def magic_fork(kc: BlockingKernelClient) -> float:
    """``%fork`` to the new kernel's 1+1 result, in ms; the fork is shut down."""
    t0 = time.perf_counter()
    msg_id = kc.execute("%fork")
    text = ""
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
        if msg["msg_type"] == "error":
            raise RuntimeError(f"%fork failed: {msg['content']['evalue']}")
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    found = re.search(r"--existing (\S+)", text)
    if found is None:
        raise RuntimeError(f"%fork printed no connection file: {text!r}")
    fork = BlockingKernelClient(connection_file=found.group(1))
    fork.load_connection_file()
    fork.start_channels()
    try:
        # kernel_info_reply, then an iopub message (the subscription is
        # live); not wait_for_ready(), which adds 0.2 s of iopub silence.
        info = fork.kernel_info()
        while fork.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != info:
            pass
        while fork.get_iopub_msg(timeout=30)["parent_header"].get("msg_id") != info:
            pass
        reply = fork.execute_interactive("1+1", timeout=30, output_hook=lambda m: None)
        elapsed = (time.perf_counter() - t0) * 1000
        assert reply["content"]["status"] == "ok", reply
    finally:
        fork.shutdown()
        fork.stop_channels()
    return elapsed


def ipykernel_start() -> float:
    """``start_kernel()`` of python3 to its first 1+1 result, in ms."""
    t0 = time.perf_counter()
    with started("python3") as (_, client):
        client.exec_round_trip()
        return (time.perf_counter() - t0) * 1000


#: The kernels forked with %fork: the daemon-hosted one, and a standalone
#: (--no-pool) one, whose fork the daemon hosts too.
MAGIC_KERNELS = {"%fork 1 GiB": "pyrepl3", "%fork 1 GiB (--no-pool)": "pyrepl3-cold"}


def jupyter_forks(runs: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {**{k: [] for k in MAGIC_KERNELS}, "ipykernel start": []}
    ipykernel_start()  # untimed: page cache, .pyc files
    for label, kernel_name in MAGIC_KERNELS.items():
        km = KernelManager(kernel_name=kernel_name)
        kc: BlockingKernelClient | None = None
        try:
            km.start_kernel()
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
            kc.execute_interactive(STATE, timeout=120, output_hook=lambda m: None)
            magic_fork(kc)  # untimed: a standalone kernel's first starts the daemon
            for order in rotations([label, "ipykernel start"], runs):
                for name in order:
                    samples[name].append(magic_fork(kc) if name[0] == "%" else ipykernel_start())
        finally:
            if kc is not None:
                kc.stop_channels()
            stop(km)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    with temporary_daemon("pyrepl3-bench-fork-"):
        t0 = time.perf_counter()
        samples = {
            "session.fork() empty": asyncio.run(native_forks(cfg["runs"], "")),
            "session.fork() 1 GiB": asyncio.run(native_forks(cfg["runs"], STATE)),
            **jupyter_forks(cfg["runs"]),
        }
    results: dict[str, Any] = {k: {**summary(v), "samples": v} for k, v in samples.items()}
    peer = results["ipykernel start"]["p50"]
    ratios = {f"{k} / ipykernel start": r["p50"] / peer for k, r in results.items() if "fork" in k}
    meta = run_meta(cfg, t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fork_live.json").write_text(
        json.dumps({"meta": meta, "ratios": ratios, "ms": results}, indent=1)
    )
    print(f"fork of a live kernel to the new kernel's 1+1, ms ({cfg['runs']} runs each)")
    print(f"{'what':<24}{'p50':>9}{'min':>9}{'max':>9}{'/ ipykernel start':>19}")
    for name, r in results.items():
        ratio = r["p50"] / peer
        print(
            f"{name:<24}{r['p50']:>9.1f}{min(r['samples']):>9.1f}{max(r['samples']):>9.1f}{ratio:>19.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
