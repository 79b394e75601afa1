"""The kernels a daemon hands out (leases) and the warm pools their workers
come from.

A lease is a kernel (a :class:`JupyterGateway` with its ports bound and its
key chosen) whose worker came from a warm pool, or was started cold when the
launch asked for no pool. A lease is never handed out twice and its workers
never go back to a pool. Leases whose owner process died are reaped. Pools
are kept per kernelspec, python, warm-up code and start-up environment
(:func:`startup_key`): two launches share warm workers only if a worker could
not tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import sandbox
from ..curve import CurveKeys
from ..gateway import ready_channels
from ..gateway.kernel import JupyterGateway
from ..processes import alive, started_at
from ..protocol import ExecuteMessage, MessageType
from ..session import PoolConfig, PoolExhausted, SessionPool, WarmupError, WorkerStartError
from ..session.forkserver import ForkServer
from ..session.worker import WorkerProcess
from ..session.workers import ColdWorkers, PooledWorkers, WorkerSource
from ..tasks import BackgroundTasks
from ..worker.forkserver import PREBUILT_ENV
from .client import DaemonError
from .forkservers import ForkServers

log = logging.getLogger("pyrepl3.daemon")

#: Environment variables that act when an interpreter (or the worker's
#: shell) starts: workers started with different values of these are kept in
#: different pools. Every ``PYTHON*`` variable counts too (see
#: :func:`startup_key`).
STARTUP_ENV = (
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    # the locale at start-up fixes the encodings (UTF-8 mode, stdio, file names)
    "LC_ALL",
    "LC_CTYPE",
    "LANG",
    # IPython adds the active virtualenv to sys.path when the shell starts
    "VIRTUAL_ENV",
    # a sandboxed worker's sandbox is made when it starts (pyrepl3_kernel/sandbox)
    "PYREPL3_SANDBOX",
    "KERNEL_PYREPL3_SANDBOX",
)
#: PYTHON* variables read later, not at start-up (PYTHONSTARTUP: never, by a worker).
_NOT_STARTUP = frozenset({"PYTHONSTARTUP", "PYTHONBREAKPOINT", "PYTHONEXECUTABLE"})


def startup_key(env: dict[str, str]) -> tuple[Any, ...]:
    """What of ``env`` a worker takes in when it starts and cannot change
    later: two launches with the same key can share warm workers."""
    python_vars = tuple(
        sorted((k, v) for k, v in env.items() if k.startswith("PYTHON") and k not in _NOT_STARTUP)
    )
    # The shell's profile directory (history, startup files) is fixed when it starts.
    ipython_dir = env.get("IPYTHONDIR") or os.path.join(env.get("HOME", "~"), ".ipython")
    return (python_vars, ipython_dir, *(env.get(k) for k in STARTUP_ENV))


@dataclass
class Lease:
    id: str
    kernel_name: str
    kernel_id: str
    gateway: JupyterGateway
    workers: WorkerSource
    owner_pid: int
    owner_started: float | None
    pool_key: tuple[Any, ...] | None
    warm: bool
    created: float = field(default_factory=time.time)
    state: str = "running"  # running | awaiting_restart | ending
    #: A kernel handed over by ``python -m pyrepl3_kernel`` (the argv path):
    #: a restart there is a new process, so a shutdown always ends the lease.
    handoff: bool = False
    #: Set once the lease has ended (its worker gone, its ports closed).
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> dict[str, Any]:
        session = self.gateway.session
        return {
            "lease_id": self.id,
            "kernel_name": self.kernel_name,
            "kernel_id": self.kernel_id,
            "state": self.state,
            "owner_pid": self.owner_pid,
            "worker_pid": session.pid if session.is_alive else None,
            "warm": self.warm,
            "age_s": round(time.time() - self.created, 1),
            "restarts": session.restarts,
            "last_crash": session.last_crash,
            "health": session.monitor.sample() if session.is_alive else None,
            "ports": {k: v for k, v in self.gateway.connection_info.items() if k.endswith("_port")},
        }


class Leases:
    """A daemon's leases by id, and the pools their workers come from.

    ``on_activity`` is called when a lease starts and stops ending (the
    daemon's idle time counts from then)."""

    def __init__(self, *, lease_timeout: float, on_activity: Callable[[], None]) -> None:
        self.lease_timeout = lease_timeout
        self._on_activity = on_activity
        self._leases: dict[str, Lease] = {}
        self.pools: dict[tuple[Any, ...], SessionPool] = {}
        self._pool_info: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._tasks = BackgroundTasks(log)
        #: Where every pool's and cold launch's workers are forked from.
        self.fork_servers = ForkServers()
        #: First workers being forked directly, by pool key (see _forked_first).
        self._forking: dict[tuple[Any, ...], int] = {}
        #: Leases handed out since the daemon started, and how many of them warm.
        self.served = 0
        self.served_warm = 0

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._leases.values()))

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    async def create(
        self,
        *,
        kernel_name: str,
        kernel_id: str,
        python: str,
        env: dict[str, str] | None,
        cwd: str | None,
        owner_pid: int,
        pooled: bool,
        pool_size: int,
        max_kernels: int,
        warmup_code: str,
        curve: CurveKeys | None = None,
        connection_info: dict[str, Any] | None = None,
        ipython_options: list[str] | None = None,
    ) -> tuple[Lease, Callable[[], Any] | None]:
        """A new lease with its kernel started (its sockets Curve servers
        with ``curve``, if given); and what to run once the client has its
        reply (refill the pool), if anything. A worker that cannot be had
        raises :class:`DaemonError` (``exhausted``, ``worker_failed``)."""
        launch_env = env if env is not None else dict(os.environ)
        pool_key: tuple[Any, ...] | None = None
        pool: SessionPool | None = None
        workers: WorkerSource
        sandbox_cwd: str | None = None
        if pooled:
            # A sandbox shows its working directory from the start: sandboxed
            # warm workers are kept per directory.
            sandbox_cwd = sandbox.pool_cwd(launch_env, cwd)
            pool_key = (kernel_name, python, warmup_code, startup_key(launch_env), sandbox_cwd)
            pool = await self._pool(
                pool_key, python, launch_env, pool_size, max_kernels, warmup_code, sandbox_cwd
            )
            workers = PooledWorkers(
                pool, cwd=cwd, env=env, timeout=self.lease_timeout, defer_refill=True
            )
        else:
            workers = ColdWorkers(
                python=python,
                cwd=cwd,
                env=launch_env,
                ipython_options=ipython_options,
                spawner=self.fork_servers.get(python, launch_env, ""),
            )
        forked = None
        if pool is not None and pool_key is not None and sandbox_cwd is None:
            forked = self._forked_first(
                pool, pool_key, max_kernels, python, launch_env, warmup_code
            )
        with worker_errors():
            if forked is not None:
                # No warm worker: fork one for this launch (its cwd and env
                # taken on in the fork), not a pool worker to configure after.
                assert pool_key is not None and isinstance(workers, PooledWorkers)
                self._forking[pool_key] = self._forking.get(pool_key, 0) + 1
                try:
                    session = await ColdWorkers(
                        python=python, cwd=cwd, env=launch_env, spawner=forked
                    ).acquire()
                    if warmup_code.strip():
                        await _warm_up(session, warmup_code)
                finally:
                    self._forking[pool_key] -= 1
                workers = FirstForked(workers, session)
            else:
                session = await workers.acquire()
        warm = isinstance(workers, PooledWorkers) and workers.last_was_warm
        if isinstance(workers, PooledWorkers):
            workers.defer_refill = False  # later acquires (restarts) refill at once
        lease = await self.host(
            kernel_name=kernel_name,
            kernel_id=kernel_id,
            session=session,
            workers=workers,
            env=launch_env,  # limits (PYREPL3_MEMORY_LIMIT, ...) come with the launch
            owner_pid=owner_pid,
            curve=curve,
            connection_info=connection_info,
            pool_key=pool_key,
            warm=warm,
        )
        self.served_warm += int(warm)
        return lease, (pool.refill if pool is not None else None)

    def _forked_first(
        self,
        pool: SessionPool,
        pool_key: tuple[Any, ...],
        max_kernels: int,
        python: str,
        env: dict[str, str],
        warmup_code: str,
    ) -> ForkServer | None:
        """The fork server to fork a lease's first worker from directly,
        when the lease would otherwise wait for the pool to start one (no
        warm worker): the fork takes on the launch at once (no worker to
        configure after it is handed over), and the forks of a burst go to
        the server together (it forks them in one batch). None (take the
        pool's way) when a worker is warm, the server is not ready or its
        warm-up failed (the pool reports that), its forks build their shells
        (the pool runs the warm-up in each), the pool has failed to start
        workers, or the kernelspec's ``max_kernels`` are running."""
        if pool.stats["idle"] > 0 or pool.last_error is not None:
            return None
        running = sum(1 for lease in self._leases.values() if lease.pool_key == pool_key)
        if running + self._forking.get(pool_key, 0) >= max_kernels:
            return None
        if env.get(PREBUILT_ENV, "1") == "0":
            return None  # the fork builds its shell: the pool runs the warm-up in it
        server = self.fork_servers.get(python, env, warmup_code)
        if server is None or server.state != "ready" or server.warmup_error:
            return None
        return server

    async def host(
        self,
        *,
        kernel_name: str,
        kernel_id: str,
        session: WorkerProcess,
        workers: WorkerSource,
        env: dict[str, str] | None,
        owner_pid: int,
        curve: CurveKeys | None = None,
        connection_info: dict[str, Any] | None = None,
        pool_key: tuple[Any, ...] | None = None,
        warm: bool = False,
    ) -> Lease:
        """A new lease serving ``session`` (a started worker; ``workers``
        gives its replacements): its kernel started (ports bound, a new key,
        Curve servers with ``curve``; the ports and key of
        ``connection_info`` if given: the argv path), handed out, reaped and
        ended as any lease, and able to ``%fork``. ``create`` and the forks of
        live kernels (daemon/forks.py) make their leases here."""
        info = {
            "transport": "tcp",
            "ip": "127.0.0.1",
            "key": secrets.token_hex(32),
            "signature_scheme": "hmac-sha256",
            **(curve.as_info() if curve is not None else {}),
            **(connection_info or {}),  # the ports and key a launcher chose (argv path)
        }
        lease: Lease | None = None

        def on_shutdown(restart: bool) -> Any:
            assert lease is not None
            return self._on_kernel_shutdown(lease, restart)

        gateway = JupyterGateway(
            info,
            workers=workers,
            session=session,
            kernel_id=kernel_id,
            on_shutdown=on_shutdown,
            env=env,  # limits (PYREPL3_MEMORY_LIMIT, ...) come with the launch
        )
        try:
            await gateway.start()
        except BaseException:
            await gateway.stop()
            raise
        lease = Lease(
            id=uuid.uuid4().hex,
            kernel_name=kernel_name,
            kernel_id=kernel_id,
            gateway=gateway,
            workers=workers,
            owner_pid=owner_pid,
            owner_started=started_at(owner_pid),
            pool_key=pool_key,
            warm=warm,
            handoff=connection_info is not None,
        )
        self._leases[lease.id] = lease
        self.served += 1
        from .forks import offer_forks  # %fork in this kernel makes a new lease (docs/fork.md)

        offer_forks(self, lease)
        return lease

    async def prepare(
        self,
        *,
        kernel_name: str,
        python: str,
        env: dict[str, str],
        pool_size: int,
        max_kernels: int,
        warmup_code: str,
    ) -> SessionPool:
        """The pool a lease of this launch would take its worker from,
        warming now, before any lease (the first kernel is as fast as the next)."""
        # The same key as a lease's (create), or the first lease builds a pool of its own.
        sandbox_cwd = sandbox.pool_cwd(env, None)
        key = (kernel_name, python, warmup_code, startup_key(env), sandbox_cwd)
        return await self._pool(key, python, env, pool_size, max_kernels, warmup_code, sandbox_cwd)

    async def restart(self, lease: Lease) -> None:
        """Give the lease's kernel a new worker (warm if its pool has one)."""
        with worker_errors():
            await lease.gateway.restart_worker()
        lease.state = "running"
        lease.warm = isinstance(lease.workers, PooledWorkers) and lease.workers.last_was_warm

    async def let_worker_go(self, lease: Lease) -> None:
        """Stop the lease's worker and keep its kernel for a restart."""
        await lease.gateway.session.release_worker()
        lease.state = "awaiting_restart"

    async def end(self, lease: Lease) -> None:
        """Stop the lease's kernel; returns once its worker is gone (a second
        caller waits for the first). Until then the lease is ``ending``, and
        ``poll`` says it still runs: a client that sees the kernel as exited
        finds its worker gone and its ports closed."""
        if self._leases.get(lease.id) is not lease:
            return
        lease.state = "ending"
        self._on_activity()
        try:
            await lease.gateway.stop()
        finally:
            self._leases.pop(lease.id, None)
            lease.ended.set()
            self._on_activity()

    async def reap(self) -> None:
        """End the leases whose owner process is gone."""
        for lease in self:
            if not alive(lease.owner_pid, lease.owner_started):
                log.info("owner %s of lease %s is gone: reaping it", lease.owner_pid, lease.id)
                await self.end(lease)

    async def stop(self) -> None:
        """End every lease and stop every pool."""
        await asyncio.gather(*(self.end(lease) for lease in self))
        await asyncio.gather(*(pool.stop() for pool in self.pools.values()), return_exceptions=True)
        self.pools.clear()
        ready_channels.close()
        await self.fork_servers.stop()
        await self._tasks.cancel()

    def describe_pools(self) -> list[dict[str, Any]]:
        return [
            {
                **self._pool_info[key],
                **pool.stats,
                "fork_server": self.fork_servers.describe(key[1], pool.config.env or {}, key[2]),
            }
            for key, pool in self.pools.items()
        ]

    async def _on_kernel_shutdown(self, lease: Lease, restart: bool) -> None:
        if restart and not lease.handoff:
            # jupyter_client follows with a restart op; a client that restarts
            # by message alone gets a new worker on its next request.
            await self.let_worker_go(lease)
        else:
            # Not awaited here: the gateway's own task is running this.
            self._tasks.spawn(self.end(lease))

    async def _pool(
        self,
        key: tuple[Any, ...],
        python: str,
        env: dict[str, str],
        size: int,
        max_kernels: int,
        warmup_code: str,
        cwd: str | None = None,
    ) -> SessionPool:
        pool = self.pools.get(key)
        if pool is not None:
            # The latest launch's settings win for size and limit.
            pool.config.min_idle = min(size, pool.config.max_sessions)
            return pool
        # Workers forked from a warm process when it can (see forkservers.py).
        await self.fork_servers.prepare(python, env, warmup_code)
        if key in self.pools:  # another launch made it meanwhile
            return await self._pool(key, python, env, size, max_kernels, warmup_code)
        factory, concurrent = self.fork_servers.worker_factory(python, env, warmup_code)
        config = PoolConfig(
            min_idle=min(size, max_kernels),
            max_sessions=max_kernels,
            warmup_code=warmup_code,
            python=python,
            env=env,
            acquire_timeout=self.lease_timeout,
            cwd=cwd,
            session_factory=factory,
            max_concurrent_starts=concurrent,
        )
        pool = SessionPool(config)
        await pool.start(wait=False)
        # Beside the workers, plain kernels' sockets bound in advance.
        ready_channels.keep_ready(max(size, ready_channels.DEFAULT_SETS))
        self.pools[key] = pool
        self._pool_info[key] = {"kernel_name": key[0], "python": python, "warmup_code": warmup_code}
        return pool


class FirstForked(PooledWorkers):
    """A lease's workers when its first was forked for it directly (see
    :meth:`Leases._forked_first`): that one is stopped when it is let go
    (it is not the pool's); replacements come from the pool."""

    def __init__(self, pooled: PooledWorkers, first: WorkerProcess) -> None:
        super().__init__(
            pooled.pool,
            cwd=pooled.cwd,
            env=pooled.env,
            timeout=pooled.timeout,
            defer_refill=pooled.defer_refill,
        )
        self._first: WorkerProcess | None = first

    async def release(self, session: WorkerProcess) -> None:
        if session is self._first:
            self._first = None
            await session.shutdown()
        else:
            await super().release(session)


async def _warm_up(session: WorkerProcess, code: str) -> None:
    """The warm-up run again in a forked worker, as the pool runs it in
    each of its workers: its imports are the fork server's already, and
    what it makes (a connection, a seed) is this worker's own. A failure
    stops the worker and raises WarmupError."""
    msg = ExecuteMessage(code=code, silent=True, store_history=False, allow_stdin=False)
    try:
        async for reply in session.execute(msg):
            if reply.type == MessageType.EXECUTE_REPLY and getattr(reply, "status", "") != "ok":
                raise WarmupError(
                    f"warmup_code failed with {getattr(reply, 'ename', '')}: "
                    f"{getattr(reply, 'evalue', '')}"
                )
    except BaseException:
        await session.shutdown()
        raise


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """Report a worker that cannot be had with its own error code."""
    try:
        yield
    except PoolExhausted as exc:
        raise DaemonError("exhausted", str(exc)) from None
    except WorkerStartError as exc:
        raise DaemonError("worker_failed", str(exc)) from None
