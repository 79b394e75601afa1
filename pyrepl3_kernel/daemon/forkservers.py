"""The daemon's fork servers: one per interpreter, warm-up code and start-up
environment (:func:`~.leases.startup_key`), shared by every pool and cold
launch with that profile, so a burst of any size gets forked (warm) workers
and the warm pool is only what is ready before anyone asks.

A daemon prepares the fork server of its own interpreter and environment at
start (with the warm-up code its starter asked for, in
``PYREPL3_DAEMON_PREPARE``), so its first kernel is as fast as the
hundredth; the ``prepare`` op prepares another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from ..session.forkserver import ForkServer
from ..session.worker import WorkerProcess
from .client import PREPARE_ENV

log = logging.getLogger("pyrepl3.daemon")

#: Workers a pool forks at once (a fork costs milliseconds; building the
#: shell in the child tens of them). New interpreters start two at a time.
FORKED_CONCURRENT_STARTS = 8
#: Fork servers kept at once (each holds an interpreter with IPython and the
#: warm-up's imports); the least recently used one beyond this is stopped
#: (its workers live on; a later launch of its profile starts it again).
MAX_FORK_SERVERS = 4


class ForkServers:
    """Fork servers by profile, started on first use and stopped with the daemon."""

    def __init__(self) -> None:
        self._servers: dict[tuple[Any, ...], ForkServer] = {}  # least recently used first
        self._enabled = os.environ.get("PYREPL3_FORK_SERVER", "1") != "0"
        self._stopping: set[asyncio.Task[None]] = set()

    def get(self, python: str, env: Mapping[str, str], warmup_code: str) -> ForkServer | None:
        """The fork server of this profile (started in the background if it
        is new); None if fork servers are disabled (``PYREPL3_FORK_SERVER=0``)."""
        if not self._enabled:
            return None
        from .leases import startup_key

        key = (python, warmup_code, startup_key(dict(env)))
        server = self._servers.pop(key, None)
        if server is None:
            server = ForkServer(python=python, env=env, warmup_code=warmup_code)
            server.start_soon()
        self._servers[key] = server
        while len(self._servers) > MAX_FORK_SERVERS:
            oldest = next(iter(self._servers))
            evicted = self._servers.pop(oldest)
            log.info("stopping the least recently used fork server (%s)", evicted.pid)
            task = asyncio.ensure_future(evicted.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        return server

    async def prepare(
        self, python: str, env: Mapping[str, str], warmup_code: str
    ) -> ForkServer | None:
        """The fork server of this profile, ready (or known not to be usable)."""
        server = self.get(python, env, warmup_code)
        if server is not None:
            await server.start()
        return server

    def prepare_own(self) -> str | None:
        """At daemon start: begin preparing the fork server of the daemon's
        interpreter and environment, with the warm-up code its starter
        named (``PYREPL3_DAEMON_PREPARE``); the kernelspec whose pool the
        starter asked for too (the argv path's), if any."""
        raw = os.environ.pop(PREPARE_ENV, None)
        warmup_code, kernel_name = "", None
        if raw:
            try:
                fields = json.loads(raw)
                warmup_code = str(fields.get("warmup_code") or "")
                if isinstance(fields.get("kernel_name"), str):
                    kernel_name = fields["kernel_name"]
            except (ValueError, AttributeError):
                log.warning("ignoring %s: not a JSON object: %r", PREPARE_ENV, raw[:200])
        self.get(sys.executable, dict(os.environ), warmup_code)
        return kernel_name

    def worker_factory(
        self,
        python: str,
        env: Mapping[str, str],
        warmup_code: str,
        startup_timeout: float = 60.0,
    ) -> tuple[Any, int]:
        """A pool's ``session_factory`` (workers forked when the server can)
        and how many it may start at once."""
        server = self.get(python, env, warmup_code)

        def factory() -> WorkerProcess:
            # Looked up at each start: a server stopped meanwhile comes back.
            return WorkerProcess(
                python=python,
                env=env,
                startup_timeout=startup_timeout,
                spawner=self.get(python, env, warmup_code),
            )

        return factory, (FORKED_CONCURRENT_STARTS if server is not None else 2)

    def describe(self, python: str, env: Mapping[str, str], warmup_code: str) -> dict[str, Any]:
        from .leases import startup_key

        server = self._servers.get((python, warmup_code, startup_key(dict(env))))
        return server.describe() if server is not None else {"state": "none"}

    def describe_all(self) -> list[dict[str, Any]]:
        return [
            {"python": key[0], "warmup_code": key[1], **server.describe()}
            for key, server in self._servers.items()
        ]

    async def stop(self) -> None:
        servers, self._servers = list(self._servers.values()), {}
        await asyncio.gather(*(s.stop() for s in servers), *self._stopping, return_exceptions=True)


async def op_prepare(daemon: Any, request: dict[str, Any]) -> dict[str, Any]:
    """The ``prepare`` op: have the fork server of ``python``, ``env`` and
    ``warmup_code`` ready (``pyrepl3-kernel gateway`` asks at start, so its
    first kernel is forked); its state."""
    from .client import DaemonError

    python = request.get("python") or sys.executable
    env = request.get("env")
    warmup_code = request.get("warmup_code") or ""
    if not isinstance(python, str) or not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise DaemonError("bad_request", f"python {python!r} is not an executable file")
    if env is not None and not (
        isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise DaemonError("bad_request", "env must map strings to strings")
    if not isinstance(warmup_code, str):
        raise DaemonError("bad_request", "warmup_code must be a string")
    env = env if env is not None else dict(os.environ)
    servers: ForkServers = daemon.leases.fork_servers
    server = await servers.prepare(python, env, warmup_code)
    reply: dict[str, Any] = {
        "fork_server": server.describe() if server is not None else {"state": "disabled"}
    }
    kernel_name = request.get("kernel_name")
    if kernel_name is not None:  # and the kernelspec's pool, warming
        pool_cfg = request.get("pool") or {}
        size, max_kernels = pool_cfg.get("size", 1), pool_cfg.get("max_kernels", 256)
        if not isinstance(kernel_name, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 4096
            for v in (size, max_kernels)
        ):
            raise DaemonError("bad_request", "kernel_name must be a string, pool sizes integers")
        pool = await daemon.leases.prepare(
            kernel_name=kernel_name,
            python=python,
            env=env,
            pool_size=min(size, 64),
            max_kernels=max(1, max_kernels),
            warmup_code=warmup_code,
        )
        reply["pool"] = pool.stats
    return reply
