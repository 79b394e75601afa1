"""Time-travel benchmark: checkouts, incremental automatic saves, store growth.

One supervised ``Session`` per part, each with its own autosave directory,
on the checkpoint issue's 12-object workload (benchmarks/workloads.py):

* **checkout, small change**: the workload (In [1]), ``d['k1'] = ...``
  (In [2]), then ``checkout(1)`` and ``checkout(2)`` alternately: the report's
  ``seconds`` (in the worker) and the native call's round trip.
* **checkout 10 cells back**: ten small cells (each changes ``d`` and binds a
  name), then a checkout of the state ten cells back.
* **incremental automatic save** after ``d['k1'] = ...``: the work in the
  forked child (``save_seconds`` in the state's manifest: pickling what
  changed, hashing, writing, the manifest), and the bytes added; side by side
  with the same save done in full (``PYREPL3_STATES_FULL_EVERY=1``, the
  full saves among them: every name pickled again but a big dict's unchanged
  parts), measured in the same run. Its
  phases (``save_phases``/``save_faults`` in the manifest: seconds and the
  memory pages faulted in, mostly copy-on-write copies), the worker's own
  cost before the fork (``scan_seconds``: finding the big dict's changed
  parts, see worker/checkpoint/parts.py), and, in a session
  of its own with a probe loaded into the worker, the rest of the child's
  life: recording the state (``history.record``), the ``auto`` manifest,
  retention, the file-system flush, and the child's total CPU time and page
  faults from fork to exit.
* **untouched 1 GB array**: ``big = np.ones(125_000_000)`` in the workload,
  then a small cell: the child's work for that state.
* **store growth** over 100 small cells (``d['k1'] = i``, ``s = i``): bytes
  per cell on disk (blobs, manifests, states).
* **a huge array** (``--huge-gb``, default 2): first save, a save after
  changing 1% of it (one slice), a save with it untouched, and crash to
  answered with it restored, against reading its chunks from the store's
  files (as the page cache has them).
* **Kishu** (``--kishu-python PY``, see bench_checkpoint.py): its checkout and
  commits from bench_checkpoint's harness, when a Python with kishu is given.

Writes ``benchmarks/results/time_travel.json`` and prints a table.

    .venv/bin/python benchmarks/bench_time_travel.py [--runs 5] [--big-gb 1.0]
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

from bench_checkpoint import bench_kishu, run_cell
from workloads import CHECKPOINT as WORKLOAD

from pyrepl3_kernel import __version__
from pyrepl3_kernel.protocol import ExecuteMessage
from pyrepl3_kernel.session import Session

RESULTS = Path(__file__).resolve().parent / "results"

GOALS = {
    "checkout_small_ms": 50.0,
    "incremental_save_ms": 5.0,
    "untouched_big_save_ms": 20.0,
}


def ms(values: list[float]) -> dict[str, float]:
    out = [v * 1000 for v in values]
    return {"median_ms": round(statistics.median(out), 2), "min_ms": round(min(out), 2)}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


#: Loaded into a worker by :func:`child_tail`: times what a saving child does
#: after its manifest (the manifest cannot hold it) and its whole CPU time,
#: written to ``<dir>/child-<pid>.json`` when the child's last step ends.
PROBE = """
import json, os, resource, time
from pyrepl3_kernel.worker.checkpoint import history, store

times = {}


def timed(owner, name, last=False):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
            if last:
                usage = resource.getrusage(resource.RUSAGE_SELF)
                times["child_cpu"] = usage.ru_utime + usage.ru_stime
                times["child_faults"] = usage.ru_minflt
                with open(os.path.join(OUT, f"child-{os.getpid()}.json"), "w") as f:
                    json.dump(times, f)
                times.clear()

    setattr(owner, name, wrapper)


def install(out):
    global OUT
    OUT = out
    timed(history.History, "record")
    timed(history.History, "enforce")
    timed(store.Store, "write_manifest")
    timed(store.Store, "sync", last=True)
"""


def newest_state(autosave: Path) -> dict[str, Any]:
    path = sorted((autosave / "states").glob("*.json"))[-1]
    return json.loads(path.read_text())  # type: ignore[no-any-return]


async def workload_session(tmp: Path, name: str, env: dict[str, str] | None = None) -> Session:
    data_file = tmp / "data.txt"
    data_file.write_text("line1\nline2\nline3\n")
    session = Session(autosave=str(tmp / name), env=env)
    await session.start()
    await run_cell(session, f"DATA_FILE = {str(data_file)!r}\n{WORKLOAD}\ndel DATA_FILE")
    await session.states()  # the first (full) save lands
    return session


async def incremental_saves(
    session: Session,
    autosave: Path,
    runs: int,
    probe: Path | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """``runs`` saves after ``d['k1'] = ...``; ``full``: only the saves
    that were full ones count (``PYREPL3_STATES_FULL_EVERY=1`` makes every
    other save a full one)."""
    seconds, cpu, added, incremental, scans = [], [], [], [], []
    phases: dict[str, list[float]] = {}
    faults: dict[str, list[int]] = {}
    tails: list[dict[str, float]] = []
    for i in range(3 * runs):
        if len(seconds) == runs:
            break
        await run_cell(session, f"d['k1'] = ({i}, {i} / 7, 'changed {i}')")
        await session.states()
        state = newest_state(autosave)
        if full and state["incremental"]:
            continue
        seconds.append(state["save_seconds"])
        cpu.append(state["save_cpu_seconds"])
        added.append(state["bytes_added"])
        incremental.append(state["incremental"])
        if "scan_seconds" in state:
            scans.append(state["scan_seconds"])
        for phase, value in state.get("save_phases", {}).items():
            phases.setdefault(phase, []).append(value)
            faults.setdefault(phase, []).append(state["save_faults"][phase])
        phases.setdefault("setup", []).append(
            state["save_seconds"] - sum(state.get("save_phases", {}).values())
        )
        if probe is not None:
            newest = max(probe.glob("child-*.json"), key=lambda p: p.stat().st_mtime)
            tails.append(json.loads(newest.read_text()))
            newest.unlink()
    out = {
        "child_work": ms(seconds),
        "child_cpu": ms(cpu),
        "bytes_added": int(statistics.median(added)),
        "incremental": all(incremental),
        "phases_ms": {k: round(statistics.median(v) * 1000, 3) for k, v in phases.items()},
        "phase_faults": {k: int(statistics.median(v)) for k, v in faults.items()},
        "parts": state.get("save_parts", {}),
        "scan_before_fork": ms(scans) if scans else None,
    }
    if tails:
        out["after_manifest_ms"] = {
            k: round(statistics.median(t.get(k, 0.0) for t in tails) * 1000, 3)
            for k in ("record", "write_manifest", "enforce", "sync")
        }
        out["whole_child_cpu"] = ms([t["child_cpu"] for t in tails])
        out["whole_child_faults"] = int(statistics.median(t["child_faults"] for t in tails))
    return out


async def child_tail(tmp: Path, runs: int) -> dict[str, Any]:
    """The incremental save again, with :data:`PROBE` loaded into the worker."""
    session = await workload_session(tmp, "probe")
    out = tmp / "probe-out"
    out.mkdir()
    (tmp / "tt_probe.py").write_text(PROBE)
    try:
        await run_cell(
            session,
            f"import sys\nsys.path.insert(0, {str(tmp)!r})\nimport tt_probe\n"
            f"tt_probe.install({str(out)!r})\ndel tt_probe, sys",
        )
        await session.states()
        for stale in out.glob("child-*.json"):
            stale.unlink()
        return await incremental_saves(session, tmp / "probe", runs, probe=out)
    finally:
        await session.shutdown()


async def huge_array(tmp: Path, gb: float) -> dict[str, Any]:
    """A ``gb`` GB array: first save, a save after changing 1% of it (one
    contiguous slice), a save with it untouched, and crash to answered with
    it restored, against reading its chunks from the file system."""
    autosave = tmp / "huge"
    session = Session(autosave=str(autosave))
    await session.start()
    out: dict[str, Any] = {"gb": gb}
    try:
        n = int(gb * 1e9) // 8
        # Random data: chunks of equal bytes (np.ones) would be stored once.
        await run_cell(session, f"import numpy as np\nhuge = np.random.default_rng(5).random({n})")
        await session.states()
        state = newest_state(autosave)
        out["first_save"] = {
            "child_work_s": round(state["save_seconds"], 2),
            "bytes_added": state["bytes_added"],
        }
        await run_cell(session, f"huge[:{n // 100}] += 1.0")
        await session.states()
        state = newest_state(autosave)
        out["save_after_1pct_change"] = {
            "child_work_s": round(state["save_seconds"], 3),
            "bytes_added": state["bytes_added"],
            "fraction_written": round(state["bytes_added"] / (n * 8), 4),
        }
        await run_cell(session, "small = 1")
        await session.states()
        state = newest_state(autosave)
        out["save_untouched"] = {
            "child_work_ms": round(state["save_seconds"] * 1000, 2),
            "bytes_added": state["bytes_added"],
        }
        expected = await run_cell(session, "print(float(huge.sum()))")
        await session.states()  # the save after that cell lands before the crash
        start = time.perf_counter()
        async for _msg in session.execute(ExecuteMessage(code="import os\nos._exit(1)")):
            pass
        answer = await run_cell(session, "print(float(huge.sum()))")
        crash_to_answered = time.perf_counter() - start
        out["crash_to_answered_s"] = round(crash_to_answered, 2)
        out["restored_equal"] = answer == expected
        # The same bytes read from the store's files (page cache as it is).
        manifest = json.loads((autosave / "auto.json").read_text())
        digests = manifest["names"]["huge"]["chunks"]["0"]
        buf = bytearray(4 << 20)
        start = time.perf_counter()
        for digest in digests:
            with open(autosave / "objects" / digest, "rb") as f:
                f.readinto(buf)
        out["read_chunks_s"] = round(time.perf_counter() - start, 2)
        out["ratio_to_read"] = round(crash_to_answered / max(out["read_chunks_s"], 1e-6), 2)
    finally:
        await session.shutdown()
    return out


async def bench(
    runs: int, big_gb: float, tmp: Path, kishu_python: str | None, huge_gb: float = 0.0
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    env = dict(os.environ)
    if runs == 0:  # the huge array alone
        return {"huge_array": await huge_array(tmp, huge_gb)}

    session = await workload_session(tmp, "main")
    try:
        autosave = tmp / "main"
        results["first_save"] = {
            "child_work_ms": round(newest_state(autosave)["save_seconds"] * 1000, 2)
        }
        results["incremental_save"] = await incremental_saves(session, autosave, runs)
        # Checkout of a small change, back and forth.
        first = (await session.states())["states"][0]["cell_number"]
        await run_cell(session, "d['k1'] = ('a', 'small', 'change')")
        changed = (await session.states())["states"][-1]["cell_number"]
        worker, trip, unchanged = [], [], []
        for i in range(runs):
            target = first if i % 2 == 0 else changed
            start = time.perf_counter()
            report = await session.checkout(target)
            trip.append(time.perf_counter() - start)
            worker.append(report["seconds"])
            unchanged.append(sum(1 for e in report["saved"].values() if e.get("unchanged")))
            await session.states()  # its own state lands before the next one
        results["checkout_small_change"] = {
            "in_worker": ms(worker),
            "round_trip": ms(trip),
            "names_left_in_place": int(statistics.median(unchanged)),
        }
        # 10 cells back.
        for i in range(10):
            await run_cell(session, f"d['k{i}'] = {i}\nv{i} = [{i}] * 100")
        states = (await session.states())["states"]
        back = states[-11]["cell_number"]
        start = time.perf_counter()
        report = await session.checkout(back)
        results["checkout_10_cells_back"] = {
            "in_worker_ms": round(report["seconds"] * 1000, 2),
            "round_trip_ms": round((time.perf_counter() - start) * 1000, 2),
            "removed": len(report["removed"]),
        }
        # Store growth over 100 small cells.
        await session.states()
        before = du(autosave)
        for i in range(100):
            await run_cell(session, f"d['k1'] = {i}\ns = {i}")
        await session.states()
        grown = du(autosave) - before
        results["store_growth_100_cells"] = {"bytes": grown, "bytes_per_cell": grown // 100}
    finally:
        await session.shutdown()

    # The same incremental save, done in full (every name pickled again).
    full_env = {**env, "PYREPL3_STATES_FULL_EVERY": "1"}
    session = await workload_session(tmp, "full", env=full_env)
    try:
        results["full_resave"] = await incremental_saves(session, tmp / "full", runs, full=True)
    finally:
        await session.shutdown()

    # A big array that the cells do not touch.
    session = await workload_session(tmp, "big")
    try:
        n = int(big_gb * 1e9) // 8
        start = time.perf_counter()
        await run_cell(session, f"big = np.ones({n})")
        await session.states()
        first_big = newest_state(tmp / "big")
        seconds, cpu = [], []
        for i in range(runs):
            await run_cell(session, f"small_{i} = {i}")
            await session.states()
            seconds.append(newest_state(tmp / "big")["save_seconds"])
            cpu.append(newest_state(tmp / "big")["save_cpu_seconds"])
        results["untouched_big_array"] = {
            "gb": big_gb,
            "first_save_child_work_ms": round(first_big["save_seconds"] * 1000, 1),
            "first_save_wall_ms": round((time.perf_counter() - start) * 1000, 1),
            "skipped": first_big["names"]["big"]["status"] == "skipped",
            "small_cell_child_work": ms(seconds),
            "small_cell_child_cpu": ms(cpu),
        }
    finally:
        await session.shutdown()

    results["child_tail"] = await child_tail(tmp, runs)

    if huge_gb > 0:
        results["huge_array"] = await huge_array(tmp, huge_gb)

    if kishu_python:
        results["kishu"] = bench_kishu(kishu_python, runs, tmp)
    else:
        results["kishu"] = {"available": False, "note": "not measured: pass --kishu-python"}
    return results


def tail_rows(tail: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not tail or "after_manifest_ms" not in tail:
        return []
    after = tail["after_manifest_ms"]
    return [
        (
            "  after its manifest (ms)",
            ", ".join(f"{k} {v}" for k, v in after.items()),
            "",
        ),
        (
            "  the child's whole CPU time, fork to exit",
            f"{tail['whole_child_cpu']['median_ms']} ms",
            f"{tail['whole_child_faults']} pages faulted in",
        ),
    ]


def table(results: dict[str, Any]) -> str:
    if "incremental_save" not in results:
        return json.dumps(results, indent=1)
    inc, full = results["incremental_save"], results["full_resave"]
    co, back = results["checkout_small_change"], results["checkout_10_cells_back"]
    big = results["untouched_big_array"]
    kishu = results["kishu"]
    rows = [
        (
            "checkout, small change (worker)",
            f"{co['in_worker']['median_ms']} ms",
            f"< {GOALS['checkout_small_ms']:.0f} ms",
        ),
        ("checkout, small change (round trip)", f"{co['round_trip']['median_ms']} ms", ""),
        ("checkout 10 cells back (worker)", f"{back['in_worker_ms']} ms", ""),
        (
            "incremental save after d['k1']=... (child)",
            f"{inc['child_work']['median_ms']} ms",
            f"< {GOALS['incremental_save_ms']:.0f} ms",
        ),
        ("  its CPU time", f"{inc['child_cpu']['median_ms']} ms", ""),
        (
            "  the worker's scan of d before the fork",
            f"{(inc.get('scan_before_fork') or {}).get('median_ms')} ms",
            "finds the changed parts (in the worker)",
        ),
        (
            "  its phases (ms; pages faulted in)",
            ", ".join(
                f"{k} {v}" + (f" ({inc['phase_faults'][k]})" if k in inc["phase_faults"] else "")
                for k, v in inc["phases_ms"].items()
            ),
            "",
        ),
        *tail_rows(results.get("child_tail")),
        (
            "same save in full (child)",
            f"{full['child_work']['median_ms']} ms",
            f"ratio {full['child_work']['median_ms'] / max(inc['child_work']['median_ms'], 1e-6):.1f}x",
        ),
        (
            "  its CPU time",
            f"{full['child_cpu']['median_ms']} ms",
            f"ratio {full['child_cpu']['median_ms'] / max(inc['child_cpu']['median_ms'], 1e-6):.1f}x",
        ),
        ("bytes added by that save", f"{inc['bytes_added']}", ""),
        (
            f"small cell, untouched {big['gb']} GB array (child)",
            f"{big['small_cell_child_work']['median_ms']} ms",
            f"< {GOALS['untouched_big_save_ms']:.0f} ms",
        ),
        ("  its CPU time", f"{big['small_cell_child_cpu']['median_ms']} ms", ""),
        (
            "store growth, 100 small cells",
            f"{results['store_growth_100_cells']['bytes_per_cell']} B/cell",
            "",
        ),
    ]
    if kishu.get("available"):
        rows.append(
            (
                "Kishu checkout (same process)",
                f"{kishu['checkout_same_process']['median_ms']} ms",
                "",
            )
        )
        rows.append(
            ("Kishu commit after d['k1']=...", f"{kishu['commit_incremental']['median_ms']} ms", "")
        )
    huge = results.get("huge_array")
    if huge:
        g = huge["gb"]
        rows += [
            (f"{g} GB array: first save (child)", f"{huge['first_save']['child_work_s']} s", ""),
            (
                f"{g} GB array: save after 1% change",
                f"{huge['save_after_1pct_change']['fraction_written'] * 100:.2f}% written",
                "< 5%",
            ),
            (
                f"{g} GB array: save untouched",
                f"{huge['save_untouched']['bytes_added']} B",
                "nothing",
            ),
            (
                f"{g} GB array: crash to answered",
                f"{huge['crash_to_answered_s']} s",
                f"{huge['ratio_to_read']}x reading its chunks ({huge['read_chunks_s']} s); goal 2x",
            ),
        ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>14}  {c}" for a, b, c in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="0: the huge array alone")
    parser.add_argument("--big-gb", type=float, default=1.0)
    parser.add_argument("--huge-gb", type=float, default=2.0, help="0: skip the huge array")
    parser.add_argument("--kishu-python", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-tt-") as tmp:
        results = asyncio.run(
            bench(args.runs, args.big_gb, Path(tmp), args.kishu_python, args.huge_gb)
        )
    results["meta"] = {
        "pyrepl3": __version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "time_travel.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    meta = results["meta"]
    print(f"load average before {meta['load_average_before']}, after {meta['load_average_after']}")


if __name__ == "__main__":
    main()
