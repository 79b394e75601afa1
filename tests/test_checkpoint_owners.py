"""Checkpoints shared by several kernels, and the cell numbers they report.

Names are shared by every kernel using a store; a save never replaces a
checkpoint another notebook saved (or, for kernels without a notebook such as
a console, another kernel) unless forced, and ``%checkpoint list`` says who
saved what. Every cell number a checkpoint message shows is one the user saw
as a prompt (the ``execution_count`` of ``execute_input`` and
``execute_reply``), and a restore does not move the prompt numbers on.

Real kernels through jupyter_client (both kernelspecs), each test with a
checkpoint store of its own.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults.helpers import Kernel, autosave_root, wait_until
from jupyter_helpers import KERNEL_NAME, KERNEL_NAMES, Run

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")

CRASH = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default checkpoint store of the kernels this test starts; no
    kernel of it has a notebook unless given one."""
    monkeypatch.setenv("PYREPL3_CHECKPOINT_DIR", str(tmp_path / "store"))
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    return tmp_path / "store"


@pytest.fixture
def kernels() -> Iterator[list[Kernel]]:
    """Kernels a test starts; all shut down at the end, also on failure."""
    started: list[Kernel] = []
    try:
        yield started
    finally:
        for kernel in started:
            kernel.close()


def start(kernels: list[Kernel], kernel_name: str, notebook: str | None = None) -> Kernel:
    kernel = Kernel(kernel_name, env={"JPY_SESSION_NAME": notebook} if notebook else None)
    kernels.append(kernel)
    return kernel


def notebook_path() -> tuple[str, str]:
    """A notebook path as jupyter_server gives it (absolute, in the kernel's
    working directory), and as checkpoint messages show it."""
    shown = f"notebooks/nb-{uuid.uuid4().hex[:8]}.ipynb"
    return os.path.join(os.getcwd(), shown), shown


def prompt(run: Run) -> int:
    """The cell's number as the user saw it: execute_input and the reply agree."""
    (shown,) = [
        m["content"]["execution_count"] for m in run.iopub if m["msg_type"] == "execute_input"
    ]
    assert run.reply["content"]["execution_count"] == shown, (shown, run.reply["content"])
    return int(shown)


def refused(kernel: Kernel, code: str) -> str:
    """The UsageError ``code`` fails with (IPython shows it on stderr)."""
    run = kernel.execute(code)
    reply = run.reply["content"]
    assert reply["status"] == "error" and reply["ename"] == "UsageError", reply
    assert f"UsageError: {reply['evalue']}" in run.stderr()
    return str(reply["evalue"])


def autosave_of(marker: str) -> Path:
    """The automatic checkpoint (``auto.json``) of the kernel that defined ``marker``."""

    def find() -> Path | None:
        for manifest in autosave_root().glob("*/auto.json"):
            try:
                if marker in json.loads(manifest.read_text())["names"]:
                    return manifest
            except (OSError, ValueError, KeyError):
                continue
        return None

    return wait_until(find, 30, f"the automatic checkpoint holding {marker}")  # type: ignore[no-any-return]


def comm_request(kernel: Kernel, **data: Any) -> dict[str, Any]:
    """One request on a new ``pyrepl3.checkpoint`` comm; the reply's data."""
    msg = kernel.kc.session.msg(
        "comm_open",
        {"comm_id": uuid.uuid4().hex, "target_name": "pyrepl3.checkpoint", "data": data},
    )
    kernel.kc.shell_channel.send(msg)
    (answer,) = [
        m["content"]["data"]
        for m in kernel.iopub_of(msg["header"]["msg_id"])
        if m["msg_type"] == "comm_msg"
    ]
    return answer  # type: ignore[no-any-return]


@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_a_save_does_not_replace_another_notebooks_checkpoint(
    kernel_name: str, store: Path, kernels: list[Kernel]
) -> None:
    path_a, shown_a = notebook_path()
    path_b, shown_b = notebook_path()
    a = start(kernels, kernel_name, path_a)
    b = start(kernels, kernel_name, path_b)
    a.ok("x = 'from a'")
    saved_in = prompt(a.ok("%checkpoint save shared"))
    b.ok("x = 'from b'")

    message = refused(b, "%checkpoint save shared")
    assert f"checkpoint 'shared' was saved by notebook {shown_a} (cell {saved_in}, " in message
    assert "%checkpoint save shared --force" in message
    manifest = json.loads((store / "shared.json").read_text())
    assert manifest["saved_by"]["notebook"] == path_a and manifest["cell_number"] == saved_in
    restored = b.ok("%checkpoint restore shared")
    assert f"as of cell {saved_in} of notebook {shown_a}\n" in restored.stdout()
    assert b.value("x") == "'from a'"  # the refused save wrote nothing

    # --force replaces it, and says what it replaced.
    b.ok("x = 'from b'")
    forced = b.ok("%checkpoint save shared --force")
    forced_in = prompt(forced)
    assert f"  replaced the checkpoint 'shared' of cell {saved_in} of notebook {shown_a}, " in (
        forced.stdout()
    )
    # The list says which notebook saved what, and which are this notebook's.
    listed = a.ok("%checkpoint list").stdout()
    assert listed.startswith("shared: 1 name, ") and (
        f" B, cell {forced_in} of notebook {shown_b}, " in listed
    ), listed
    assert "(this notebook)" not in listed
    listed = b.ok("%checkpoint list").stdout()
    assert f"cell {forced_in} of notebook {shown_b} (this notebook), " in listed
    # Now a is the one refused.
    assert f"was saved by notebook {shown_b} (cell {forced_in}, " in refused(
        a, "%checkpoint save shared"
    )

    # A notebook's checkpoints are its own in any of its kernels (a kernel
    # restarted, the notebook reopened): no --force needed.
    a.ok("mine = 1")
    own_in = prompt(a.ok("%checkpoint save mine"))
    again = start(kernels, kernel_name, path_a)
    again.ok("mine = 2")
    replaced = again.ok("%checkpoint save mine")
    assert f"replaced the checkpoint 'mine' of cell {own_in} of notebook {shown_a}, " in (
        replaced.stdout()
    )


@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_kernels_without_a_notebook_own_what_they_saved(
    kernel_name: str, store: Path, kernels: list[Kernel]
) -> None:
    """Consoles: a kernel replaces its own checkpoint (also after its worker
    crashed and was replaced), not another console's."""
    first = start(kernels, kernel_name)
    second = start(kernels, kernel_name)
    first.ok("v = 1")
    first.ok("%checkpoint save console")
    first.ok("v = 2")
    saved_in = prompt(first.ok("%checkpoint save console"))  # its own: replaced

    message = refused(second, "%checkpoint save console")
    assert "checkpoint 'console' was saved by kernel " in message
    assert f"(cell {saved_in}, " in message
    if kernel_name == KERNEL_NAME:  # a pooled kernel knows jupyter_client's kernel id
        assert f"was saved by kernel {first.km.kernel_id[:8]} " in message
    assert "(this kernel)" in first.ok("%checkpoint list").stdout()
    assert "(this kernel)" not in second.ok("%checkpoint list").stdout()

    crashed = first.execute(CRASH)
    assert crashed.status == "error"
    first.ok("v = 3")
    first.ok("%checkpoint save console")  # still its own after the crash
    second.ok("%checkpoint restore console")
    assert second.value("v") == "3"


@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_cell_numbers_are_the_prompts_the_user_saw(
    kernel_name: str, store: Path, kernels: list[Kernel]
) -> None:
    path, shown = notebook_path()
    a = start(kernels, kernel_name, path)
    for code in ("p = 1", "q = 2", "r = p + q"):
        a.ok(code)
    saved_in = prompt(a.ok("%checkpoint save cells"))
    assert saved_in == 4
    origin = f"cell {saved_in} of notebook {shown}"
    listed = a.ok("%checkpoint list").stdout()
    assert listed.startswith("cells: 3 names, ") and f" B, {origin} (this notebook), " in listed
    info = a.ok("%checkpoint info cells").stdout()
    assert info.startswith("checkpoint 'cells': ") and f", {origin} (this notebook), " in info
    answer = comm_request(a, action="info", name="cells")
    assert answer["status"] == "ok", answer
    assert answer["result"]["cell_number"] == saved_in
    assert answer["result"]["saved_by"]["notebook"] == path
    listed = comm_request(a, action="list")["result"]["checkpoints"]
    assert [(c["name"], c["cell_number"], c["saved_here"]) for c in listed] == [
        ("cells", saved_in, True)
    ]
    # A save through the comm, between cells: the number of the last cell run.
    last = prompt(a.ok("t = 4"))
    answer = comm_request(a, action="save", name="between")
    assert answer["result"]["cell_number"] == last == 7

    # A new console restores it in its second cell; the prompts go on from 2.
    b = start(kernels, kernel_name)
    marker = f"before_{uuid.uuid4().hex[:12]}"
    assert prompt(b.ok(f"{marker} = 1")) == 1
    autosaved = autosave_of(marker)
    restored = b.ok("%checkpoint restore cells")
    assert prompt(restored) == 2
    assert restored.stdout().startswith("checkpoint 'cells': 3 names restored in ")
    assert f" ms, as of {origin}\n" in restored.stdout()
    answer = comm_request(b, action="restore", name="cells", clear=False)
    assert answer["result"]["cell_number"] == saved_in
    after = b.ok("s = r * 2")
    assert prompt(after) == 3
    # A crash now: the note names the last cell this console ran, whose
    # automatic checkpoint holds the restored state.
    wait_until(lambda: json.loads(autosaved.read_text())["cell_number"] == 3, 30, "cell 3's save")
    crashed = b.execute(CRASH)
    assert prompt(crashed) == 4
    assert "restored 4 variables as of cell 3: p, q, r, s\n" in crashed.stderr(), crashed.stderr()
    assert prompt(b.ok("s")) == 5
    assert b.value("s") == "6"
