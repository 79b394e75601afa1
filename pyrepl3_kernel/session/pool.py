"""``SessionPool``: warm sessions, ready before anyone asks.

The pool keeps warm worker processes. ``acquire`` hands one out inside a
supervised :class:`~.supervised.Session` (which takes a new worker from the
pool if its worker dies, with the state restored); ``acquire_worker`` hands
out a bare worker (what the manager daemon's kernels take). A worker is
handed out once: released, it is shut down and a fresh one warms up in its
place, so no user ever sees another user's state. Idle workers that died are
replaced.

Workers are forked from a fork server of the pool's own (``forkserver.py``:
one warm process per pool, with IPython and the warm-up code's imports, whose
forks are each reseeded, in a process group of their own, and die with their
supervisor), so a burst of acquires beyond the ready workers is warm too.
When the fork server cannot be used (a sandboxed pool, a warm-up that leaves
a thread running, a server that failed to start or died too often, or
``PoolConfig(fork_server=False)`` / ``PYREPL3_FORK_SERVER=0``) workers start
as new interpreters and :attr:`SessionPool.fork_server_state` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import Pyrepl3Error
from ..protocol import ExecuteMessage, MessageType
from ..sandbox.profile import Profile
from .forkserver import ForkServer
from .limits import Limits
from .supervised import Session
from .worker import WorkerProcess, WorkerStartError
from .workers import PooledWorkers

log = logging.getLogger("pyrepl3.pool")


#: Failed starts in a row after which the pool stops refilling (and an
#: acquire that saw as many gives up).
MAX_START_FAILURES = 3
#: Workers forked at once from the pool's fork server (a fork takes
#: milliseconds; each new worker's own set-up tens of them), as the daemon's.
FORKED_CONCURRENT_STARTS = 8
#: Set to ``0`` to start every worker as a new interpreter (as the daemon reads it).
FORK_SERVER_ENV = "PYREPL3_FORK_SERVER"


class PoolExhausted(Pyrepl3Error, RuntimeError):
    """No session could be had within the acquire timeout."""


@dataclass
class PoolConfig:
    """How a :class:`SessionPool` behaves.

    ``min_idle`` warm sessions are kept ready; at most ``max_sessions`` exist
    at once (idle, warming and handed out). ``warmup_code`` runs in every
    session before it is handed out (silently, outside the history).
    """

    min_idle: int = 2
    max_sessions: int = 10
    warmup_code: str = ""
    acquire_timeout: float = 30.0
    #: How many sessions may be warming up at the same time.
    max_concurrent_starts: int = 2
    python: str | None = None
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    startup_timeout: float = 60.0
    session_factory: Callable[[], WorkerProcess] | None = field(default=None, repr=False)
    #: How the sessions ``acquire`` hands out are supervised (see
    #: :class:`~.supervised.Session`): the state saved after each successful
    #: cell for a new worker to restore, and the limits.
    autosave: bool = True
    limits: Limits | None = None
    #: The sandbox profile of the pool's workers (pyrepl3_kernel/sandbox):
    #: a ``Profile``, a mapping of its options, or True for the defaults; by
    #: default what ``env`` asks for (PYREPL3_SANDBOX).
    sandbox: Profile | Mapping[str, Any] | bool | None = None
    #: Retention of each session's state history (see :class:`Session`).
    keep_states: int | None = None
    states_budget: int | str | None = None
    #: Fork workers from a warm fork server of the pool's own (not used with
    #: a ``session_factory``, a sandbox, or ``PYREPL3_FORK_SERVER=0``).
    #: ``max_concurrent_starts`` then bounds only the workers started cold.
    fork_server: bool = True

    def __post_init__(self) -> None:
        if self.min_idle < 0:
            raise ValueError("min_idle must be >= 0")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if self.min_idle > self.max_sessions:
            raise ValueError(
                f"min_idle ({self.min_idle}) exceeds max_sessions ({self.max_sessions})"
            )
        if self.max_concurrent_starts < 1:
            raise ValueError("max_concurrent_starts must be >= 1")
        if self.sandbox is not None:
            self.sandbox = Profile.coerce(self.sandbox)


class WarmupError(WorkerStartError):
    """The warm-up code failed; the session was discarded."""


class SessionPool:
    """A pool of warm workers, handed out as supervised sessions."""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        self._idle: list[WorkerProcess] = []
        self._leased: set[WorkerProcess] = set()
        self._sessions: set[Session] = set()
        self._starting = 0
        self._waiters = 0
        self._changed = asyncio.Condition()
        self._start_slots = asyncio.Semaphore(self.config.max_concurrent_starts)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self._consecutive_failures = 0
        self._failures = 0
        self.last_error: BaseException | None = None
        self._fork_server: ForkServer | None = None
        self._forked_slots = asyncio.Semaphore(FORKED_CONCURRENT_STARTS)
        #: Why workers start as new interpreters, if the pool does not fork
        #: them (None: no reason, or not known yet).
        self._no_fork_reason: str | None = None

    # -- public API -------------------------------------------------------------

    async def start(self, wait: bool = True) -> None:
        """Begin warming ``min_idle`` sessions; with ``wait``, until they are ready."""
        self._running = True
        self._start_fork_server()
        self._refill()
        if wait:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: (
                        len(self._idle) >= self.config.min_idle
                        or self._consecutive_failures >= MAX_START_FAILURES
                    )
                )
            if len(self._idle) < self.config.min_idle and self.last_error is not None:
                # A pool that could not start is stopped (with its fork
                # server): ``async with`` does not call __aexit__ for it.
                await self.stop()
                raise WorkerStartError(
                    f"the pool could not warm up sessions: {self.last_error}"
                ) from self.last_error

    async def acquire(self, timeout: float | None = None) -> Session:
        """A supervised session on a warm worker, for exclusive use; a worker
        is started on demand if none is idle. If its worker dies, the session
        takes a new one from this pool and restores its state.

        Raises :class:`PoolExhausted` if ``max_sessions`` are in use and none
        comes free within ``timeout`` (default: ``config.acquire_timeout``).
        """
        worker = await self.acquire_worker(timeout)
        cfg = self.config
        session = Session(
            workers=PooledWorkers(self, timeout=timeout),
            worker=worker,
            autosave=cfg.autosave,
            limits=cfg.limits,
            env=cfg.env,
            keep_states=cfg.keep_states,
            states_budget=cfg.states_budget,
        )
        self._sessions.add(session)
        try:
            await session.start()
        except BaseException:
            self._sessions.discard(session)
            await session.shutdown()
            raise
        return session

    async def acquire_worker(
        self, timeout: float | None = None, *, refill: bool = True
    ) -> WorkerProcess:
        """A warm worker for exclusive use, started on demand if none is idle.

        Raises :class:`PoolExhausted` if ``max_sessions`` are in use and none
        comes free within ``timeout`` (default: ``config.acquire_timeout``).
        With ``refill=False`` the pool is not topped up until :meth:`refill`
        is called, so a caller can hand the session over first.
        """
        if not self._running:
            raise RuntimeError("the pool is not started")
        timeout = self.config.acquire_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        failures_before = self._failures
        self._waiters += 1
        try:
            while True:
                session = self._pop_idle()
                if session is not None:
                    self._leased.add(session)
                    if refill:
                        self._refill()
                    return session
                if self._failures - failures_before >= MAX_START_FAILURES:
                    # Sessions cannot be started (a python that is not one, a
                    # failing warm-up): say so now, not after the timeout.
                    raise WorkerStartError(
                        f"could not start a session: {self.last_error}"
                    ) from self.last_error
                # One start per waiting caller at most; starts for the
                # refill count too, since their sessions go to the waiters.
                if self._starting < self._waiters and self._total < self.config.max_sessions:
                    self._spawn()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise PoolExhausted(
                        f"no session available within {timeout:.1f} s: {len(self._leased)} of "
                        f"max_sessions={self.config.max_sessions} are in use; "
                        "release one or raise max_sessions"
                    )
                async with self._changed:
                    if self._idle:
                        continue
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), remaining)
        finally:
            self._waiters -= 1

    def refill(self) -> None:
        """Start warming sessions until ``min_idle`` are idle or warming."""
        self._refill()

    async def release(self, session: Session) -> None:
        """Give a session back. It is shut down (never handed on) and the pool
        warms a replacement."""
        if session not in self._sessions:
            raise ValueError(
                "this session was not acquired from this pool (or was released already)"
            )
        self._sessions.discard(session)
        await session.shutdown()

    async def release_worker(self, session: WorkerProcess) -> None:
        """Give a worker back. It is shut down (never handed on) and the pool
        warms a replacement."""
        if session not in self._leased:
            raise ValueError(
                "this session was not acquired from this pool (or was released already)"
            )
        self._leased.discard(session)
        await session.shutdown()
        await self._notify()
        self._refill()

    async def stop(self) -> None:
        """Shut down every session, idle and leased, and stop refilling."""
        self._running = False
        server, self._fork_server = self._fork_server, None
        try:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            supervised, self._sessions = list(self._sessions), set()
            await asyncio.gather(*(s.shutdown() for s in supervised), return_exceptions=True)
            sessions = self._idle + list(self._leased)
            self._idle.clear()
            self._leased.clear()
            await asyncio.gather(*(s.shutdown() for s in sessions), return_exceptions=True)
        finally:
            if server is not None:
                await server.stop()

    @property
    def stats(self) -> dict[str, int]:
        return {
            "idle": len(self._idle),
            "leased": len(self._leased),
            "starting": self._starting,
            "max_sessions": self.config.max_sessions,
            "min_idle": self.config.min_idle,
        }

    @property
    def fork_server(self) -> ForkServer | None:
        """The pool's own fork server (None: the pool does not fork workers)."""
        return self._fork_server

    @property
    def fork_server_state(self) -> dict[str, Any]:
        """Whether the pool forks its workers, and if not, why (``reason``):
        the fork server's ``state``, ``reason``, ``pid`` and counts of
        workers ``forked`` and started cold instead (``fallbacks``)."""
        server = self._fork_server
        if server is not None:
            return server.describe()
        return {"state": "none", "reason": self._no_fork_reason}

    async def __aenter__(self) -> SessionPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- internals --------------------------------------------------------------

    @property
    def _total(self) -> int:
        return len(self._idle) + len(self._leased) + self._starting

    def _pop_idle(self) -> WorkerProcess | None:
        while self._idle:
            session = self._idle.pop(0)
            if session.is_alive:
                return session
            log.warning("discarding dead idle session: %s", session.death_cause)
        return None

    def _refill(self) -> None:
        if not self._running or self._consecutive_failures >= MAX_START_FAILURES:
            return
        self._idle = [s for s in self._idle if s.is_alive]
        missing = self.config.min_idle - len(self._idle) - self._starting
        room = self.config.max_sessions - self._total
        for _ in range(max(0, min(missing, room))):
            self._spawn()

    def _spawn(self) -> None:
        self._starting += 1
        task = asyncio.get_running_loop().create_task(self._warm_one())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _sandboxed(self) -> bool:
        cfg = self.config
        return cfg.sandbox is not None or Profile.from_env(cfg.env or os.environ) is not None

    def _start_fork_server(self) -> None:
        """Begin starting the pool's fork server, unless the pool's workers
        must not (or need not) be forked; the reason is kept."""
        cfg = self.config
        if self._fork_server is not None:
            return
        if cfg.session_factory is not None:
            self._no_fork_reason = "the pool's workers come from its session_factory"
        elif not cfg.fork_server:
            self._no_fork_reason = "PoolConfig(fork_server=False)"
        elif os.environ.get(FORK_SERVER_ENV, "1") == "0":
            self._no_fork_reason = f"{FORK_SERVER_ENV}=0"
        elif self._sandboxed():
            # A sandboxed worker starts in a sandbox of its own, never as a
            # fork of a process outside it.
            self._no_fork_reason = "sandboxed workers start in a sandbox of their own"
        else:
            self._no_fork_reason = None
            self._fork_server = ForkServer(
                python=cfg.python,
                env=cfg.env,
                warmup_code=cfg.warmup_code,
                startup_timeout=cfg.startup_timeout,
            )
            self._fork_server.start_soon()
            return
        log.info("the pool starts workers as new interpreters: %s", self._no_fork_reason)

    def _new_session(self) -> WorkerProcess:
        cfg = self.config
        # A sandboxed worker starts in a sandbox of its own, not from a
        # factory's (fork server's) process.
        sandboxed = self._sandboxed()
        if cfg.session_factory is not None and not sandboxed:
            return cfg.session_factory()
        return WorkerProcess(
            python=cfg.python,
            cwd=cfg.cwd,
            env=cfg.env,
            startup_timeout=cfg.startup_timeout,
            sandbox=cfg.sandbox,
            spawner=None if sandboxed else self._fork_server,
        )

    def _slots_for(self, session: WorkerProcess) -> asyncio.Semaphore:
        """Forked starts go 8 at a time; new interpreters ``max_concurrent_starts``."""
        server = self._fork_server
        if server is not None and session.spawner is server and server.usable:
            return self._forked_slots
        return self._start_slots

    async def _warm_one(self) -> None:
        session = self._new_session()
        try:
            async with self._slots_for(session):
                await session.start()
                if self.config.warmup_code:
                    await self._warm_up(session)
        except BaseException as exc:
            self._starting -= 1
            await session.shutdown()
            if not isinstance(exc, asyncio.CancelledError):
                self._consecutive_failures += 1
                self._failures += 1
                self.last_error = exc
                log.error("could not warm a session: %s", exc)
                self._refill()  # try again, until MAX_START_FAILURES in a row
            await self._notify()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._starting -= 1
        self._consecutive_failures = 0
        if self._running:
            self._idle.append(session)
        else:
            await session.shutdown()
        await self._notify()

    async def _warm_up(self, session: WorkerProcess) -> None:
        code = self.config.warmup_code
        msg = ExecuteMessage(code=code, silent=True, store_history=False, allow_stdin=False)
        async for reply in session.execute(msg):
            if reply.type == MessageType.EXECUTE_REPLY and getattr(reply, "status", "") != "ok":
                raise WarmupError(
                    f"warmup_code failed with {getattr(reply, 'ename', '')}: {getattr(reply, 'evalue', '')}"
                )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
