"""What the pooled provisioner tells the user, and where.

- A launch that falls back to a cold kernel warns where the user looks:
  in the application's log (``jupyter console``, shown once), and on stderr
  for a script that runs a notebook with nbclient without configuring
  logging (jupyter_client's logger there has only a NullHandler, so the
  warning was lost).
- Starting the manager daemon is routine: ``jupyter console`` does not show
  it.

A kernelspec with a pool size the daemon refuses (``-3``) makes every
launch fall back to cold.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from pool_helpers import PoolSetup, cli, pooled_kernelspec, processes_naming

NAME = "pyrepl3-messages"
BAD = "pyrepl3-messages-bad-pool"
CONSOLE = Path(sys.executable).with_name("jupyter-console")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FALLBACK = "starting it cold"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolSetup]:
    with pooled_kernelspec(tmp_path_factory.mktemp("messages"), NAME) as pool:
        pool.add_spec(BAD, pool_size=-3)
        yield pool


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Iterator[Path]:
    """A runtime dir of the test's own (no daemon yet); its daemon is
    stopped at the end."""
    path = tmp_path / "runtime"
    yield path
    cli("stop", "--runtime-dir", str(path), check=False, timeout=60)
    assert processes_naming(str(path)) == []


#: Runs a one-cell notebook with nbclient, logging left as it is.
NBCLIENT = textwrap.dedent(
    """
    import sys
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    NotebookClient(nb, kernel_name=sys.argv[1], timeout=60).execute()
    print("OUTPUT", nb.cells[0].outputs[0]["text"].strip())
    """
)


def test_a_cold_fallback_warns_on_stderr_when_logging_is_not_configured(
    setup: PoolSetup, runtime_dir: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NBCLIENT, BAD],
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "OUTPUT 42" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if FALLBACK in line]
    assert len(warnings) == 1, done.stderr
    assert "WARNING" in warnings[0] and "pool.size must be an integer" in warnings[0]


def run_console(kernel_name: str, runtime_dir: Path, cwd: Path) -> str:
    """``jupyter console`` on ``kernel_name``: print one value, exit; all it
    showed."""
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir), "TERM": "xterm"}
    child = pexpect.spawn(
        str(CONSOLE),
        ["--kernel", kernel_name, "--simple-prompt"],
        cwd=str(cwd),
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 400),
    )
    try:
        child.expect(r"In \[1\]: ")
        shown = child.before
        child.sendline("print(6 * 7)")
        child.expect(r"In \[2\]: ")
        shown += child.before
        child.sendline("exit")
        child.expect(pexpect.EOF)
        shown += child.before
    finally:
        child.close(force=True)
    text = ANSI.sub("", shown).replace("\r", "")
    assert "42" in text, text
    return text


def test_the_console_does_not_show_the_daemon_starting(
    setup: PoolSetup, runtime_dir: Path, tmp_path: Path
) -> None:
    shown = run_console(NAME, runtime_dir, tmp_path)
    assert "manager daemon" not in shown, shown
    # the console did start one
    assert (runtime_dir / "pyrepl3-daemon.log").exists()


def test_the_console_shows_a_cold_fallback_once(
    setup: PoolSetup, runtime_dir: Path, tmp_path: Path
) -> None:
    shown = run_console(BAD, runtime_dir, tmp_path)
    assert shown.count(FALLBACK) == 1, shown
