"""Checkpoint benchmark on the issue's workload, side by side with dill.

The workload (in one worker): a 1e6 float64 array, a 100k x 5 DataFrame
(int, float, str, bool, datetime), a dict of 10k small tuples, a function
reading a global, a lambda, a closure, a class with 1000 instances,
``import math as m``, a part-consumed generator, a ``threading.Lock`` and an
open file positioned mid-file.

Measured, each several times (median reported, min too):

* **full checkpoint**: a save into an empty store, so every blob is written.
  Three views of the same operation: ``engine`` is measured inside the worker
  by the engine itself (the report's ``seconds``: pickling, hashing, writing,
  fsync, manifest) for a native ``checkpoint`` request; ``round_trip`` is that
  request as the client sees it (adds the protocol and the request loop);
  ``in_cell`` calls the engine from a cell (as ``%checkpoint`` does) and
  records wall and CPU time (CPU time is what a loaded machine disturbs
  least).
* **size**: bytes written, against the workload's *raw bytes*, its in-memory
  size: ``ndarray.nbytes``, ``DataFrame.memory_usage(deep=True)``, and a deep
  ``sys.getsizeof`` of the dict, the instances and the small values.
* **restore into a fresh worker**: a new worker that has already imported
  numpy and pandas (their import time is reported apart), then ``restore``.
* **incremental**: after ``d['k1'] = ...``, a save into the same store: time
  and bytes written (only ``d``'s blob is new).
* **dill**: ``dill.dumps`` of a dict of the names dill can pickle (the
  generator, the lock and the file are left out, and dill's error for each is
  recorded), timed in the worker; ``dill.loads`` timed in a fresh worker that
  has imported numpy and pandas.
* **Kishu** (``--kishu-python PY``: a Python with kishu, numpy, pandas and
  IPython installed, e.g. a separate venv made with ``pip install kishu
  numpy pandas ipython``, kept apart from the project's venv because of
  Kishu's dependencies). Kishu attaches to a notebook in a Jupyter frontend;
  here it runs in its test mode in a plain in-process IPython shell: the
  workload cell is run, Kishu's commit after it is timed (its
  ``post_run_cell`` work), then ``d['k1'] = ...`` and its commit, then a
  ``checkout`` of the first commit in the same process (Kishu has no restore
  into another process without Jupyter). Size is the growth of its database.

Writes ``benchmarks/results/checkpoint.json`` and prints a table.

    .venv/bin/python benchmarks/bench_checkpoint.py [--runs 5] [--out DIR]
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

from workloads import CHECKPOINT as WORKLOAD

from pyrepl3_kernel import __version__
from pyrepl3_kernel.protocol import CheckpointMessage, ExecuteMessage, MessageType
from pyrepl3_kernel.session import Session

RESULTS = Path(__file__).resolve().parent / "results"

GOALS = {
    "full_ms": 50.0,
    "full_size_ratio": 0.75,
    "restore_ms": 60.0,
    "incremental_ms": 15.0,
    "incremental_bytes": 300_000,
}

#: Prints the workload's in-memory size, name by name (JSON).
RAW_BYTES = """
def _raw_sizes():
    import sys, json
    def deep(o, seen):
        if id(o) in seen:
            return 0
        seen.add(id(o))
        size = sys.getsizeof(o)
        if isinstance(o, dict):
            size += sum(deep(k, seen) + deep(v, seen) for k, v in o.items())
        elif isinstance(o, (list, tuple, set, frozenset)):
            size += sum(deep(x, seen) for x in o)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            size += deep(vars(o), seen)
        return size
    return {
        "arr": int(arr.nbytes),
        "df": int(df.memory_usage(deep=True).sum()),
        "d": deep(d, set()),
        "points": deep(points, set()),
    }
print(__import__("json").dumps(_raw_sizes()))
del _raw_sizes
"""

DILL_NAMES = ["m", "arr", "df", "d", "scale", "f", "lam", "make_adder", "adder", "Point", "points"]

DILL_SAVE = """
def _dill_bench(path, names, others):
    import dill, json, time
    ns = {k: globals()[k] for k in names}
    start = time.perf_counter()
    data = dill.dumps(ns)
    seconds = time.perf_counter() - start
    with open(path, "wb") as out:
        out.write(data)
    errors = {}
    for k in others:
        try:
            dill.dumps(globals()[k])
            errors[k] = None
        except Exception as exc:
            errors[k] = f"{type(exc).__name__}: {exc}"[:200]
    return json.dumps({"seconds": seconds, "bytes": len(data), "dill": dill.__version__, "errors": errors})
print(_dill_bench(PATH, NAMES, ["gen", "lock", "fh"]))
del _dill_bench
"""

DILL_LOAD = """
def _dill_load(path):
    import dill, json, time
    with open(path, "rb") as f:
        data = f.read()
    start = time.perf_counter()
    ns = dill.loads(data)
    seconds = time.perf_counter() - start
    globals().update(ns)
    return json.dumps({"seconds": seconds, "names": sorted(ns)})
print(_dill_load(PATH))
del _dill_load
"""


#: Run by ``--kishu-python``; argv: workload file, runs. Prints JSON.
KISHU_HARNESS = r"""
import json, os, statistics, sys, tempfile, time
from pathlib import Path

workload, runs = open(sys.argv[1]).read(), int(sys.argv[2])
out = {"commit_full_s": [], "commit_incremental_s": [], "checkout_s": [],
       "db_bytes_full": [], "db_bytes_incremental": []}
for run in range(runs):
    tmp = Path(tempfile.mkdtemp(prefix="kishu-bench-"))
    os.environ["KISHU_PATH_ROOT"] = str(tmp)
    from IPython.core.interactiveshell import InteractiveShell
    from kishu.storage.config import Config
    from kishu.storage.path import KishuPath
    KishuPath.ROOT = tmp
    Config.set("JUPYTERINT", "test_mode", True)
    from kishu.jupyterint import KishuForJupyter
    from kishu.notebook_id import NotebookId
    import kishu, nbformat
    nb = tmp / "bench.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), nb)
    InteractiveShell.clear_instance()
    ip = InteractiveShell.instance()
    k = KishuForJupyter(NotebookId(key="bench", path=nb, kernel_id=f"k{run}"), ip=ip)
    k.install_kishu_hooks()
    times, ids = [], []
    commit = k._commit_entry
    def timed(entry):
        start = time.perf_counter()
        commit(entry)
        times.append(time.perf_counter() - start)
        ids.append(entry.commit_id)
    k._commit_entry = timed
    size = lambda: sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    base = size()
    assert ip.run_cell(workload).success
    out["commit_full_s"].append(times[-1])
    out["db_bytes_full"].append(size() - base)
    before = size()
    assert ip.run_cell("d['k1'] = (1, 1.5, 'changed')").success
    out["commit_incremental_s"].append(times[-1])
    out["db_bytes_incremental"].append(size() - before)
    start = time.perf_counter()
    k.checkout(ids[0])
    out["checkout_s"].append(time.perf_counter() - start)
    ns = ip.user_ns
    out["checked_out_ok"] = bool(ns["d"]["k1"] == (1, 1 / 7, "v1") and ns["f"](3) == 6)
    k.uninstall_kishu_hooks()
out["version"] = getattr(kishu, "__version__", "?")
print("KISHU-JSON " + json.dumps(out))
"""


def bench_kishu(python: str, runs: int, tmp: Path) -> dict[str, Any]:
    import subprocess

    workload = tmp / "kishu_workload.py"
    data_file = tmp / "data.txt"
    workload.write_text(f"DATA_FILE = {str(data_file)!r}\n{WORKLOAD}")
    harness = tmp / "kishu_harness.py"
    harness.write_text(KISHU_HARNESS)
    proc = subprocess.run(
        [python, str(harness), str(workload), str(runs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("KISHU-JSON ")]
    if proc.returncode != 0 or not line:
        return {"available": False, "note": f"kishu run failed: {proc.stderr[-500:]}"}
    raw = json.loads(line[-1][len("KISHU-JSON ") :])
    return {
        "available": True,
        "version": raw["version"],
        "commit_full": stats_ms(raw["commit_full_s"]),
        "commit_incremental": stats_ms(raw["commit_incremental_s"]),
        "checkout_same_process": stats_ms(raw["checkout_s"]),
        "db_bytes_full": int(statistics.median(raw["db_bytes_full"])),
        "db_bytes_incremental": int(statistics.median(raw["db_bytes_incremental"])),
        "checked_out_ok": raw["checked_out_ok"],
        "how": "test mode, in-process IPython shell, no Jupyter frontend (see docstring)",
    }


#: Calls the engine from a cell (the way ``%checkpoint`` does), timing wall
#: and CPU time of the process: CPU time is what a loaded machine disturbs least.
IN_CELL = """
def _ck_timed(action, name, store, fsync=True):
    import json, os, time
    manager = get_ipython().magics_manager.registry["CheckpointMagics"].manager
    real_fsync = os.fsync
    if not fsync:  # diagnostic only: how much of the wall time is fsync
        os.fsync = lambda fd: None
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        manager.run(action, name, store=store)
        return json.dumps([time.perf_counter() - wall, time.process_time() - cpu])
    finally:
        os.fsync = real_fsync
"""


async def in_cell(
    session: Session, action: str, name: str, store: str, fsync: bool = True
) -> tuple[float, float]:
    out = await run_cell(session, f"print(_ck_timed({action!r}, {name!r}, {store!r}, {fsync}))")
    wall, cpu = json.loads(out)
    return wall, cpu


async def run_cell(session: Session, code: str) -> str:
    out: list[str] = []
    reply: Any = None
    async for msg in session.execute(ExecuteMessage(code=code)):
        if msg.type == MessageType.OUTPUT and msg.stream == "stdout":  # type: ignore[attr-defined]
            out.append(msg.data)  # type: ignore[attr-defined]
        reply = msg
    if reply is None or reply.type != MessageType.EXECUTE_REPLY or reply.status != "ok":
        raise RuntimeError(f"cell failed: {code[:80]!r}: {reply}")
    return "".join(out)


async def checkpoint(session: Session, action: str, name: str, store: str) -> tuple[float, Any]:
    start = time.perf_counter()
    reply: Any = await session.request(CheckpointMessage(action=action, name=name, store=store))
    elapsed = time.perf_counter() - start
    if reply.status != "ok":
        raise RuntimeError(f"{action} {name}: {reply.ename}: {reply.evalue}")
    return elapsed, reply.result


def stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2)}


async def bench(runs: int, tmp: Path, kishu_python: str | None) -> dict[str, Any]:
    data_file = tmp / "data.txt"
    data_file.write_text("line1\nline2\nline3\n")
    results: dict[str, Any] = {}
    async with Session() as main:
        await run_cell(main, f"DATA_FILE = {str(data_file)!r}\n{WORKLOAD}\ndel DATA_FILE")
        raw = json.loads(await run_cell(main, RAW_BYTES))
        results["raw_bytes"] = {"by_name": raw, "total": sum(raw.values())}

        # Full checkpoints, each into an empty store.
        engine, trip, written = [], [], []
        for i in range(runs):
            rtt, res = await checkpoint(main, "save", "full", str(tmp / f"full-{i}"))
            engine.append(res["seconds"])
            trip.append(rtt)
            written.append(res["bytes_written"])
        await run_cell(main, IN_CELL)
        cell_wall, cell_cpu = [], []
        for i in range(runs):
            wall, cpu = await in_cell(main, "save", "full", str(tmp / f"cell-full-{i}"))
            cell_wall.append(wall)
            cell_cpu.append(cpu)
        nosync = []
        for i in range(runs):
            wall, _ = await in_cell(main, "save", "full", str(tmp / f"nosync-{i}"), fsync=False)
            nosync.append(wall)
        results["full"] = {
            "engine": stats_ms(engine),
            "round_trip": stats_ms(trip),
            "in_cell_wall": stats_ms(cell_wall),
            "in_cell_cpu": stats_ms(cell_cpu),
            "in_cell_wall_without_fsync": stats_ms(nosync),
            "bytes_written": written[0],
            "size_ratio": round(written[0] / results["raw_bytes"]["total"], 3),
            "skipped": res["skipped"],
            "statuses": {k: v["status"] for k, v in res["saved"].items()},
        }

        # Incremental: change one entry of d, save again into the same store.
        store = str(tmp / "full-0")
        engine, trip, written, reused = [], [], [], []
        for i in range(runs):
            await run_cell(main, f"d['k1'] = ({i}, {i} / 7, 'changed {i}')")
            rtt, res = await checkpoint(main, "save", f"inc-{i}", store)
            engine.append(res["seconds"])
            trip.append(rtt)
            written.append(res["bytes_written"])
            reused.append(res["reused"])
        cell_wall, cell_cpu = [], []
        for i in range(runs):
            await run_cell(main, f"d['k1'] = ({i}, {i} / 7, 'in cell {i}')")
            wall, cpu = await in_cell(main, "save", f"cell-inc-{i}", str(tmp / "cell-full-0"))
            cell_wall.append(wall)
            cell_cpu.append(cpu)
        nosync = []
        for i in range(runs):
            await run_cell(main, f"d['k1'] = ({i}, {i} / 7, 'no fsync {i}')")
            wall, _ = await in_cell(main, "save", f"ns-{i}", str(tmp / "nosync-0"), fsync=False)
            nosync.append(wall)
        results["incremental"] = {
            "engine": stats_ms(engine),
            "round_trip": stats_ms(trip),
            "in_cell_wall": stats_ms(cell_wall),
            "in_cell_cpu": stats_ms(cell_cpu),
            "in_cell_wall_without_fsync": stats_ms(nosync),
            "bytes_written": int(statistics.median(written)),
            "reused_blobs": reused[0],
            "d_blob_bytes": res["saved"]["d"]["size"],
        }

        # dill, in the same worker, on the names it can pickle.
        dill_file = tmp / "namespace.dill"
        dill_save = json.loads(
            await run_cell(
                main,
                f"PATH, NAMES = {str(dill_file)!r}, {DILL_NAMES!r}\n{DILL_SAVE}\ndel PATH, NAMES",
            )
        )

    # Restore into fresh workers (numpy and pandas already imported).
    engine, trip, imports, cell_wall, cell_cpu = [], [], [], [], []
    for i in range(2 * runs):
        async with Session() as fresh:
            start = time.perf_counter()
            await run_cell(fresh, "import numpy, pandas\n" + IN_CELL)
            imports.append(time.perf_counter() - start)
            if i % 2 == 0:  # native request
                rtt, res = await checkpoint(fresh, "restore", "full", str(tmp / "full-0"))
                engine.append(res["seconds"])
                trip.append(rtt)
            else:  # from a cell
                wall, cpu = await in_cell(fresh, "restore", "full", str(tmp / "full-0"))
                cell_wall.append(wall)
                cell_cpu.append(cpu)
            check = await run_cell(fresh, "print(arr.shape[0], len(df), len(points), f(2))")
            assert check.split() == ["1000000", "100000", "1000", "4"], check
    results["restore_fresh_worker"] = {
        "engine": stats_ms(engine),
        "round_trip": stats_ms(trip),
        "in_cell_wall": stats_ms(cell_wall),
        "in_cell_cpu": stats_ms(cell_cpu),
        "import_numpy_pandas": stats_ms(imports),
        "failed": res["failed"],
        "skipped": res["skipped"],
    }

    loads = []
    for _ in range(runs):
        async with Session() as fresh:
            await run_cell(fresh, "import numpy, pandas")
            out = json.loads(
                await run_cell(fresh, f"PATH = {str(dill_file)!r}\n{DILL_LOAD}\ndel PATH")
            )
            loads.append(out["seconds"])
    results["dill"] = {
        "version": dill_save["dill"],
        "names": DILL_NAMES,
        "dumps": stats_ms([dill_save["seconds"]]),
        "bytes": dill_save["bytes"],
        "size_ratio": round(dill_save["bytes"] / results["raw_bytes"]["total"], 3),
        "loads_fresh_worker": stats_ms(loads),
        "cannot_pickle": {k: v for k, v in dill_save["errors"].items() if v},
        "note": "dumps measured once (single call after the checkpoint runs)",
    }
    if kishu_python:
        results["kishu"] = bench_kishu(kishu_python, runs, tmp)
    else:
        results["kishu"] = {"available": False, "note": "not run (no --kishu-python)"}
    return results


def goals(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    full = results["full"]["engine"]["median_ms"]
    ratio = results["full"]["size_ratio"]
    restore = results["restore_fresh_worker"]["engine"]["median_ms"]
    inc = results["incremental"]["engine"]["median_ms"]
    inc_bytes = results["incremental"]["bytes_written"]
    return {
        "full_ms": {"value": full, "goal": GOALS["full_ms"], "met": full < GOALS["full_ms"]},
        "full_size_ratio": {
            "value": ratio,
            "goal": GOALS["full_size_ratio"],
            "met": ratio <= GOALS["full_size_ratio"],
        },
        "restore_ms": {
            "value": restore,
            "goal": GOALS["restore_ms"],
            "met": restore < GOALS["restore_ms"],
        },
        "incremental_ms": {
            "value": inc,
            "goal": GOALS["incremental_ms"],
            "met": inc < GOALS["incremental_ms"],
        },
        "incremental_bytes": {
            "value": inc_bytes,
            "goal": GOALS["incremental_bytes"],
            "met": inc_bytes < GOALS["incremental_bytes"],
        },
    }


def table(results: dict[str, Any]) -> str:
    mb = 1e6
    raw = results["raw_bytes"]["total"]
    full, inc = results["full"], results["incremental"]
    restore, dill = results["restore_fresh_worker"], results["dill"]
    rows = [
        ("", "engine (median / min)", "round trip", "in cell: wall / CPU", "bytes", "vs raw"),
        (
            "pyrepl3 full checkpoint",
            f"{full['engine']['median_ms']:.1f} / {full['engine']['min_ms']:.1f} ms",
            f"{full['round_trip']['median_ms']:.1f} ms",
            f"{full['in_cell_wall']['median_ms']:.1f} / {full['in_cell_cpu']['median_ms']:.1f} ms",
            f"{full['bytes_written'] / mb:.2f} MB",
            f"{full['size_ratio']:.2f}x",
        ),
        (
            "pyrepl3 restore (fresh worker)",
            f"{restore['engine']['median_ms']:.1f} / {restore['engine']['min_ms']:.1f} ms",
            f"{restore['round_trip']['median_ms']:.1f} ms",
            f"{restore['in_cell_wall']['median_ms']:.1f} / {restore['in_cell_cpu']['median_ms']:.1f} ms",
            "",
            "",
        ),
        (
            "pyrepl3 incremental (d['k1'])",
            f"{inc['engine']['median_ms']:.1f} / {inc['engine']['min_ms']:.1f} ms",
            f"{inc['round_trip']['median_ms']:.1f} ms",
            f"{inc['in_cell_wall']['median_ms']:.1f} / {inc['in_cell_cpu']['median_ms']:.1f} ms",
            f"{inc['bytes_written'] / mb:.3f} MB",
            "",
        ),
        (
            "dill.dumps (picklable names)",
            f"{dill['dumps']['median_ms']:.1f} ms",
            "",
            "",
            f"{dill['bytes'] / mb:.2f} MB",
            f"{dill['size_ratio']:.2f}x",
        ),
        (
            "dill.loads (fresh worker)",
            f"{dill['loads_fresh_worker']['median_ms']:.1f} / {dill['loads_fresh_worker']['min_ms']:.1f} ms",
            "",
            "",
            "",
            "",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"raw bytes (in memory): {raw / mb:.2f} MB {results['raw_bytes']['by_name']}")
    lines.append(
        f"numpy+pandas import in the fresh worker (not in restore): "
        f"{restore['import_numpy_pandas']['median_ms']:.0f} ms"
    )
    lines.append(
        "diagnostic, the same saves with fsync disabled (wall, median): full "
        f"{full['in_cell_wall_without_fsync']['median_ms']:.1f} ms, incremental "
        f"{inc['in_cell_wall_without_fsync']['median_ms']:.1f} ms"
    )
    lines.append(f"dill cannot pickle: {dill['cannot_pickle'] or 'nothing'}")
    kishu = results["kishu"]
    if kishu.get("available"):
        lines.append(
            f"kishu {kishu['version']} ({kishu['how']}): commit after the workload cell "
            f"{kishu['commit_full']['median_ms']:.0f} ms, database +{kishu['db_bytes_full'] / mb:.2f} MB; "
            f"commit after d['k1'] {kishu['commit_incremental']['median_ms']:.0f} ms, "
            f"+{kishu['db_bytes_incremental'] / mb:.3f} MB; checkout (same process) "
            f"{kishu['checkout_same_process']['median_ms']:.0f} ms"
        )
    else:
        lines.append(f"kishu: {kishu['note']}")
    for name, goal in results["goals"].items():
        mark = "met" if goal["met"] else "MISSED"
        lines.append(f"goal {name}: {goal['value']} (goal {goal['goal']}): {mark}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--kishu-python", help="a Python with kishu, numpy, pandas, IPython (see the docstring)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyrepl3-bench-ckpt-") as tmp:
        os.environ["PYREPL3_CHECKPOINT_DIR"] = os.path.join(tmp, "default-store")
        os.environ.setdefault("IPYTHONDIR", os.path.join(tmp, "ipython"))
        results = asyncio.run(bench(args.runs, Path(tmp), args.kishu_python))
    results["goals"] = goals(results)
    results["meta"] = {
        "pyrepl3": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checkpoint.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out / 'checkpoint.json'}")


if __name__ == "__main__":
    main()
