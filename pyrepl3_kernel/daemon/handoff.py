"""Kernels handed over by ``python -m pyrepl3_kernel -f CONN`` (the argv
path: what a client that runs the kernelspec's argv itself gets).

The launcher process asks (``handoff``) for a kernel on the ports and key of
its connection file; the daemon hosts it like any lease, with a forked
worker, and the launcher stays the process the client sees until the lease
ends (``watch``). A launcher may ask (``fork_server_wait_s``) not to wait
longer than that for a fork server that is starting: the request is then
refused with ``warming`` and the launcher starts its kernel standalone,
which is faster (the first launches after a daemon starts). The launcher is
the lease's owner: the daemon watches it
with a pidfd and ends the lease the moment it dies (SIGKILL included), so
its worker goes with it. A shutdown of the kernel (restart or not) ends the
lease: the client starts a new process for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from typing import Any

from ..processes import alive
from .client import DaemonError
from .leases import Lease

log = logging.getLogger("pyrepl3.daemon")

_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
#: Longest a ``watch`` waits before answering that the lease still runs.
MAX_WATCH_S = 30.0


def connection_info_of(request: dict[str, Any]) -> dict[str, Any]:
    """The connection file's contents from a handoff request, checked."""
    info = request.get("connection_info")
    if not isinstance(info, dict):
        raise DaemonError("bad_request", "connection_info must be an object")
    transport = info.get("transport", "tcp")
    if transport != "tcp":
        raise DaemonError(
            "bad_request", f"transport {transport!r} is not handed over (only tcp is)"
        )
    for name in _PORTS:
        port = info.get(name)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise DaemonError("bad_request", f"connection_info.{name} must be a port number")
    for name in ("ip", "key", "signature_scheme"):
        if not isinstance(info.get(name, ""), str):
            raise DaemonError("bad_request", f"connection_info.{name} must be a string")
    return {k: v for k, v in info.items() if k != "kernel_name"}


async def op_handoff(daemon: Any, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    info = connection_info_of(request)
    python = request.get("python")
    if not isinstance(python, str) or not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise DaemonError("bad_request", f"python {python!r} is not an executable file")
    env = request.get("env")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise DaemonError("bad_request", "env must map strings to strings")
    cwd = request.get("cwd")
    if not isinstance(cwd, str) or not os.path.isdir(cwd):
        raise DaemonError("bad_request", f"cwd {cwd!r} is not a directory")
    owner_pid = request.get("owner_pid")
    if not isinstance(owner_pid, int) or owner_pid <= 0 or not alive(owner_pid):
        raise DaemonError("bad_request", f"owner_pid {owner_pid!r} is not a running process")
    options = request.get("ipython_options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DaemonError("bad_request", "ipython_options must be a list of strings")
    kernel_name = request.get("kernel_name") or "pyrepl3"
    if not isinstance(kernel_name, str):
        raise DaemonError("bad_request", "kernel_name must be a string")
    wait_s = request.get("fork_server_wait_s")
    if wait_s is not None:
        if not isinstance(wait_s, (int, float)) or isinstance(wait_s, bool) or wait_s < 0:
            raise DaemonError("bad_request", "fork_server_wait_s must be a number of seconds")
        if not await fork_server_ready(daemon, python, env, min(float(wait_s), MAX_WATCH_S)):
            raise DaemonError(
                "warming",
                f"the fork server of {python} is starting (not ready within {wait_s:g} s)",
            )
    kernel_id = env.get("KERNEL_ID") or str(uuid.uuid4())
    try:
        lease, refill = await daemon.leases.create(
            kernel_name=kernel_name,
            kernel_id=kernel_id,
            python=python,
            env=env,
            cwd=cwd,
            owner_pid=owner_pid,
            # IPython options shape the shell as it is built: a forked
            # worker takes them, a pooled one was built without them.
            pooled=not options,
            pool_size=1,
            max_kernels=256,
            warmup_code="",
            connection_info=info,
            ipython_options=options or None,
        )
    except DaemonError:
        raise
    except Exception as exc:  # the ports: taken meanwhile, or not ours to bind
        raise DaemonError("bind_failed", f"could not serve the kernel: {exc}") from None
    _watch_owner(daemon, lease)
    reply = {
        "lease_id": lease.id,
        "kernel_id": kernel_id,
        "worker_pid": lease.gateway.session.pid,
        "daemon_pid": os.getpid(),
        "warm": lease.warm,
    }
    return reply, refill


async def fork_server_ready(daemon: Any, python: str, env: dict[str, str], wait_s: float) -> bool:
    """Whether the fork server a handed-over kernel of ``python`` and
    ``env`` would be forked from is ready within ``wait_s`` seconds (it is
    started if it is not running). True too when there is none to wait for:
    fork servers disabled, or this profile's found unusable (unsafe warm-up,
    failed start): its workers start cold here as before."""
    server = daemon.leases.fork_servers.get(python, env, "")
    if server is None or server.state in ("ready", "unsafe", "failed"):
        return True
    try:
        await asyncio.wait_for(asyncio.shield(server.start_soon()), wait_s)
    except asyncio.TimeoutError:
        log.info("handoff: fork server %s not ready within %.2f s", python, wait_s)
        return False
    return True


async def op_watch(daemon: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Wait (up to ``wait_s`` seconds, at most 30) until the lease ends."""
    lease_id = request.get("lease_id")
    timeout = request.get("wait_s", 10.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise DaemonError("bad_request", "wait_s must be a number of seconds")
    lease = daemon.leases.get(lease_id) if isinstance(lease_id, str) else None
    if lease is None:
        return {"ended": True}
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(lease.ended.wait(), min(float(timeout), MAX_WATCH_S))
    return {"ended": lease.ended.is_set()}


def _watch_owner(daemon: Any, lease: Lease) -> None:
    """End ``lease`` as soon as its owner process ends (not at the next reap)."""
    try:
        pidfd = os.pidfd_open(lease.owner_pid)
    except (OSError, AttributeError):
        return  # the periodic reap still ends it
    loop = asyncio.get_running_loop()

    def owner_gone() -> None:
        stop_watching()
        if daemon.leases.get(lease.id) is lease:
            log.info("owner %s of lease %s ended: ending it", lease.owner_pid, lease.id)
            daemon.leases._tasks.spawn(daemon.leases.end(lease))

    watching = [True]

    def stop_watching(*_: Any) -> None:
        if watching[0]:  # once: the descriptor's number may be reused after
            watching[0] = False
            with contextlib.suppress(Exception):
                loop.remove_reader(pidfd)
            os.close(pidfd)

    loop.add_reader(pidfd, owner_gone)
    waiter = asyncio.ensure_future(lease.ended.wait())
    waiter.add_done_callback(stop_watching)
    lease.owner_watch = waiter  # type: ignore[attr-defined]
