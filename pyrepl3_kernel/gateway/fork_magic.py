"""``%fork``: fork this kernel, from a cell (docs/fork.md).

A cell that is exactly ``%fork`` is answered by the gateway, not the worker:
the kernel forks between cells (the worker forks at an idle point, never in
the middle of a cell), so the cell that asks cannot be running in the worker
at that moment. The gateway asks its host for a new kernel whose worker is a
fork of this one's (in the manager daemon: a new lease) and prints the new
kernel's id, how to connect to it, and what did not carry over. A kernel
with no host for forks (a standalone ``--no-pool`` kernel) says so in the
cell's error. ``%fork`` among other code is refused by the worker's magic of
that name, with the same explanation.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .channels import JupyterMsg
    from .kernel import JupyterGateway

#: A host's answer: ``kernel_id``, ``connection_file``, ``worker_pid``, ``report``.
ForkHost = Callable[[], Awaitable[dict[str, Any]]]

_FORK_CELL = re.compile(r"\A\s*%fork\s*(#[^\n]*)?\s*\Z")

NO_HOST = (
    "this kernel has no host for a fork: forks of a live kernel are hosted by the pyrepl3 "
    "manager daemon (the pooled `pyrepl3` kernelspec); a standalone kernel (`--no-pool`) "
    "cannot fork from a cell. From Python, Session.fork() forks any session"
)


def is_fork_cell(code: str) -> bool:
    """The cell is ``%fork`` alone (a comment after it allowed)."""
    return bool(_FORK_CELL.match(code))


def describe(fork: dict[str, Any]) -> str:
    """What ``%fork`` prints about the new kernel."""
    lines = [
        f"Forked this kernel: new kernel {fork['kernel_id']} (worker pid {fork.get('worker_pid')}),"
        " with this kernel's state as of now; the two are independent from here.",
    ]
    if fork.get("connection_file"):
        lines.append(f"Connect: jupyter console --existing {fork['connection_file']}")
    lines.append(
        "A Jupyter server running this kernel lists the new one with its kernels "
        "(GET /api/kernels; JupyterLab's running kernels) when it next lists them."
    )
    report = fork.get("report") or {}
    for name, why in (report.get("lost") or {}).items():
        lines.append(f"  not carried over: {name}: {why}")
    for name, why in (report.get("shared") or {}).items():
        lines.append(f"  shared with this kernel: {name}: {why}")
    return "\n".join(lines) + "\n"


async def run_fork_cell(gateway: JupyterGateway, idents: list[bytes], msg: JupyterMsg) -> None:
    """Answer a ``%fork`` cell: execute_input, the output, execute_reply."""
    from ..session.fork import ForkError

    code = msg["content"].get("code", "")
    count = gateway.session.execution_count
    gateway._publish_busy()
    gateway._publish("execute_input", {"code": code, "execution_count": count}, msg)
    host: ForkHost | None = getattr(gateway, "fork_host", None)
    error: tuple[str, str] | None = None
    if host is None:
        error = ("ForkError", NO_HOST)
    else:
        try:
            fork = await host()
        except ForkError as exc:
            error = (type(exc).__name__, str(exc))
        except Exception as exc:
            error = ("ForkError", f"the fork failed: {type(exc).__name__}: {exc}")
        else:
            gateway._publish("stream", {"name": "stdout", "text": describe(fork)}, msg)
    if error is None:
        content: dict[str, Any] = {
            "status": "ok",
            "execution_count": count,
            "user_expressions": {},
            "payload": [],
        }
    else:
        ename, evalue = error
        traceback = [f"{ename}: {evalue}"]
        gateway._publish("error", {"ename": ename, "evalue": evalue, "traceback": traceback}, msg)
        content = {
            "status": "error",
            "execution_count": count,
            "ename": ename,
            "evalue": evalue,
            "traceback": traceback,
        }
    metadata = {"status": content["status"], "engine": gateway.kernel_id}
    gateway._reply("shell", idents, msg, "execute_reply", content, metadata=metadata)
