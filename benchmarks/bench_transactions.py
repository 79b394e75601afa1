"""Cost of transactions (rollback of failing cells) per cell.

Two parts:

* **in process**: an IPython shell and a ``TransactionManager`` in this
  process, no protocol. Each sample is one cell's transaction, ``begin()``
  (the snapshot) plus ``end()`` (nothing on success, the rollback on
  failure), around the cell's statements run with ``exec`` (so a traceback's
  formatting is not counted). Measured for ``bindings`` on a modest
  namespace and for ``full`` on the workload of the issue: a 1e6 float64
  array, a 100,000 x 5 DataFrame and a 10,000-entry dict, touched by
  ``arr[0] = -1; lst.append(4); d['k'] = 1; df['c'] = 0``. The same objects
  are also copied with other strategies (pickle protocol 5 with out-of-band
  buffers, ``copy.deepcopy``, a deep pandas copy) for comparison.
* **through a worker**: a ``Session`` per policy with the workload loaded;
  the execute round trip of the touching cell, succeeding and failing (the
  failing one ends with ``1/0``: most of its time is IPython formatting the
  traceback), the three policies measured in turns.

Writes ``benchmarks/results/transactions.json`` and prints a summary.

    python benchmarks/bench_transactions.py [--runs 200] [--worker-runs 40]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "transactions.json"

WORKLOAD = """
import numpy as np, pandas as pd
arr = np.random.default_rng(0).random(1_000_000)
df = pd.DataFrame(np.random.default_rng(1).random((100_000, 5)), columns=list("abcde"))
d = {f"k{i}": i for i in range(10_000)}
lst = [1, 2, 3]
"""
TOUCH = "arr[0] = -1\nlst.append(4)\nd['k'] = 1\ndf['c'] = 0\n"
#: The same cell with a write into the frame's existing data (copy on write).
TOUCH_DATA = "arr[0] = -1\nlst.append(4)\nd['k'] = 1\ndf.iloc[0, 0] = -1\n"
MODEST_NS = "\n".join(f"v{i} = {i}" for i in range(100)) + "\n"


def stats_us(samples: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples)
    return {
        "n": len(us),
        "median_us": round(statistics.median(us), 2),
        "p90_us": round(us[int(0.9 * (len(us) - 1))], 2),
        "min_us": round(us[0], 2),
    }


def stats_ms(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in samples)
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
        "min_ms": round(ms[0], 3),
    }


class _Failed:
    """What ``run_cell`` returns for a cell that raised."""

    success = False
    error_in_exec = ValueError("boom")
    error_before_exec = None


class _Succeeded:
    success = True
    error_in_exec = None
    error_before_exec = None


def in_process(runs: int) -> dict[str, Any]:
    from IPython.core.interactiveshell import InteractiveShell

    from pyrepl3_kernel.worker.transactions import TransactionManager

    shell = InteractiveShell.instance()
    manager = TransactionManager(shell)
    ns = shell.user_ns
    payloads = shell.payload_manager
    out: dict[str, Any] = {}

    def cell(code: str, policy: str, fail: bool, setup: str = "") -> dict[str, Any]:
        manager.set_policy(policy)
        compiled = compile(code, "<cell>", "exec")
        restore = compile(setup, "<setup>", "exec") if setup else None
        begin, end, total = [], [], []
        for i in range(runs + 5):
            if restore is not None:
                exec(restore, ns)
            t0 = time.perf_counter()
            txn = manager.begin(code)
            t1 = time.perf_counter()
            exec(compiled, ns)
            t2 = time.perf_counter()
            manager.end(txn, _Failed() if fail else _Succeeded(), silent=True)
            t3 = time.perf_counter()
            payloads.clear_payload()
            if i >= 5:
                begin.append(t1 - t0)
                end.append(t3 - t2)
                total.append((t1 - t0) + (t3 - t2))
        return {"begin": stats_us(begin), "end": stats_us(end), "overhead": stats_us(total)}

    # off: the hot path (one policy check per cell)
    exec(compile(MODEST_NS, "<ns>", "exec"), ns)
    out["off"] = cell("x = 1", "off", fail=True)
    # bindings: one name added, one rebound (and, in a second cell, one deleted)
    bind_setup = "y = 1\nz = 1\nx = None\ndel x\n"
    bind_code = "x = 1\nz = 2\n"
    del_code = "x = 1\nz = 2\ndel y\n"
    for history in (0, 100):  # what 100 cells of history leave in the namespace
        for i in range(history):
            ns[f"_i{i}"] = "x = 1"
        exec(compile(bind_setup, "<setup>", "exec"), ns)
        out[f"bindings_{history}_cells"] = {
            "namespace_size": len(ns),
            "success": cell(bind_code, "bindings", fail=False, setup=bind_setup),
            "failure": cell(bind_code, "bindings", fail=True, setup=bind_setup),
            "failure_with_del": cell(del_code, "bindings", fail=True, setup=bind_setup),
        }

    exec(compile(WORKLOAD, "<workload>", "exec"), ns)
    reset = "lst[:] = [1, 2, 3]\nd.pop('k', None)\n"
    reset_frame = reset + "df.drop(columns=['c'], inplace=True, errors='ignore')\n"
    out["full_success"] = cell(TOUCH, "full", fail=False, setup=reset_frame)
    out["full_failure"] = cell(TOUCH, "full", fail=True, setup=reset_frame)
    out["full_success_frame_write"] = cell(TOUCH_DATA, "full", fail=False, setup=reset)
    out["full_failure_frame_write"] = cell(TOUCH_DATA, "full", fail=True, setup=reset)
    # The cell's own time with and without a snapshot: the copy-on-write copy
    # of the written pandas block happens inside the cell.
    manager.set_policy("off")
    compiled = compile(TOUCH_DATA, "<cell>", "exec")
    plain, under = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        exec(compiled, ns)
        plain.append(time.perf_counter() - t0)
        manager.set_policy("full")
        txn = manager.begin(TOUCH_DATA)
        t0 = time.perf_counter()
        exec(compiled, ns)
        under.append(time.perf_counter() - t0)
        manager.end(txn, _Succeeded())
        manager.set_policy("off")
    out["frame_write_cell_time"] = {"off": stats_us(plain), "full": stats_us(under)}

    # Other ways to copy the touched objects before the cell.
    objs = [ns["arr"], ns["lst"], ns["d"], ns["df"]]

    def pickle5() -> Any:
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(objs, protocol=5, buffer_callback=buffers.append)
        return pickle.loads(data, buffers=[bytearray(b) for b in buffers])

    def walker(lazy: bool) -> Any:
        from pyrepl3_kernel.worker.transactions import Snapshot

        snap = Snapshot(user_globals=ns)
        snap.lazy_frames = lazy
        for name in ("arr", "lst", "d", "df"):
            snap.add(name, ns[name])
        return snap

    strategies = {
        "snapshot_walker_lazy_frames (chosen)": lambda: walker(True),
        "snapshot_walker_deep_frames": lambda: walker(False),
        "pickle5_out_of_band": pickle5,
        "copy.deepcopy": lambda: copy.deepcopy(objs),
        "numpy_copy+pandas_deep_copy+dict_deepcopy": lambda: (
            ns["arr"].copy(),
            list(ns["lst"]),
            copy.deepcopy(ns["d"]),
            ns["df"].copy(deep=True),
        ),
    }
    compare = {}
    for name, fn in strategies.items():
        samples = []
        for i in range(max(20, runs // 5) + 3):
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                samples.append(time.perf_counter() - t0)
        compare[name] = stats_ms(samples)
    out["snapshot_strategies"] = compare
    manager.set_policy(None)
    return out


async def through_worker(runs: int) -> dict[str, Any]:
    """One worker per policy, all loaded with the workload; the policies take
    turns (in a rotating order) so that load from elsewhere hits them alike."""
    from pyrepl3_kernel.protocol import ExecuteMessage
    from pyrepl3_kernel.session import Session

    async def roundtrip(session: Session, code: str) -> tuple[float, str]:
        t0 = time.perf_counter()
        status = ""
        async for msg in session.execute(ExecuteMessage(code=code)):
            status = getattr(msg, "status", status)
        return time.perf_counter() - t0, status

    # Every measured cell starts from the same state whatever the policy did
    # to the previous one (a fresh, consolidated frame).
    reset = "lst[:] = [1, 2, 3]; d.pop('k', None); df = df_master.copy()"
    policies = ("off", "bindings", "full")
    sessions = {
        policy: Session(env=dict(os.environ, PYREPL3_TRANSACTION_POLICY=policy))
        for policy in policies
    }
    samples: dict[tuple[str, str], list[float]] = {
        (p, label): [] for p in policies for label in ("success", "failure")
    }
    try:
        for session in sessions.values():
            await session.start()
            await roundtrip(session, WORKLOAD + "df_master = df.copy()\n")
        for i in range(runs + 3):
            order = policies[i % 3 :] + policies[: i % 3]
            for label, code in (("success", TOUCH), ("failure", TOUCH + "1/0")):
                for policy in order:
                    session = sessions[policy]
                    await roundtrip(session, reset)
                    elapsed, status = await roundtrip(session, code)
                    if status != ("ok" if label == "success" else "error"):
                        raise RuntimeError(f"{policy} {label}: status {status}")
                    if i >= 3:
                        samples[policy, label].append(elapsed)
    finally:
        for session in sessions.values():
            await session.shutdown()
    return {
        policy: {label: stats_ms(samples[policy, label]) for label in ("success", "failure")}
        for policy in policies
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--worker-runs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "meta": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "workload": "1e6 float64 array, 100k x 5 float64 DataFrame, 10k-entry dict, small list",
            "cell": TOUCH.strip().replace("\n", "; "),
        }
    }
    results["in_process"] = in_process(args.runs)
    results["through_worker"] = asyncio.run(through_worker(args.worker_runs))
    results["meta"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    ip = results["in_process"]
    for history in (0, 100):
        b = ip[f"bindings_{history}_cells"]
        for case in ("success", "failure", "failure_with_del"):
            o = b[case]
            print(
                f"bindings, {b['namespace_size']} names, {case:16}"
                f" overhead median {o['overhead']['median_us']:7.1f} us"
                f"  (begin {o['begin']['median_us']:.1f}, end {o['end']['median_us']:.1f})"
            )
    for key in (
        "off",
        "full_success",
        "full_failure",
        "full_success_frame_write",
        "full_failure_frame_write",
    ):
        o = ip[key]
        print(
            f"{key:28} overhead median {o['overhead']['median_us']:9.1f} us"
            f"  (begin {o['begin']['median_us']:.1f}, end {o['end']['median_us']:.1f})"
        )
    fw = ip["frame_write_cell_time"]
    print(
        f"cell with df.iloc write: off {fw['off']['median_us']:.1f} us,"
        f" under a full snapshot {fw['full']['median_us']:.1f} us"
    )
    for name, s in ip["snapshot_strategies"].items():
        print(f"snapshot by {name:45} {s['median_ms']:.3f} ms")
    for policy, r in results["through_worker"].items():
        print(
            f"worker {policy:9} success {r['success']['median_ms']:.3f} ms,"
            f" failure {r['failure']['median_ms']:.3f} ms"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
