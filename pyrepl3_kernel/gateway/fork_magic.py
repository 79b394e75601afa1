"""``%fork``: fork this kernel, from a cell (docs/fork.md).

A cell that is exactly ``%fork`` is answered by the gateway, not the worker:
the kernel forks between cells (the worker forks at an idle point, never in
the middle of a cell), so the cell that asks cannot be running in the worker
at that moment. The gateway asks its host for a new kernel whose worker is a
fork of this one's (in the manager daemon: a new lease) and prints the new
kernel's id, how to connect to it, and what did not carry over.

A standalone kernel (``python -m pyrepl3_kernel``: a ``--no-pool``
kernelspec, or a launch that could not use the daemon) has no host of its
own for a second kernel: its fork is handed to the per-user manager daemon
(started if none answers, as the argv path does), which hosts it as a lease
of its own (:func:`fork_into_daemon`; daemon ops ``fork_listen`` and
``fork_adopt``). The fork outlives this kernel and keeps its limits.

The Jupyter server's REST fork of a standalone kernel asks on the control
channel (``pyrepl3_fork_request``, :func:`run_fork_request`).
``%fork`` among other code is refused by the worker's magic of that name,
with the explanation that it must be a cell of its own.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
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
    "manager daemon, and this kernel is neither hosted by it nor a standalone kernel "
    "(`python -m pyrepl3_kernel`) that can hand its fork to it. From Python, Session.fork() "
    "forks any session"
)
#: The control request of the Jupyter server's REST fork (server/fork.py).
FORK_REQUEST = "pyrepl3_fork_request"
FORK_REPLY = "pyrepl3_fork_reply"
#: How long the daemon may take to start and to adopt the fork.
DAEMON_TIMEOUT_S = 60.0
#: ``__main__`` of a standalone kernel's process.
_STANDALONE_MAINS = ("pyrepl3_kernel.__main__", "pyrepl3_kernel.gateway.standalone")


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
    host = host_of(gateway)
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


def host_of(gateway: JupyterGateway) -> ForkHost | None:
    """Where a fork of ``gateway``'s kernel goes: its host's (the daemon
    sets ``fork_host`` on the kernels it hosts), the daemon's for a
    standalone kernel, else None (refused)."""
    host: ForkHost | None = getattr(gateway, "fork_host", None)
    if host is not None:
        return host
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main is not None and main.name in _STANDALONE_MAINS:
        return lambda: fork_into_daemon(gateway)
    return None


async def run_fork_request(gateway: JupyterGateway, idents: list[bytes], msg: JupyterMsg) -> None:
    """Answer ``pyrepl3_fork_request`` (control channel; the REST fork of a
    kernel the daemon does not host): fork now, or refuse while a cell runs
    (``reason: busy``, as the REST answer's 409). The reply carries what
    ``%fork`` prints about the new kernel (``kernel_id``, ``lease_id``,
    ``connection_info``, ``report``...)."""
    from ..session.fork import ForkBusyError, ForkError

    host = host_of(gateway)
    content: dict[str, Any]
    try:
        if host is None:
            raise ForkError(NO_HOST)
        if gateway.session.running is not None:
            raise ForkBusyError()
        content = {"status": "ok", **await host()}
    except ForkBusyError as exc:
        content = {
            "status": "error",
            "reason": "busy",
            "ename": "ForkBusyError",
            "evalue": str(exc),
        }
    except ForkError as exc:
        reason = "no_host" if host is None else "failed"
        content = {"status": "error", "reason": reason, "ename": "ForkError", "evalue": str(exc)}
    except Exception as exc:
        content = {
            "status": "error",
            "reason": "failed",
            "ename": "ForkError",
            "evalue": f"the fork failed: {type(exc).__name__}: {exc}",
        }
    gateway._reply("control", idents, msg, FORK_REPLY, content)


async def fork_into_daemon(gateway: JupyterGateway) -> dict[str, Any]:
    """Fork a standalone kernel's worker into a new kernel the per-user
    manager daemon hosts (started if none answers): the daemon listens
    (``fork_listen``), the worker forks at this idle point and connects to
    it, the daemon adopts the fork as a lease of its own (``fork_adopt``),
    with this kernel's interpreter, directory, environment and limits, owned
    by this kernel's client (``JPY_PARENT_PID``), not by this process: the
    fork outlives this kernel. Raises :class:`ForkError` (this kernel is
    untouched)."""
    from ..curve import PUBLIC, SECRET, CurveKeys
    from ..daemon.client import DaemonClient, DaemonError, DaemonUnavailable
    from ..handoff import confinement_difference, ensure_daemon
    from ..protocol import ForkMessage, ForkReplyMessage
    from ..session.fork import ForkBusyError, ForkError

    session = gateway.session
    if session.running is not None:
        raise ForkBusyError()
    await session.ensure_worker()
    worker = session.worker
    client = DaemonClient(default_daemon_paths(), timeout=DAEMON_TIMEOUT_S)

    def listen() -> dict[str, Any]:
        ensure_daemon(client)
        daemon_pid = int(client.call("hello", timeout=10.0)["pid"])
        different = confinement_difference(daemon_pid)
        if different is not None:
            raise ForkError(
                f"this kernel runs confined unlike the pyrepl3 manager daemon ({different}), "
                "which would host the fork (and restart its worker outside that confinement); "
                "from Python, Session.fork() forks any session"
            )
        return client.call("fork_listen", timeout=10.0)

    def cancel(ticket: str) -> None:
        try:
            client.call("fork_adopt", timeout=10.0, ticket=ticket, cancel=True)
        except (DaemonError, DaemonUnavailable, OSError):
            pass  # the daemon drops it after a minute anyway

    unusable = "the pyrepl3 manager daemon, which hosts the forks of a standalone kernel"
    try:
        where = await asyncio.to_thread(listen)
    except (DaemonError, DaemonUnavailable, OSError, ValueError, KeyError) as exc:
        raise ForkError(f"{unusable}, cannot be used: {exc}") from None
    ticket = str(where["ticket"])
    try:
        reply = await worker.request(ForkMessage(path=where["path"], token=where["token"]))
        if not reply.ok:
            raise ForkError(f"the worker could not fork: {reply.ename}: {reply.evalue}")
        assert isinstance(reply, ForkReplyMessage)
    except BaseException:
        await asyncio.to_thread(cancel, ticket)
        raise
    info = gateway.connection_info
    curve = CurveKeys.of({name: info.get(name) for name in (PUBLIC, SECRET)})
    fields: dict[str, Any] = {
        "ticket": ticket,
        "pid": reply.pid,
        "report": reply.report,
        "kernel_name": str(info.get("kernel_name") or "pyrepl3"),
        "kernel_id": _client_kernel_id(gateway),
        "python": worker.python,
        "cwd": worker.cwd or os.getcwd(),
        "env": dict(os.environ if worker.env is None else worker.env),
        "ipython_options": list(worker.ipython_options or []),
        "execution_count": session.execution_count,
        "owner_pid": _owner(),
        **(curve.as_info() if curve is not None else {}),
    }
    try:
        return await asyncio.to_thread(client.call, "fork_adopt", DAEMON_TIMEOUT_S, **fields)
    except (DaemonError, DaemonUnavailable, OSError) as exc:
        raise ForkError(f"{unusable}, could not take the fork: {exc}") from None


def default_daemon_paths() -> Any:
    """The per-user daemon's paths in Jupyter's runtime directory (as the
    provisioner and the argv path find it)."""
    from jupyter_core.paths import jupyter_runtime_dir

    from ..daemon.client import DaemonPaths

    return DaemonPaths.default(
        os.path.abspath(jupyter_runtime_dir())
    )  # absolute: the daemon runs in /


def _client_kernel_id(gateway: JupyterGateway) -> str:
    """This kernel's id as its client knows it (a Jupyter server lists a
    ``%fork`` kernel whose parent is one of its kernels): ``KERNEL_ID`` if
    the launcher set it, else the ``kernel-<id>.json`` name of the
    connection file on the command line (jupyter_client names it so), else
    the gateway's own."""
    if os.environ.get("KERNEL_ID"):
        return os.environ["KERNEL_ID"]
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        path = ""
        if arg in ("-f", "--connection-file") and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--connection-file="):
            path = arg.split("=", 1)[1]
        found = re.fullmatch(r"kernel-(.+)\.json", os.path.basename(path))
        if found:
            return found.group(1)
    return gateway.kernel_id


def _owner() -> int:
    """Who owns a standalone kernel's fork: its client (``JPY_PARENT_PID``,
    as jupyter_client sets it), else the process that launched this kernel;
    never this process (the fork outlives this kernel)."""
    from ..processes import alive

    try:
        client = int(os.environ.get("JPY_PARENT_PID", ""))
    except ValueError:
        client = 0
    if client > 1 and client != os.getpid() and alive(client):
        return client
    return os.getppid()
