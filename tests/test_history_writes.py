"""IPython's history database is written between cells (worker/history.py):
every cell's input still reaches it, in one commit per burst of cells."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")


def _rows_with(marker: str, deadline_s: float = 15.0) -> list[str]:
    """The history rows whose source holds ``marker``, once there are any
    (polled for at most ``deadline_s``)."""
    db = Path(os.environ["IPYTHONDIR"]) / "profile_default" / "history.sqlite"
    deadline = time.monotonic() + deadline_s
    rows: list[str] = []
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as conn:
                rows = [
                    r[0]
                    for r in conn.execute(
                        "SELECT source_raw FROM history WHERE source_raw LIKE ?", (f"%{marker}%",)
                    )
                ]
        if rows:
            return rows
        time.sleep(0.05)
    return rows


def test_a_cell_reaches_the_history_database(kernel: Any) -> None:
    marker = uuid.uuid4().hex
    assert kernel.execute(f"x_{marker} = 1").reply["content"]["status"] == "ok"
    assert _rows_with(marker) == [f"x_{marker} = 1"]


def test_every_cell_of_a_burst_reaches_it(kernel: Any) -> None:
    marker = uuid.uuid4().hex
    for i in range(20):
        assert kernel.execute(f"'{marker}', {i}").reply["content"]["status"] == "ok"
    deadline = time.monotonic() + 15
    rows = _rows_with(marker)
    while len(rows) < 20 and time.monotonic() < deadline:
        rows = _rows_with(marker)
    assert sorted(rows) == sorted(f"'{marker}', {i}" for i in range(20))


def test_history_search_sees_the_cell_just_run(kernel: Any) -> None:
    """A search reads the database: what the worker holds back is written first."""
    marker = uuid.uuid4().hex
    kernel.execute(f"y_{marker} = 2")
    msg_id = kernel.kc.history(hist_access_type="search", pattern=f"*{marker}*", raw=True)
    reply = kernel.reply_to(msg_id)
    assert [entry[2] for entry in reply["content"]["history"]] == [f"y_{marker} = 2"]


def test_history_is_deferred_also_after_an_autosave_fork(kernel: Any) -> None:
    """IPython restarts its history thread after every fork (autosave forks
    after a cell that changed something): the new thread is held back too."""
    marker = uuid.uuid4().hex
    kernel.execute(f"v_{marker} = [1]")  # not inert: an autosave forks
    kernel.execute(f"v_{marker}.append(2)")
    rows = _rows_with(marker)
    deadline = time.monotonic() + 15
    while len(rows) < 2 and time.monotonic() < deadline:
        rows = _rows_with(marker)
    assert rows == [f"v_{marker} = [1]", f"v_{marker}.append(2)"]
