"""JupyterLab's visual debugger in headless Chromium on a pyrepl3 kernel.

The page opens a PyREPL3 notebook, turns the debugger on with the bug icon in
the notebook's toolbar, sets a breakpoint by clicking the cell's breakpoint
gutter, runs the cell, and sees the debugger's variables panel show a local
variable's value while the cell is stopped; Continue lets the cell finish
with its result. The screenshot taken while stopped is kept in the test's
tmp dir (``debugger-stopped.png``), as on failure the page's screenshot and
text. Same requirements as tests/test_browser.py (Chromium, playwright,
jupyterlab), which this reuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, _run_cell, _wait_done
from test_browser import pytestmark as browser_marks
from test_rest_api import JupyterServer, running_server

pytestmark = browser_marks

CELL = "def compute(a, b):\n    total = a * b\n    return total\n\ncompute(6, 7)"
BREAKPOINT_LINE = 3  # return total: a, b and total are set


@pytest.fixture(scope="module")
def lab(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    import nbformat

    base = tmp_path_factory.mktemp("lab-debugger")
    root = base / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "pyrepl3", "display_name": "PyREPL3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(CELL)]
    nbformat.write(nb, root / "debug.ipynb")
    with running_server(
        "lab",
        base,
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        timeout=120,
    ) as server:
        yield server


def test_jupyterlab_debugger_stops_at_a_gutter_breakpoint(
    lab: JupyterServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)  # a loaded machine loads the page slowly
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(f"{lab.url}/lab/tree/debug.ipynb?token={lab.token}")
            cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell")
            expect(cells).to_have_count(1)
            page.locator(".jp-NotebookPanel-toolbar [data-status='idle']").first.wait_for()

            # The bug icon is enabled only for a kernel that advertises the
            # debugger (kernel_info debugger: true).
            bug = page.locator(".jp-NotebookPanel-toolbar .jp-DebuggerBugButton").first
            expect(bug).to_be_enabled()
            bug.click()
            expect(page.locator(".jp-DebuggerVariables").first).to_be_visible()

            # A breakpoint by clicking the gutter next to the cell's line 3.
            cell = cells.nth(0)
            gutter = cell.locator(".cm-gutter.cm-breakpoint-gutter .cm-gutterElement")
            expect(gutter.nth(BREAKPOINT_LINE)).to_be_visible()
            gutter.nth(BREAKPOINT_LINE).dispatch_event("mousedown")
            expect(cell.locator(".cm-breakpoint-icon")).to_have_count(1)

            # Run: the cell stops, the variables panel shows the locals.
            _run_cell(page, 0)
            variables = page.locator(".jp-DebuggerVariables-body").first
            expect(variables).to_contain_text("total", timeout=TIMEOUT_MS)
            expect(variables).to_contain_text("42")
            expect(page.locator(".jp-DebuggerCallstackFrame-name").first).to_contain_text("compute")
            page.screenshot(path=str(tmp_path / "debugger-stopped.png"), full_page=True)

            # Continue: the cell finishes with its result.
            page.locator(".jp-DebuggerPausedButton").first.click()
            _wait_done(cell)
            expect(cell.locator(".jp-OutputArea-output")).to_contain_text("42")
            assert page.locator(".jp-Dialog").count() == 0, page.locator(".jp-Dialog").inner_text()
            print(f"screenshot at the breakpoint: {tmp_path / 'debugger-stopped.png'}")
        except BaseException:
            with_suffix = tmp_path / "failure"
            try:
                page.screenshot(path=f"{with_suffix}.png", full_page=True)
                Path(f"{with_suffix}.txt").write_text(page.locator("body").inner_text())
            finally:
                print(
                    f"screenshot and page text: {with_suffix}.png / .txt\nserver log:\n{lab.log()}"
                )
            raise
        finally:
            browser.close()
