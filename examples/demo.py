"""A pyrepl3 kernel at work, through the same client Jupyter frontends use.

Run: ``bash scripts/demo.sh`` (sets everything up first), or with the venv
ready: ``.venv/bin/python examples/demo.py``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from jupyter_client.manager import start_new_kernel

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


def main() -> None:
    started = time.perf_counter()
    km, kc = start_new_kernel(kernel_name="pyrepl3")
    print(f"pyrepl3 kernel ready in {time.perf_counter() - started:.2f} s\n")
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
        kc.stop_channels()
        km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
