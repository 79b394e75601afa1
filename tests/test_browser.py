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

Needs Chromium, playwright and jupyterlab (tests/jupyterlab_helpers.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyterlab_helpers import BROWSER_MARKS, TIMEOUT_MS, lab_page, run_cell, running_lab, wait_done
from test_rest_api import JupyterServer

pytestmark = BROWSER_MARKS

CELLS = [
    "print('hello from pyrepl3')",
    "from IPython.display import HTML, display\n"
    "display(HTML('<b class=\"pyrepl3-html\">bold from pyrepl3</b>'))",
    "name = input('your name? ')\nprint('hi ' + name)",
    "import os\nos._exit(3)",
    "print('alive after the crash')",
    "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])",
]


@pytest.fixture(scope="module")
def lab(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    with running_lab(tmp_path_factory.mktemp("lab"), "crash.ipynb", CELLS) as server:
        yield server


def test_jupyterlab_notebook_survives_a_worker_crash(lab: JupyterServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with lab_page(lab, tmp_path, 1400) as page:
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{lab.url}/lab/tree/crash.ipynb?token={lab.token}")
        # The kernel is up when the toolbar's kernel status says idle.
        expect(page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell")).to_have_count(
            len(CELLS)
        )
        expect(
            page.locator(".jp-NotebookPanel-toolbar .jp-KernelName, .jp-Toolbar-kernelName").first
        ).to_contain_text("PyREPL3")
        idle = page.locator(".jp-NotebookPanel-toolbar [data-status='idle']")
        idle.first.wait_for(timeout=TIMEOUT_MS)

        # 1: print
        cell = run_cell(page, 0)
        wait_done(cell)
        expect(cell.locator(".jp-OutputArea-output")).to_contain_text("hello from pyrepl3")

        # 2: HTML display: a real element in the page
        cell = run_cell(page, 1)
        wait_done(cell)
        html = cell.locator(".jp-OutputArea-output b.pyrepl3-html")
        expect(html).to_have_text("bold from pyrepl3")

        # 3: input(): type into the stdin box, Enter
        cell = run_cell(page, 2)
        box = cell.locator(".jp-Stdin-input")
        box.wait_for(timeout=TIMEOUT_MS)
        expect(cell.locator(".jp-Stdin-prompt")).to_contain_text("your name?")
        box.click()
        box.type("Ada")
        box.press("Enter")
        wait_done(cell)
        outputs = cell.locator(".jp-OutputArea")
        expect(outputs).to_contain_text("your name? Ada")  # the echoed answer
        expect(outputs).to_contain_text("hi Ada")

        # 4: the worker dies: an error output, no kernel-died dialog
        cell = run_cell(page, 3)
        wait_done(cell)
        stderr = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
        error = cell.locator(stderr).filter(has_text="WorkerDied")
        expect(error).to_have_count(1)
        expect(error).to_contain_text("exit code 3")

        # 5: the next cell runs on the same kernel
        cell = run_cell(page, 4)
        wait_done(cell)
        expect(cell.locator(".jp-OutputArea-output")).to_contain_text("alive after the crash")

        # 6: a plot shows as an image (inline backend, also in a warm worker)
        cell = run_cell(page, 5)
        wait_done(cell)
        image = cell.locator(".jp-OutputArea-output[data-mime-type='image/png'] img")
        expect(image).to_have_count(1)
        assert image.evaluate("img => img.naturalWidth") > 100

        text = page.locator("body").inner_text()
        assert page.locator(".jp-Dialog").count() == 0, page.locator(".jp-Dialog").inner_text()
        for words in ("Kernel Restarting", "appears to have died", "Dead kernel"):
            assert words not in text, words
        assert not dialogs, dialogs
        page.screenshot(path=str(tmp_path / "jupyterlab.png"), full_page=True)
