"""``jupyter console --kernel pyrepl3`` on a pty, driven by pexpect.

Both the plain prompt (``--simple-prompt``) and prompt_toolkit's full
terminal UI are driven: print, input() and getpass() answered on the
terminal, then a clean exit that leaves no kernel process behind. The pooled
kernel (``pyrepl3``) runs in both UIs, the standalone one (``pyrepl3-cold``)
in the plain one.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import psutil
import pytest
from jupyter_helpers import stop_daemon

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")

CONSOLE = Path(sys.executable).with_name("jupyter-console")
TIMEOUT = 60
# prompt_toolkit's UI paints the prompt with escape sequences between its parts.
ESC = r"(?:\x1b\[[0-9;?]*[A-Za-z])*"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def prompt(n: int) -> re.Pattern[str]:
    return re.compile(rf"In \[{ESC}{n}{ESC}\]: ")


def plain(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


def processes_naming(path: Path) -> list[psutil.Process]:
    """The processes with ``path`` in their command line, and all their
    descendants: with the console's runtime dir, the standalone kernel (its
    connection file is there) or the manager daemon started for the console."""
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(path) in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
                found.extend(proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [p for p in found if p.pid != os.getpid()]


@pytest.fixture
def console_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOME=str(tmp_path / "home"),
        IPYTHONDIR=str(tmp_path / "ipython"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        TERM="xterm",
        PROMPT_TOOLKIT_NO_CPR="1",  # no cursor position requests on the pty
    )
    for name in ("HOME", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR"):
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture
def spawn(console_env: dict[str, str]) -> Iterator[list[pexpect.spawn]]:
    """Spawned consoles; killed (with their kernel, and the daemon started
    in their runtime dir) when the test ends."""
    children: list[pexpect.spawn] = []
    yield children
    runtime_dir = Path(console_env["JUPYTER_RUNTIME_DIR"])
    for child in children:
        if child.isalive():
            child.terminate(force=True)
    stop_daemon(runtime_dir)
    leftovers = processes_naming(runtime_dir)
    for proc in leftovers:
        proc.kill()
    psutil.wait_procs(leftovers, timeout=5)


@pytest.mark.skipif(
    shutil.which(str(CONSOLE)) is None, reason="jupyter-console is not installed in this venv"
)
@pytest.mark.parametrize(
    ("kernel_name", "ui"),
    [
        ("pyrepl3", "simple-prompt"),
        ("pyrepl3", "prompt-toolkit"),
        ("pyrepl3-cold", "simple-prompt"),
    ],
)
def test_console_session_with_input_and_getpass(
    kernel_name: str, ui: str, console_env: dict[str, str], spawn: list[pexpect.spawn]
) -> None:
    args = ["--kernel", kernel_name] + (["--simple-prompt"] if ui == "simple-prompt" else [])
    child = pexpect.spawn(
        str(CONSOLE), args, env=console_env, encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 200)
    )
    spawn.append(child)

    child.expect(prompt(1))

    child.sendline("print(1+1)")
    child.expect(prompt(2))
    assert plain(child.before).rstrip().endswith("\n2")

    child.sendline('name = input("Name? ")')
    child.expect(r"Name\? ")
    child.sendline("Ada Lovelace")
    child.expect(prompt(3))

    child.sendline("import getpass; pw = getpass.getpass()")
    child.expect("Password: ")
    child.sendline("hunter2")
    child.expect(prompt(4))
    assert "hunter2" not in child.before, "the password was echoed"

    child.sendline("import os; print(f'{name}|{pw}|{len(pw)}|{os.getpid()}')")
    child.expect(prompt(5))
    lines = [line for line in plain(child.before).splitlines() if line.startswith("Ada Lovelace|")]
    assert len(lines) == 1 and lines[0].startswith("Ada Lovelace|hunter2|7|"), plain(child.before)
    # The kernel's processes: its worker, and for a standalone kernel the
    # process started with a connection file in the runtime dir.
    runtime_dir = Path(console_env["JUPYTER_RUNTIME_DIR"])
    kernel = [psutil.Process(int(lines[0].rsplit("|", 1)[1]))]
    kernel += processes_naming(runtime_dir / "kernel-")
    assert (len(kernel) > 1) == (kernel_name == "pyrepl3-cold"), kernel

    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, plain(child.before)
    gone, alive = psutil.wait_procs(kernel, timeout=10)
    assert alive == [], f"kernel processes left after exit: {alive}"
