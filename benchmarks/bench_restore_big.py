"""A big array after a worker crash: crash to answered, against reading it from disk.

The time-travel issue's goal: with a ``--gb`` GB array (random float64, so
every 4 MiB chunk is stored) in the namespace, the time from a crash to the
answer of the next cell that uses the array (the worker replaced, the state
restored, ``huge.sum()`` answered) within 2x of the time to read those bytes
from the disk.

"The time to read 2 GB from the disk" is measured three ways in the same
run, each in a fresh interpreter (as the restore runs in a fresh worker),
on the very chunk files the restore reads:

* ``reused_buffer``: every chunk file read into one reused 4 MiB buffer
  (how bench_time_travel.py measures it: no memory of 2 GB is needed);
* ``new_memory``: the chunk files read into 2 GB of new memory (anonymous
  pages, what ``f.read()``, a ``bytearray`` or malloc get): the memory is
  part of the cost of having 2 GB read, and the restore pays it too;
* ``new_memory_hashed``: the same, plus the xxh3-128 of every chunk (the
  restore checks every chunk against its digest);
* ``new_numpy``: into a new numpy array, as ``np.fromfile``/``np.load`` would
  (numpy asks for transparent huge pages: on a VM that hands freed memory
  back to its host, fresh huge pages cost more than small ones).

All of them read one file after the other in one thread; each reports its
wall time and its CPU time (a loaded machine stretches the first). Where the time
goes: ``new_memory_alone`` is 2 GB of new memory faulted in and nothing read
(what the restore pays that ``reused_buffer`` does not).

With ``--cold`` the chunk files are dropped from the page cache before every
measurement (``posix_fadvise(DONTNEED)`` after a sync), for the restore and
the baselines alike; otherwise the page cache is as the save left it.

The crash to answered is also taken apart (same store, a second session
without autosave): starting a new worker, the restore request (its time in
the worker and its round trip) and the ``huge.sum()`` cell.

    .venv/bin/python benchmarks/bench_restore_big.py [--gb 2] [--runs 3] [--cold]

Writes ``benchmarks/results/restore_big.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from bench_checkpoint import checkpoint, run_cell

from pyrepl3_kernel import __version__
from pyrepl3_kernel.protocol import ExecuteMessage
from pyrepl3_kernel.session import Session

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 2.0

#: Run in a fresh interpreter: read the chunk files (argv[2:]) the way
#: argv[1] says; prints the seconds.
READER = r"""
import mmap, os, sys, time
import numpy as np
import xxhash
how, paths = sys.argv[1], sys.argv[2:]
sizes = [os.path.getsize(p) for p in paths]
start, cpu = time.perf_counter(), time.process_time()
if how == "new_memory_alone":  # the memory the restore needs, faulted in, nothing read
    out = mmap.mmap(-1, sum(sizes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
elif how == "reused_buffer":
    buf = bytearray(max(sizes))
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            f.readinto(buf)
else:
    if how == "new_numpy":  # numpy's allocator (it asks for transparent huge pages)
        out = memoryview(np.empty(sum(sizes), dtype=np.uint8))
    else:  # what malloc, bytearray or f.read() get for 2 GB: anonymous pages
        out = memoryview(mmap.mmap(-1, sum(sizes)))
    pos = 0
    for p, n in zip(paths, sizes):
        with open(p, "rb", buffering=0) as f:
            f.readinto(out[pos : pos + n])
        if how == "new_memory_hashed":
            xxhash.xxh3_128(out[pos : pos + n]).hexdigest()
        pos += n
print(time.perf_counter() - start, time.process_time() - cpu)
"""

BASELINES = (
    "reused_buffer",
    "new_memory",
    "new_memory_hashed",
    "new_numpy",
    "new_memory_alone",
)


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (they must be clean: synced)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_baseline(how: str, paths: list[Path], cold: bool) -> tuple[float, float]:
    """Seconds of wall time and of CPU time (every thread, user and system)."""
    if cold:
        evict(paths)
    out = subprocess.run(
        [sys.executable, "-c", READER, how, *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall, cpu = out.stdout.split()
    return float(wall), float(cpu)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def crash_to_answered(session: Session, paths: list[Path], cold: bool) -> tuple[float, str]:
    if cold:
        evict(paths)
    start = time.perf_counter()
    async for _msg in session.execute(ExecuteMessage(code="import os\nos._exit(1)")):
        pass
    answer = await run_cell(session, "print(float(huge.sum()))")
    return time.perf_counter() - start, answer


async def parts(store: Path, paths: list[Path], cold: bool) -> dict[str, float]:
    """The crash to answered taken apart: a new worker, the restore of the
    same store, the cell."""
    if cold:
        evict(paths)
    start = time.perf_counter()
    session = Session(autosave=False)
    await session.start()
    try:
        started = time.perf_counter()
        assert session.pid is not None
        cpu = cpu_seconds(session.pid)
        trip, result = await checkpoint(session, "restore", "auto", str(store))
        restored = time.perf_counter()
        cpu = cpu_seconds(session.pid) - cpu
        await run_cell(session, "print(float(huge.sum()))")
        answered = time.perf_counter()
    finally:
        await session.shutdown()
    return {
        "worker_start_s": started - start,
        "restore_in_worker_s": float(result["seconds"]),
        "restore_round_trip_s": trip,
        "restore_cpu_s": cpu,
        "restore_to_answered_s": restored - started,
        "sum_cell_s": answered - restored,
    }


async def bench(gb: float, runs: int, cold: bool, tmp: Path) -> dict[str, Any]:
    store = tmp / "autosave"
    session = Session(autosave=str(store))
    await session.start()
    n = int(gb * 1e9) // 8
    samples: dict[str, list[float]] = {"crash_to_answered_s": []}
    samples.update({f"read_{how}_s": [] for how in BASELINES})
    samples.update({f"read_{how}_cpu_s": [] for how in BASELINES})
    breakdown: list[dict[str, float]] = []
    loads: list[list[float]] = []
    equal = True
    try:
        await run_cell(session, f"import numpy as np\nhuge = np.random.default_rng(5).random({n})")
        expected = await run_cell(session, "print(float(huge.sum()))")
        await session.states()  # the save lands before the first crash
        manifest = json.loads((store / "auto.json").read_text())
        digests = manifest["names"]["huge"]["chunks"]["0"]
        paths = [store / "objects" / d for d in digests]
        for _ in range(runs):
            loads.append(load_average())
            seconds, answer = await crash_to_answered(session, paths, cold)
            samples["crash_to_answered_s"].append(seconds)
            equal = equal and answer == expected
            for how in BASELINES:
                wall, cpu = read_baseline(how, paths, cold)
                samples[f"read_{how}_s"].append(wall)
                samples[f"read_{how}_cpu_s"].append(cpu)
            breakdown.append(await parts(store, paths, cold))
    finally:
        await session.shutdown()
    med = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    out: dict[str, Any] = {
        "gb": gb,
        "cold": cold,
        "runs": runs,
        "restored_equal": equal,
        "median": med,
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
        "breakdown_median": {
            k: round(statistics.median(b[k] for b in breakdown), 3) for k in breakdown[0]
        },
        "ratios": {
            how: round(med["crash_to_answered_s"] / max(med[f"read_{how}_s"], 1e-6), 2)
            for how in BASELINES
        },
        "load_average": loads,
    }
    return out


def table(r: dict[str, Any]) -> str:
    med, parts_, ratios = r["median"], r["breakdown_median"], r["ratios"]
    cache = "cold page cache" if r["cold"] else "page cache as the save left it"
    rows = [
        (f"{r['gb']} GB array, {cache}, median of {r['runs']}", "", ""),
        ("crash to answered (huge.sum())", f"{med['crash_to_answered_s']} s", f"goal {GOAL}x"),
    ]
    for how in BASELINES:
        what = "only new memory" if how == "new_memory_alone" else f"read its chunks: {how}"
        rows.append(
            (what, f"{med[f'read_{how}_s']} s", f"{ratios[how]}x; CPU {med[f'read_{how}_cpu_s']} s")
        )
    rows += [
        ("  parts: new worker started", f"{parts_['worker_start_s']} s", ""),
        ("  parts: restore (in the worker)", f"{parts_['restore_in_worker_s']} s", ""),
        ("  parts: restore (round trip)", f"{parts_['restore_round_trip_s']} s", ""),
        ("  parts: restore (the worker's CPU)", f"{parts_['restore_cpu_s']} s", ""),
        ("  parts: huge.sum() cell", f"{parts_['sum_cell_s']} s", ""),
        ("restored bit-for-bit", str(r["restored_equal"]), ""),
        ("load average per run", " ".join(str(x[0]) for x in r["load_average"]), ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a:<{width}}  {b:>10}  {c}" for a, b, c in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop the chunks from the page cache")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp:
        results = asyncio.run(bench(args.gb, args.runs, args.cold, Path(tmp)))
    results["meta"] = {
        "pyrepl3": __version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "restore_big_cold.json" if args.cold else "restore_big.json"
    (out / name).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
