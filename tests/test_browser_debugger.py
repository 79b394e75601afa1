"""JupyterLab's visual debugger in headless Chromium on a pyrepl3 kernel.

The page opens a PyREPL3 notebook, turns the debugger on with the bug icon in
the notebook's toolbar, sets a breakpoint by clicking the cell's breakpoint
gutter, runs the cell, and sees the debugger's variables panel show a local
variable's value while the cell is stopped; Continue lets the cell finish
with its result. Stopped again, the worker is killed: the cell ends with
WorkerDied naming SIGKILL and the debugger's paused overlay goes away, with
no kernel-died dialog. The screenshots (``debugger-stopped.png``,
``debugger-after-crash.png``) are kept in the test's tmp dir, as on failure
the page's screenshot and text. Same requirements as tests/test_browser.py (Chromium, playwright,
jupyterlab: tests/jupyterlab_helpers.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyterlab_helpers import BROWSER_MARKS, TIMEOUT_MS, lab_page, run_cell, running_lab, wait_done
from test_rest_api import JupyterServer

pytestmark = BROWSER_MARKS


def _turn_on(bug: Any) -> None:
    """Click the bug icon until it shows pressed (up to three clicks: a click
    that lands while JupyterLab still sets up the notebook's debugger
    handler, right after the kernel came up, is lost)."""
    from playwright.sync_api import expect

    for attempt in range(3):
        bug.click()
        try:
            expect(bug).to_have_attribute("aria-pressed", "true", timeout=10_000)
            return
        except AssertionError:
            if attempt == 2:
                raise


def _debugged_worker(root: Path) -> int:
    """The pid of the notebook's worker: a worker process whose working
    directory is the notebook's and in which the debugger started (it has
    a cell directory)."""
    import psutil

    from pyrepl3_kernel.worker.cellnames import cell_directory

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if not any("pyrepl3_kernel.worker" in part for part in proc.info["cmdline"] or []):
                continue
            if Path(proc.cwd()) == root and Path(cell_directory(proc.pid)).is_dir():
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    assert len(found) == 1, f"the notebook's worker, one of {found}"
    return found[0]


CELL = "def compute(a, b):\n    total = a * b\n    return total\n\ncompute(6, 7)"
BREAKPOINT_LINE = 3  # return total: a, b and total are set


@pytest.fixture(scope="module")
def lab(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    with running_lab(tmp_path_factory.mktemp("lab-debugger"), "debug.ipynb", [CELL]) as server:
        yield server


def test_jupyterlab_debugger_stops_at_a_gutter_breakpoint(
    lab: JupyterServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)  # a loaded machine loads the page slowly
    with lab_page(lab, tmp_path, 1600) as page:
        page.goto(f"{lab.url}/lab/tree/debug.ipynb?token={lab.token}")
        cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell")
        expect(cells).to_have_count(1)
        page.locator(".jp-NotebookPanel-toolbar [data-status='idle']").first.wait_for()

        # The bug icon is enabled only for a kernel that advertises the
        # debugger (kernel_info debugger: true).
        bug = page.locator(".jp-NotebookPanel-toolbar .jp-DebuggerBugButton").first
        expect(bug).to_be_enabled()
        _turn_on(bug)
        expect(page.locator(".jp-DebuggerVariables").first).to_be_visible()

        # A breakpoint by clicking the gutter next to the cell's line 3.
        cell = cells.nth(0)
        gutter = cell.locator(".cm-gutter.cm-breakpoint-gutter .cm-gutterElement")
        expect(gutter.nth(BREAKPOINT_LINE)).to_be_visible()
        gutter.nth(BREAKPOINT_LINE).dispatch_event("mousedown")
        expect(cell.locator(".cm-breakpoint-icon")).to_have_count(1)

        # Run: the cell stops, the variables panel shows the locals.
        run_cell(page, 0)
        variables = page.locator(".jp-DebuggerVariables-body").first
        expect(variables).to_contain_text("total", timeout=TIMEOUT_MS)
        expect(variables).to_contain_text("42")
        expect(page.locator(".jp-DebuggerCallstackFrame-name").first).to_contain_text("compute")
        page.screenshot(path=str(tmp_path / "debugger-stopped.png"), full_page=True)

        # Continue: the cell finishes with its result.
        page.locator(".jp-DebuggerPausedButton").first.click()
        wait_done(cell)
        expect(cell.locator(".jp-OutputArea-output")).to_contain_text("42")
        assert page.locator(".jp-Dialog").count() == 0, page.locator(".jp-Dialog").inner_text()
        print(f"screenshot at the breakpoint: {tmp_path / 'debugger-stopped.png'}")

        # Stopped again, the worker is killed: the cell ends with the
        # cause, the debugger's paused overlay goes away (the terminated
        # event), and no kernel-died dialog shows.
        run_cell(page, 0)
        paused = page.locator(".jp-DebuggerPausedButton")
        expect(paused.first).to_be_visible()
        worker = _debugged_worker(lab.base / "root")
        os.kill(worker, signal.SIGKILL)
        wait_done(cell)
        error = cell.locator(".jp-OutputArea-output").filter(has_text="WorkerDied")
        expect(error.first).to_contain_text("SIGKILL")
        expect(paused).to_have_count(0)
        # The call stack of the dead worker is cleared.
        expect(page.locator(".jp-DebuggerCallstackFrame-name")).to_have_count(0)
        assert page.locator(".jp-Dialog").count() == 0, page.locator(".jp-Dialog").inner_text()
        page.screenshot(path=str(tmp_path / "debugger-after-crash.png"), full_page=True)
