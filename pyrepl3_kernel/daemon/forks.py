"""Forks of live kernels hosted by the daemon (docs/fork.md).

A fork of a lease is a new lease: a new kernel (its own gateway, ports, key
and kernel id) whose first worker is a copy-on-write fork of the parent
lease's worker. It is owned by whoever asked for it (the owner's death reaps
it, as any lease), never by the parent kernel: the parent's shutdown leaves
it running. A worker that replaces a dead fork starts cold, with the fork's
last automatic checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
import uuid
from typing import Any

from ..curve import PUBLIC, SECRET, CurveKeys
from ..processes import alive, started_at
from ..session.fork import (
    CONNECT_TIMEOUT_S,
    ForkBusyError,
    ForkedWorkerProcess,
    ForkError,
    ForkListener,
    _connection_of,
    fork_worker,
)
from ..session.worker import WorkerDeadError, WorkerStartError
from ..session.workers import ColdWorkers
from .client import DaemonError
from .leases import Lease, Leases

log = logging.getLogger("pyrepl3.daemon")

#: Lease id of each fork -> the kernel id it was forked from (for ``forks``).
_forked_from: dict[str, str] = {}
#: Lease id of each %fork -> the connection file written for it.
_connection_files: dict[str, str] = {}


async def fork_lease(
    leases: Leases,
    parent: Lease,
    *,
    kernel_id: str | None = None,
    owner_pid: int | None = None,
    curve: CurveKeys | None = None,
) -> tuple[Lease, dict[str, Any]]:
    """A new lease whose worker is a fork of ``parent``'s; and the fork's
    report (what did not carry over). ``owner_pid`` defaults to the
    parent's owner. Raises :class:`DaemonError`: ``busy`` while the parent
    runs a cell, ``fork_failed`` if the fork could not be made."""
    if parent.state != "running":
        raise DaemonError("unknown_lease", f"lease {parent.id!r} is {parent.state}: no worker")
    session = parent.gateway.session
    if session.running is not None:
        raise DaemonError("busy", str(ForkBusyError()))
    if owner_pid is None:
        owner_pid = parent.owner_pid
    elif owner_pid <= 0 or not alive(owner_pid):
        raise DaemonError("bad_request", f"owner_pid {owner_pid} is not a running process")
    try:
        await session.ensure_worker()
        worker: ForkedWorkerProcess = await fork_worker(session.worker)
    except (ForkError, WorkerStartError, WorkerDeadError) as exc:
        raise DaemonError("fork_failed", str(exc)) from None
    lease = await _host_fork(
        leases,
        worker,
        kernel_name=parent.kernel_name,
        kernel_id=kernel_id,
        owner_pid=owner_pid,
        env=session.env,  # the parent's limits hold for the fork
        cwd=session.cwd,
        curve=curve,
        execution_count=session.execution_count,
        forked_from=parent.kernel_id,
    )
    log.info("lease %s forked from %s (worker %s)", lease.id, parent.id, worker.pid)
    return lease, worker.fork_report


async def _host_fork(
    leases: Leases,
    worker: ForkedWorkerProcess,
    *,
    kernel_name: str,
    kernel_id: str | None,
    owner_pid: int,
    env: dict[str, str] | None,
    cwd: str | None,
    curve: CurveKeys | None,
    execution_count: int,
    forked_from: str,
) -> Lease:
    """A new lease (a kernel of its own) serving ``worker``, a fork; a
    worker that replaces it starts cold, with the fork's last checkpoint."""
    workers = ColdWorkers(python=worker.python, cwd=cwd, env=env)
    try:
        lease = await leases.host(
            kernel_name=kernel_name,
            kernel_id=kernel_id or str(uuid.uuid4()),
            session=worker,
            workers=workers,
            env=env,
            owner_pid=owner_pid,
            curve=curve,
        )
    except BaseException:
        await worker.shutdown()
        raise
    lease.gateway.session.execution_count = execution_count
    try:
        await lease.gateway.wait_ready()
    except BaseException:
        await leases.end(lease)
        raise
    _forked_from[lease.id] = forked_from
    return lease


def offer_forks(leases: Leases, lease: Lease) -> None:
    """Let ``%fork`` in the lease's kernel make a new lease of this daemon."""
    lease.gateway.fork_host = lambda: host_fork(leases, lease)


async def op_fork(leases: Leases, parent: Lease, request: dict[str, Any]) -> dict[str, Any]:
    """The daemon's ``fork`` op: ``lease_id`` (the parent), ``kernel_id``
    and ``owner_pid`` of the new kernel, CurveZMQ keys as ``lease`` takes
    them; the reply is ``lease``'s plus the fork's ``report``."""
    from ..curve import CurveKeyError

    owner_pid = request.get("owner_pid")
    if not isinstance(owner_pid, int) or isinstance(owner_pid, bool):
        raise DaemonError("bad_request", "owner_pid (an int) is required")
    kernel_id = request.get("kernel_id") or None
    if kernel_id is not None and not isinstance(kernel_id, str):
        raise DaemonError("bad_request", "kernel_id must be a string")
    try:
        curve = CurveKeys.of({name: request.get(name) for name in (PUBLIC, SECRET)})
    except CurveKeyError as exc:
        raise DaemonError("bad_request", str(exc)) from None
    lease, report = await fork_lease(
        leases, parent, kernel_id=kernel_id, owner_pid=owner_pid, curve=curve
    )
    return {**_lease_reply(lease), "report": report}


def op_forks(leases: Leases) -> dict[str, Any]:
    """The daemon's ``forks`` op: the running forks and whom they came from."""
    forks = []
    for lease_id, parent_kernel in list(_forked_from.items()):
        lease = leases.get(lease_id)
        if lease is None:
            del _forked_from[lease_id]
            continue
        forks.append(
            {
                "lease_id": lease.id,
                "kernel_id": lease.kernel_id,
                "kernel_name": lease.kernel_name,
                "forked_from": parent_kernel,
                "owner_pid": lease.owner_pid,
            }
        )
    return {"forks": forks}


def op_adopt(lease: Lease, request: dict[str, Any]) -> dict[str, Any]:
    """The daemon's ``adopt`` op: ``owner_pid`` takes over a fork's lease
    (a Jupyter server registering a ``%fork`` kernel with its kernel
    manager); the reply is ``lease``'s."""
    if lease.id not in _forked_from:
        raise DaemonError("bad_request", f"lease {lease.id!r} is not a fork: it has its owner")
    owner_pid = request.get("owner_pid")
    if not isinstance(owner_pid, int) or isinstance(owner_pid, bool) or not alive(owner_pid):
        raise DaemonError("bad_request", f"owner_pid {owner_pid!r} is not a running process")
    lease.owner_pid = owner_pid
    lease.owner_started = started_at(owner_pid)
    # The new owner's KernelManager writes its own connection file, of the
    # same name if it shares the runtime dir (one it finds would not be its own).
    with contextlib.suppress(OSError, KeyError):
        os.unlink(_connection_files.pop(lease.id))
    return _lease_reply(lease)


def _lease_reply(lease: Lease) -> dict[str, Any]:
    """A fork's lease as the daemon's ``lease`` op answers one (never warm)."""
    info = dict(lease.gateway.connection_info)
    info["key"] = info["key"].decode()
    return {
        "lease_id": lease.id,
        "kernel_id": lease.kernel_id,
        "connection_info": info,
        "worker_pid": lease.gateway.session.pid,
        "daemon_pid": os.getpid(),
        "warm": False,
    }


async def host_fork(leases: Leases, parent: Lease | None) -> dict[str, Any]:
    """What ``%fork`` in a daemon-hosted kernel gets: the new kernel's id,
    connection info and connection file (written to Jupyter's runtime
    directory, so ``jupyter console --existing`` finds it)."""
    if parent is None:
        raise ForkError("this kernel is not hosted by the daemon any more")
    try:
        # An encrypted kernel's fork is encrypted too, with the same keys.
        curve = CurveKeys.of(
            {name: parent.gateway.connection_info.get(name) for name in (PUBLIC, SECRET)}
        )
        lease, report = await fork_lease(leases, parent, owner_pid=_fork_owner(parent), curve=curve)
    except DaemonError as exc:
        raise ForkError(str(exc)) from None
    return _describe_hosted(lease, report)


def _describe_hosted(lease: Lease, report: dict[str, Any]) -> dict[str, Any]:
    """What ``%fork`` prints (:func:`describe_fork`); its connection file is
    removed once the new kernel is gone."""
    fork = describe_fork(lease, report)
    _connection_files[lease.id] = fork["connection_file"]
    task = asyncio.ensure_future(_remove_when_closed(lease, fork["connection_file"]))
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)
    return fork


#: Tasks that remove a %fork's connection file once its kernel is gone.
_cleanups: set[asyncio.Task[None]] = set()


async def _remove_when_closed(lease: Lease, path: str) -> None:
    try:
        await lease.gateway.closed.wait()
    finally:
        if _connection_files.pop(lease.id, None) is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _fork_owner(parent: Lease) -> int:
    """Who owns a ``%fork`` kernel: the client that started the parent
    kernel (``JPY_PARENT_PID``, as jupyter_client's launcher and the
    provisioner set it), else the parent's owner. Not the parent kernel's own
    process (the argv path's ``python -m pyrepl3_kernel``): the fork outlives
    the parent kernel."""
    env = parent.gateway.session.env or {}
    try:
        client = int(env.get("JPY_PARENT_PID", ""))
    except ValueError:
        client = 0
    if client > 0 and client != os.getpid() and alive(client):
        return client
    return parent.owner_pid


def describe_fork(lease: Lease, report: dict[str, Any]) -> dict[str, Any]:
    info = dict(lease.gateway.connection_info)
    info["key"] = info["key"].decode() if isinstance(info["key"], bytes) else info["key"]
    return {
        "lease_id": lease.id,
        "kernel_id": lease.kernel_id,
        "kernel_name": lease.kernel_name,
        "connection_info": info,
        "connection_file": write_connection_file(lease.kernel_id, lease.kernel_name, info),
        "worker_pid": lease.gateway.session.pid,
        "report": report,
        "daemon_pid": os.getpid(),
        "created": time.time(),
    }


def write_connection_file(kernel_id: str, kernel_name: str, info: dict[str, Any]) -> str:
    """``kernel-<id>.json`` in Jupyter's runtime directory, owner-only."""
    import json

    from jupyter_core.paths import jupyter_runtime_dir

    directory = jupyter_runtime_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"kernel-{kernel_id}.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({**info, "kernel_name": kernel_name}, f, indent=2)
    return path


# -- forks of kernels the daemon does not host (a standalone ``--no-pool`` kernel) ----------

#: How long a ``fork_listen`` socket waits for its ``fork_adopt``.
LISTEN_TIMEOUT_S = 60.0
#: At most this many forks waiting at once.
MAX_LISTENERS = 32
#: Tickets of ``fork_listen`` -> the listener, its accept, its expiry.
_listeners: dict[str, tuple[ForkListener, asyncio.Future[Any], asyncio.TimerHandle]] = {}


async def op_fork_listen(daemon: Any, request: dict[str, Any]) -> dict[str, Any]:
    """The daemon's ``fork_listen`` op: the first half of hosting the fork of
    a kernel this daemon does not host (a standalone kernel's ``%fork`` and
    REST fork, docs/fork.md). A Unix socket in an owner-only directory for
    the fork to connect to: ``{"ticket", "path", "token"}``. The kernel's
    worker forks with that path and token, then ``fork_adopt`` with the
    ticket names the fork; an unclaimed ticket expires after a minute."""
    if len(_listeners) >= MAX_LISTENERS:
        raise DaemonError("busy", f"{MAX_LISTENERS} forks are waiting to be adopted; try again")
    listener = ForkListener()
    ticket = secrets.token_hex(16)
    accepted = asyncio.ensure_future(listener.accept())
    expiry = asyncio.get_running_loop().call_later(LISTEN_TIMEOUT_S, _drop_listener, ticket)
    _listeners[ticket] = (listener, accepted, expiry)
    return {"ticket": ticket, "path": listener.path, "token": listener.token}


def _drop_listener(ticket: str) -> None:
    entry = _listeners.pop(ticket, None)
    if entry is None:
        return
    listener, accepted, expiry = entry
    expiry.cancel()
    if accepted.done() and not accepted.cancelled() and accepted.exception() is None:
        conn, out, err, _pid = accepted.result()  # a fork nobody adopts: it ends
        conn.close()
        os.close(out)
        os.close(err)
    accepted.cancel()
    listener.close()


async def op_fork_adopt(daemon: Any, request: dict[str, Any]) -> dict[str, Any]:
    """The daemon's ``fork_adopt`` op: the second half (see ``fork_listen``).
    ``ticket``; ``pid`` and ``report`` of the fork (the worker's fork reply);
    of the parent kernel: ``kernel_name``, ``kernel_id`` (``forked_from``),
    its worker's ``python``, ``cwd``, ``env`` (its limits too) and
    ``ipython_options``, ``execution_count``, CurveZMQ keys as ``lease``
    takes them; ``owner_pid`` of the new kernel. ``cancel: true`` gives the
    ticket up (the fork failed). The reply is what ``%fork`` prints: the new
    kernel's ``kernel_id``, ``lease_id``, ``connection_info``,
    ``connection_file``, ``worker_pid`` and ``report``."""
    from ..curve import CurveKeyError

    ticket = request.get("ticket")
    if not isinstance(ticket, str) or ticket not in _listeners:
        raise DaemonError("bad_request", f"no fork is waiting for ticket {ticket!r} (expired?)")
    if request.get("cancel"):
        _drop_listener(ticket)
        return {"cancelled": True}
    listener, accepted, expiry = _listeners.pop(ticket)
    expiry.cancel()
    try:
        fields = _adopt_fields(request)
        try:
            curve = CurveKeys.of({name: request.get(name) for name in (PUBLIC, SECRET)})
        except CurveKeyError as exc:
            raise DaemonError("bad_request", str(exc)) from None
        try:
            conn, stdout, stderr, peer = await _connection_of(
                accepted, fields["pid"], CONNECT_TIMEOUT_S
            )
        except ForkError as exc:
            raise DaemonError("fork_failed", str(exc)) from None
    except BaseException:
        _listeners[ticket] = (listener, accepted, expiry)
        _drop_listener(ticket)
        raise
    listener.close()
    if peer != fields["pid"]:
        conn.close()
        os.close(stdout)
        os.close(stderr)
        raise DaemonError(
            "fork_failed", f"the fork's connection came from pid {peer}, not {fields['pid']}"
        )
    env, cwd = fields["env"], fields["cwd"]
    worker = ForkedWorkerProcess(
        conn,
        stdout,
        stderr,
        peer,
        fork_report=fields["report"],
        python=fields["python"],
        cwd=cwd,
        env=env,
        ipython_options=fields["ipython_options"],
    )
    try:
        await worker.start()
    except WorkerStartError as exc:
        raise DaemonError("fork_failed", str(exc)) from None
    lease = await _host_fork(
        daemon.leases,
        worker,
        kernel_name=fields["kernel_name"],
        kernel_id=None,
        owner_pid=fields["owner_pid"],
        env=env,
        cwd=cwd,
        curve=curve,
        execution_count=fields["execution_count"],
        forked_from=fields["forked_from"],
    )
    log.info("lease %s: a fork of standalone kernel %s", lease.id, fields["forked_from"])
    return _describe_hosted(lease, worker.fork_report)


def _adopt_fields(request: dict[str, Any]) -> dict[str, Any]:
    """``fork_adopt``'s fields, checked (a ``bad_request`` names the first wrong one)."""

    def field(name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = request.get(name, default)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise DaemonError("bad_request", f"fork_adopt: {name} {value!r} is not valid")
        return value

    python = field("python", str)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise DaemonError("bad_request", f"python {python!r} is not an executable file")
    env = field("env", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise DaemonError("bad_request", "env must map strings to strings")
    cwd = field("cwd", (str, type(None)))
    if cwd is not None and not os.path.isdir(cwd):
        raise DaemonError("bad_request", f"cwd {cwd!r} is not a directory")
    options = field("ipython_options", list, [])
    if not all(isinstance(o, str) for o in options):
        raise DaemonError("bad_request", "ipython_options must be a list of strings")
    owner_pid = field("owner_pid", int)
    if owner_pid <= 0 or not alive(owner_pid):
        raise DaemonError("bad_request", f"owner_pid {owner_pid} is not a running process")
    pid = field("pid", int)
    if pid <= 0:
        raise DaemonError("bad_request", f"pid {pid} is not a process id")
    report = field("report", dict, {})
    return {
        "python": python,
        "env": env,
        "cwd": cwd,
        "ipython_options": options,
        "owner_pid": owner_pid,
        "pid": pid,
        "report": {
            "lost": dict(report.get("lost") or {}),
            "shared": dict(report.get("shared") or {}),
        },
        "kernel_name": field("kernel_name", str, "pyrepl3"),
        "forked_from": field("kernel_id", str, ""),
        "execution_count": field("execution_count", int, 0),
    }
