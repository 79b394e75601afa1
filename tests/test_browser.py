"""JupyterLab in headless Chromium, driven by Playwright, on a pyrepl3 kernel.

``jupyter lab`` (with the test kernelspecs, the pyrepl3 extension on as in
the venv) serves a notebook made beforehand with kernelspec ``pyrepl3``. The
page runs, cell by cell: a print, an HTML display, an ``input()`` answered by
typing into the page's stdin box, a cell that kills the worker
(``os._exit(3)``), and a cell after it. What a person would see is checked:
the printed text, the HTML element, the echoed answer, an error naming
WorkerDied and exit code 3, no "Kernel Restarting" / "appears to have died"
dialog, and the last cell's output. On failure a screenshot and the page
text go to the test's tmp dir.

Needs Debian's ``chromium`` (/usr/bin/chromium; scripts/setup.sh installs
it) and the ``playwright`` and ``jupyterlab`` pip packages (dev extras);
Playwright's own browser download is never used.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
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
pytestmark = [
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"no Chromium at {CHROMIUM} (Debian package 'chromium'; scripts/setup.sh installs it)",
    ),
    pytest.mark.skipif(
        bool(_missing), reason=f"pip packages missing: {', '.join(_missing)} (dev extras)"
    ),
    pytest.mark.timeout(240),
]

CELLS = [
    "print('hello from pyrepl3')",
    "from IPython.display import HTML, display\n"
    "display(HTML('<b class=\"pyrepl3-html\">bold from pyrepl3</b>'))",
    "name = input('your name? ')\nprint('hi ' + name)",
    "import os\nos._exit(3)",
    "print('alive after the crash')",
    "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])",
]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def lab(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    import nbformat

    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "pyrepl3", "display_name": "PyREPL3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(code) for code in CELLS]
    nbformat.write(nb, root / "crash.ipynb")
    with running_server(
        "lab",
        base,
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        timeout=120,
    ) as server:
        yield server


def _run_cell(page: Any, index: int) -> Any:
    """Click into cell ``index``'s editor and press Shift+Enter."""
    cell = page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    return cell


def _wait_done(cell: Any) -> None:
    """Until the cell's prompt shows an execution count (not ``[*]``)."""
    from playwright.sync_api import expect

    prompt = cell.locator(".jp-InputArea-prompt")
    expect(prompt).to_have_text(re.compile(r"\[\d+\]"), timeout=TIMEOUT_MS)


def test_jupyterlab_notebook_survives_a_worker_crash(lab: JupyterServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        try:
            page.goto(f"{lab.url}/lab/tree/crash.ipynb?token={lab.token}")
            # The kernel is up when the toolbar's kernel status says idle.
            expect(page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell")).to_have_count(
                len(CELLS)
            )
            expect(
                page.locator(
                    ".jp-NotebookPanel-toolbar .jp-KernelName, .jp-Toolbar-kernelName"
                ).first
            ).to_contain_text("PyREPL3")
            idle = page.locator(".jp-NotebookPanel-toolbar [data-status='idle']")
            idle.first.wait_for(timeout=TIMEOUT_MS)

            # 1: print
            cell = _run_cell(page, 0)
            _wait_done(cell)
            expect(cell.locator(".jp-OutputArea-output")).to_contain_text("hello from pyrepl3")

            # 2: HTML display: a real element in the page
            cell = _run_cell(page, 1)
            _wait_done(cell)
            html = cell.locator(".jp-OutputArea-output b.pyrepl3-html")
            expect(html).to_have_text("bold from pyrepl3")

            # 3: input(): type into the stdin box, Enter
            cell = _run_cell(page, 2)
            box = cell.locator(".jp-Stdin-input")
            box.wait_for(timeout=TIMEOUT_MS)
            expect(cell.locator(".jp-Stdin-prompt")).to_contain_text("your name?")
            box.click()
            box.type("Ada")
            box.press("Enter")
            _wait_done(cell)
            outputs = cell.locator(".jp-OutputArea")
            expect(outputs).to_contain_text("your name? Ada")  # the echoed answer
            expect(outputs).to_contain_text("hi Ada")

            # 4: the worker dies: an error output, no kernel-died dialog
            cell = _run_cell(page, 3)
            _wait_done(cell)
            stderr = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
            error = cell.locator(stderr).filter(has_text="WorkerDied")
            expect(error).to_have_count(1)
            expect(error).to_contain_text("exit code 3")

            # 5: the next cell runs on the same kernel
            cell = _run_cell(page, 4)
            _wait_done(cell)
            expect(cell.locator(".jp-OutputArea-output")).to_contain_text("alive after the crash")

            # 6: a plot shows as an image (inline backend, also in a warm worker)
            cell = _run_cell(page, 5)
            _wait_done(cell)
            image = cell.locator(".jp-OutputArea-output[data-mime-type='image/png'] img")
            expect(image).to_have_count(1)
            assert image.evaluate("img => img.naturalWidth") > 100

            text = page.locator("body").inner_text()
            assert page.locator(".jp-Dialog").count() == 0, page.locator(".jp-Dialog").inner_text()
            for words in ("Kernel Restarting", "appears to have died", "Dead kernel"):
                assert words not in text, words
            assert not dialogs, dialogs
            page.screenshot(path=str(tmp_path / "jupyterlab.png"), full_page=True)
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
