"""Autosave cost per state-changing cell: automatic checkpoints on vs off.

Side by side in the same run, on the same machine: a supervised ``Session``
with automatic checkpoints (its own temporary autosave directory) and one
without (``autosave=False``). Each round starts both and runs, in each:

* ``x = x + 1`` 100 times back to back (each cell sent when the previous
  reply came: a state-changing cell every ~millisecond, far faster than a
  save completes, so saves fall behind and the states are coalesced);
* ``1+1`` 100 times (inert: no save at all; the floor);
* a burst: 100 ``x = x + 1`` sent at once (queued in the worker), wall time
  to the last reply, per cell.

Prints per-cell medians (of the per-round medians), the ratio on/off, and,
for the autosave session, how many states the history kept and how many
cells they cover. A cell never waits for a save (see docs/checkpoints.md,
"Coalescing"): the ratio is the cost of forking the saves, not of waiting.

    .venv/bin/python benchmarks/bench_autosave_cost.py [--rounds 3] [--cells 100]

Writes ``benchmarks/results/autosave_cost.json``.
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

from pyrepl3_kernel import __version__
from pyrepl3_kernel.protocol import ExecuteMessage
from pyrepl3_kernel.session import Session

RESULTS = Path(__file__).resolve().parent / "results"


async def run_cell(session: Session, code: str) -> float:
    started = time.perf_counter()
    async for msg in session.execute(ExecuteMessage(code=code)):
        if getattr(msg, "status", "ok") == "error":
            raise RuntimeError(f"{code!r} failed: {msg}")
    return time.perf_counter() - started


async def one_round(autosave: bool, cells: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-autosave-") as tmp:
        store = os.path.join(tmp, "auto") if autosave else False
        async with Session(autosave=store) as s:
            await run_cell(s, "x = 0")
            await run_cell(s, "1+1")
            changing = [await run_cell(s, "x = x + 1") for _ in range(cells)]
            inert = [await run_cell(s, "1+1") for _ in range(cells)]
            started = time.perf_counter()
            await asyncio.gather(*(run_cell(s, "x = x + 1") for _ in range(cells)))
            burst = (time.perf_counter() - started) / cells
            out: dict[str, Any] = {
                "changing_ms": statistics.median(changing) * 1e3,
                "inert_ms": statistics.median(inert) * 1e3,
                "burst_ms": burst * 1e3,
            }
            if autosave:
                states = (await s.states())["states"]
                out["states_kept"] = len(states)
                out["coalesced_states"] = sum(
                    1 for st in states if st.get("covers") and st["covers"][0] < st["cell_number"]
                )
                out["cells_saved_for"] = 3 * cells + 2
            return out


async def main(rounds: int, cells: int) -> dict[str, Any]:
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    for _ in range(rounds):  # alternate, so that load drift hits both alike
        on.append(await one_round(True, cells))
        off.append(await one_round(False, cells))

    def med(results: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in results)

    figures: dict[str, Any] = {}
    for key in ("changing_ms", "inert_ms", "burst_ms"):
        figures[key] = {
            "autosave_on": round(med(on, key), 3),
            "autosave_off": round(med(off, key), 3),
            "ratio": round(med(on, key) / med(off, key), 2),
        }
    figures["states_kept"] = [r["states_kept"] for r in on]
    figures["coalesced_states"] = [r["coalesced_states"] for r in on]
    return figures


def report(figures: dict[str, Any], cells: int) -> None:
    rows = [
        (f"x = x + 1, {cells} back to back (p50 per cell)", figures["changing_ms"]),
        (f"1+1, {cells} back to back (p50 per cell)", figures["inert_ms"]),
        (f"x = x + 1, {cells} sent at once (per cell)", figures["burst_ms"]),
    ]
    print(f"{'':48} {'autosave on':>12} {'off':>9} {'on/off':>7}")
    for label, row in rows:
        print(
            f"{label:48} {row['autosave_on']:>9.2f} ms {row['autosave_off']:>6.2f} ms "
            f"{row['ratio']:>6.2f}x"
        )
    print(
        f"states kept per round: {figures['states_kept']} "
        f"(of which coalesced: {figures['coalesced_states']})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cells", type=int, default=100)
    args = parser.parse_args()
    figures = asyncio.run(main(args.rounds, args.cells))
    report(figures, args.cells)
    RESULTS.mkdir(exist_ok=True)
    result = {
        "benchmark": "autosave_cost",
        "version": __version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0],
        "rounds": args.rounds,
        "cells": args.cells,
        **figures,
    }
    (RESULTS / "autosave_cost.json").write_text(json.dumps(result, indent=2) + "\n")
