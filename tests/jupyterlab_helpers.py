"""What the JupyterLab browser tests (test_browser, test_browser_debugger)
share: the marks that skip them without Chromium, playwright or jupyterlab,
``jupyter lab`` serving one notebook (:func:`running_lab`), a headless
Chromium page that leaves a screenshot, the page's text and the server's log
on failure (:func:`lab_page`), and running a cell as a person does.

Needs Debian's ``chromium`` (/usr/bin/chromium; scripts/setup.sh installs
it) and the ``playwright`` and ``jupyterlab`` pip packages (dev extras);
Playwright's own browser download is never used.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_rest_api import JupyterServer, running_server

CHROMIUM = os.environ.get("PYREPL3_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]

_missing = [m for m in ("playwright", "jupyterlab") if importlib.util.find_spec(m) is None]
#: A browser test module's ``pytestmark``.
BROWSER_MARKS = [
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"no Chromium at {CHROMIUM} (Debian package 'chromium'; scripts/setup.sh installs it)",
    ),
    pytest.mark.skipif(
        bool(_missing), reason=f"pip packages missing: {', '.join(_missing)} (dev extras)"
    ),
    pytest.mark.timeout(240),
]
TIMEOUT_MS = 60_000


@contextmanager
def running_lab(base: Path, notebook: str, cells: list[str]) -> Iterator[JupyterServer]:
    """``jupyter lab`` in ``base`` (stopped on exit), serving ``base/root``
    where ``notebook`` holds ``cells`` with kernelspec ``pyrepl3``."""
    import nbformat

    root = base / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "pyrepl3", "display_name": "PyREPL3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(code) for code in cells]
    nbformat.write(nb, root / notebook)
    with running_server(
        "lab",
        base,
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        timeout=120,
    ) as server:
        yield server


@contextmanager
def lab_page(lab: JupyterServer, tmp_path: Path, width: int) -> Iterator[Any]:
    """A page of headless Chromium, ``width`` x 1000, closed on exit; on
    failure its screenshot and text go to ``tmp_path/failure.png`` / ``.txt``
    and the server's log is printed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            yield page
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


def run_cell(page: Any, index: int) -> Any:
    """Click into cell ``index``'s editor and press Shift+Enter."""
    cell = page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    return cell


def wait_done(cell: Any) -> None:
    """Until the cell's prompt shows an execution count (not ``[*]``)."""
    from playwright.sync_api import expect

    prompt = cell.locator(".jp-InputArea-prompt")
    expect(prompt).to_have_text(re.compile(r"\[\d+\]"), timeout=TIMEOUT_MS)
