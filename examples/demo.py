"""A pyrepl3 kernel at work, through the same client Jupyter frontends use.

Run: ``bash scripts/demo.sh`` (sets everything up first), or with the venv
ready: ``.venv/bin/python examples/demo.py``.

It prints how long the kernel took to answer (``KernelManager.start_kernel()``
to the first ``kernel_info_reply``, and whether a warm worker served it), runs
the cells below, then times another kernel once the pool is warm again. The
``pyrepl3`` kernelspec leases kernels from the per-user manager daemon; if the
demo started that daemon, it stops it at the end (``pyrepl3-kernel stop``), and
a daemon that was already running is left running, as the last line says.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

from jupyter_client.manager import KernelManager

CELLS = [
    (
        "stream output and a result",
        "import sys\nprint('hello from the worker, pid', __import__('os').getpid())\n6 * 7",
    ),
    ("output of C code and subprocesses", "import os\nos.system('echo from a child process')"),
    ("rich display", "from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))"),
    ("input() over Jupyter's stdin channel", "name = input('Your name? ')\nprint('Hello', name)"),
    ("an ordinary error", "1 / 0"),
    ("the worker crashes (os._exit)", "import os\nprint('about to crash')\nos._exit(3)"),
    ("the kernel is still here, with a new worker", "print('still answering')"),
]

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def show(msg: dict[str, Any]) -> None:
    kind, content = msg["msg_type"], msg["content"]
    if kind == "stream":
        for line in content["text"].splitlines():
            print(f"    [{content['name']}] {line}")
    elif kind in ("execute_result", "display_data"):
        data = content["data"]
        mime = "text/html" if "text/html" in data else "text/plain"
        print(f"    [{kind} {mime}] {data[mime]}")
    elif kind == "error":
        print(f"    [error] {content['ename']}: {ANSI.sub('', content['evalue'])}")


def status() -> dict[str, Any] | None:
    """``pyrepl3-kernel status --json``: None if no manager daemon runs."""
    done = subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(done.stdout) if done.returncode == 0 else None


def daemon_status() -> dict[str, Any] | None:
    now = status()
    return now["daemon"] if now else None


def wait_for_a_warm_worker(timeout: float = 60) -> None:
    """Until the daemon's pyrepl3 pool has a warm worker (the crash above
    took the last one: a kernel restarts on a warm worker too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pools = (status() or {}).get("pools", [])
        if any(p["kernel_name"] == "pyrepl3" and p["idle"] > 0 for p in pools):
            return
        time.sleep(0.2)


def start_kernel() -> tuple[KernelManager, Any, float]:
    """Start a ``pyrepl3`` kernel; also return the seconds from
    ``start_kernel()`` to its first ``kernel_info_reply``."""
    started = time.perf_counter()
    km = KernelManager(kernel_name="pyrepl3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    request = kc.kernel_info()
    while True:
        reply = kc.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == request:
            break
    answered = time.perf_counter() - started
    # What start_new_kernel() does too: wait until iopub delivers as well.
    # Not in the figure: it ends with 0.2 s without iopub messages.
    kc.wait_for_ready(timeout=60)
    return km, kc, answered


def how_started(km: KernelManager, daemon_was_running: bool = True) -> str:
    warm = getattr(km.provisioner, "warm", None)
    if warm:
        return "a warm worker leased from the manager daemon"
    if warm is None:
        return "started cold, without the manager daemon"
    if not daemon_was_running:
        return "started cold: the manager daemon was started for it, with no warm worker yet"
    return "started cold: the manager daemon had no warm worker ready"


def stop(km: KernelManager, kc: Any) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def main() -> None:
    daemon_before = daemon_status()
    try:
        km, kc, answered = start_kernel()
        print(
            f"pyrepl3 kernel answered in {answered * 1000:.0f} ms "
            f"(KernelManager.start_kernel() to the first kernel_info_reply; "
            f"{how_started(km, daemon_before is not None)})\n"
        )
        try:
            for title, code in CELLS:
                print(f"--- {title}")
                reply = kc.execute_interactive(
                    code,
                    output_hook=show,
                    stdin_hook=lambda msg: kc.input("Ada"),
                    allow_stdin=True,
                    timeout=60,
                )
                print(f"    -> execute_reply: {reply['content']['status']}\n")
        finally:
            stop(km, kc)
        wait_for_a_warm_worker()
        km, kc, answered = start_kernel()
        stop(km, kc)
        print(
            f"--- another pyrepl3 kernel: answered in {answered * 1000:.0f} ms "
            f"({how_started(km)})\n"
        )
    finally:
        report_daemon(daemon_before)


def report_daemon(before: dict[str, Any] | None) -> None:
    """Stop the manager daemon if this demo started it; else say it runs on."""
    now = daemon_status()
    if now is None:
        return
    if before is not None and before["pid"] == now["pid"]:
        print(
            f"Left running: the pyrepl3 manager daemon (pid {now['pid']}), which was running "
            f"before the demo and keeps warm workers; it exits after "
            f"{now['idle_timeout_s']:.0f} s without kernels, or stop it with "
            "`pyrepl3-kernel stop`."
        )
        return
    # The provisioner started it for the demo's kernel: nothing of the demo
    # stays behind. A kernel started later starts it again.
    done = subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", "stop"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        print(
            f"Left running: the pyrepl3 manager daemon this demo started (pid {now['pid']}): "
            f"{done.stderr.strip()}; stop it with `pyrepl3-kernel stop`."
        )
        return
    print(
        f"Stopped the pyrepl3 manager daemon this demo started (pid {now['pid']}; "
        "`pyrepl3-kernel stop`). The next pyrepl3 kernel starts it again."
    )


if __name__ == "__main__":
    main()
