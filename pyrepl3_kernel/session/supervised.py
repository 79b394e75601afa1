"""``Session``: a session that outlives its workers.

One worker process at a time does the work (a :class:`~.manager.Session`
talks to it); this object owns the worker's whole life around it: it starts
the worker (from a :class:`~.workers.WorkerSource`: cold, or warm from a
pool), watches the limits while a cell runs, escalates an interrupt that does
not land, names the cause when the worker dies, and replaces it, with the
state of the last successful cell restored from the automatic checkpoint,
within a restart budget. Every face (the Jupyter gateway, the REST execute,
the native API) talks to the session through this one object and only
presents what it says.

What a death looks like from outside, whoever asks:

- the cell that was running yields an ERROR ``WorkerDied`` naming the cause,
  then an OUTPUT on stderr saying what came back (``restored 3 variables as
  of cell 4: ...``), then its EXECUTE_REPLY with status ``error``;
- requests queued behind it are answered as the worker's death makes them
  (cells ``aborted``);
- a death while idle is told through ``on_unrouted`` (an OUTPUT on stderr for
  the last request, then the same note on what came back);
- the next request runs in the new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from .. import sandbox
from ..protocol import (
    WORKER_DIED,
    ConfigureMessage,
    ErrorMessage,
    ExecuteMessage,
    ExecuteReplyMessage,
    Message,
    MessageType,
    OutputMessage,
    ReadyMessage,
)
from ..sandbox.profile import Profile
from ..tasks import BackgroundTasks
from . import recovery, timetravel
from .health import UsageMeter
from .limits import Limits, RestartBudget, WorkerMonitor
from .subshells import SessionSubshells
from .worker import WorkerDeadError, WorkerProcess, WorkerStartError
from .workers import ColdWorkers, WorkerSource

log = logging.getLogger("pyrepl3.session")


def default_autosave_dir(session_id: str, env: Mapping[str, str] | None = None) -> str | None:
    """``<runtime dir>/pyrepl3-autosave/<session id>``, unless
    PYREPL3_AUTOSAVE=0 in ``env`` (default: this process's environment)."""
    env = os.environ if env is None else env
    if env.get("PYREPL3_AUTOSAVE", "1").lower() in ("0", "off", "false", "no"):
        return None
    from jupyter_core.paths import jupyter_runtime_dir

    return os.path.join(jupyter_runtime_dir(), "pyrepl3-autosave", session_id)


class Session:
    """A session whose worker is replaced, with its state, when it dies.

    >>> session = Session(memory_limit="2G", cell_timeout=600)
    >>> await session.start()
    >>> async for msg in session.execute(ExecuteMessage(code="print(1)")):
    ...     print(msg.type, getattr(msg, "data", ""))
    >>> await session.shutdown()

    Workers start cold with ``python`` (default: this interpreter) in
    ``cwd`` with ``env``; ``workers`` replaces that with another
    :class:`~.workers.WorkerSource` (a pool's), and ``worker``, if given, is a
    started worker to adopt as the first one.

    ``autosave``: where the worker saves its state after each successful
    cell, for the next worker to restore: True (default) for a directory
    under Jupyter's runtime dir named by ``session_id`` (removed at
    shutdown), a path, or False/None for no saved state (a new worker starts
    empty). Limits (see :class:`~.limits.Limits`) come from the keyword
    arguments, else from the PYREPL3_* variables of ``env`` (default: this
    process's environment). ``max_restarts=0`` turns recovery off: after the
    first death every request fails with :class:`WorkerDeadError`.
    ``keep_states`` and ``states_budget`` (e.g. ``"20G"``) bound the state
    history kept in the autosave directory (default: PYREPL3_STATES_KEEP and
    PYREPL3_STATES_BUDGET of the worker's environment, else 100 states and
    8 GiB); :meth:`states`, :meth:`checkout` and :meth:`undo` use it.
    """

    def __init__(
        self,
        *,
        python: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        worker_log_level: str = "WARNING",
        on_unrouted: Callable[[Message], None] | None = None,
        workers: WorkerSource | None = None,
        worker: WorkerProcess | None = None,
        session_id: str | None = None,
        autosave: str | bool | None = True,
        keep_states: int | None = None,
        states_budget: int | str | None = None,
        limits: Limits | None = None,
        memory_limit: int | str | None = None,
        memory_soft_limit: int | str | None = None,
        cell_timeout: float | None = None,
        cell_cpu_limit: float | None = None,
        interrupt_grace: float | None = None,
        max_restarts: int | None = None,
        restart_window: float | None = None,
        sandbox: Profile | Mapping[str, Any] | bool | None = None,
    ) -> None:
        self.id = session_id or str(uuid.uuid4())
        # A profile that cannot be used fails here, before any worker starts.
        profile = Profile.coerce(sandbox) if sandbox is not None else None
        #: What cold-started workers are given (the launch of this session).
        self.python, self.cwd = python, cwd
        self.env = dict(env) if env is not None else None
        self.workers: WorkerSource = workers or ColdWorkers(
            python=python,
            cwd=cwd,
            env=env,
            startup_timeout=startup_timeout,
            worker_log_level=worker_log_level,
            sandbox=profile,
        )
        self._owns_worker = worker is not None
        #: The worker process now serving the session.
        self.worker: WorkerProcess = worker or WorkerProcess()
        #: Called with every message that belongs to no request in progress:
        #: output of background threads and tasks, comm traffic after a cell
        #: ended, and what the session says about a death while idle.
        self.on_unrouted = on_unrouted
        #: Called with the cause whenever a worker dies (not at shutdown),
        #: before a new one is started (the gateway's debugger relay).
        self.death_listeners: list[Callable[[str], None]] = []
        self.limits = (limits or Limits.from_env(env)).replace(
            memory_limit=memory_limit,
            memory_soft_limit=memory_soft_limit,
            cell_timeout=cell_timeout,
            cell_cpu_limit=cell_cpu_limit,
            interrupt_grace=interrupt_grace,
            max_restarts=max_restarts,
            restart_window=restart_window,
        )
        self.budget = RestartBudget(self.limits.max_restarts, self.limits.restart_window)
        self.monitor = WorkerMonitor(
            self.limits,
            kill=self.kill_worker,
            warn=self._warn_running,
            running=lambda: self.worker.executing,  # a cell's time counts once it runs
        )
        #: Retention of the state history (None: the worker's environment's).
        self.keep_states, self.states_budget = keep_states, timetravel.budget_bytes(states_budget)
        if autosave is True:
            autosave = default_autosave_dir(self.id, env)
        self.autosave_dir: str | None = os.fspath(autosave) if autosave else None
        self.restarts = 0
        self.last_crash: str | None = None
        #: Why no worker is started any more (the restart budget is spent).
        self.halted: str | None = None
        self.started = time.time()
        self.execution_count = 0
        self._ready = asyncio.Event()
        self._replacing: asyncio.Task[None] | None = None
        self._count_to_sync = False
        self._kill_reason: str | None = None
        self._death_text: str | None = None
        self._recovery_note: str | None = None
        self._restoring = False
        self._restore_death: str | None = None
        self._running: str | None = None
        self._pending_inputs: set[str] = set()
        self._interrupt_timer: asyncio.TimerHandle | None = None
        self._last_request: str | None = None
        self._closing = False
        self._tasks = BackgroundTasks(log)
        self._usage = UsageMeter()
        #: The subshells (JEP 91); a new worker gets them back.
        self.subshells = SessionSubshells(self)
        self._told_note: str | None = None
        #: Set before :meth:`start` to resume a kernel on another host (see
        #: pyrepl3_kernel/cluster): the first worker restores the automatic
        #: checkpoint, and the first cell's output gives this text, then what
        #: came back.
        self.resume: str | None = None
        #: Told when a cell starts (``cell_started(id, code)``) and ends
        #: (``cell_finished()``, whose text, if any, goes to the cell's stderr).
        self.cell_observer: Any = None

    # -- what the current worker is ---------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.worker.pid

    @property
    def is_alive(self) -> bool:
        return self.worker.is_alive

    @property
    def ready(self) -> ReadyMessage | None:
        return self.worker.ready

    @property
    def is_ready(self) -> bool:
        """Whether a worker is up and configured (not being replaced)."""
        return self._ready.is_set()

    @property
    def running(self) -> str | None:
        """Id of the cell running now, if any."""
        return self._running

    @property
    def executing(self) -> str | None:
        """Id of the request the worker's main thread is on, if any."""
        return self.worker.executing

    @property
    def death_cause(self) -> str | None:
        """Why the last worker died (None while it lives)."""
        return self.worker.death_cause

    @property
    def returncode(self) -> int | None:
        return self.worker.returncode

    # -- lifecycle ------------------------------------------------------------------------

    def begin(self) -> None:
        """Start bringing the first worker up, without waiting for it."""
        if self._replacing is None:
            self._replacing = self._tasks.spawn(
                self._adopt_worker()
                if self.worker.is_alive
                else self._start_worker(restore=self.resume is not None)
            )

    async def start(self) -> None:
        """Bring the first worker up; raises WorkerStartError if it fails."""
        self.begin()
        assert self._replacing is not None
        await self._replacing
        if not self._ready.is_set():
            raise WorkerStartError(self.last_crash or "the worker could not be started")

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def shutdown(self) -> None:
        """Stop the worker; the automatic checkpoint goes with the session."""
        self._closing = True
        if self._interrupt_timer is not None:
            self._interrupt_timer.cancel()
            self._interrupt_timer = None
        self.monitor.cell_finished()
        await self._tasks.cancel()
        await self.release_worker()
        self.discard_autosave()

    async def restart(self) -> None:
        """A new worker, afresh: no state is restored and the restart budget
        is reset (a restart the user asked for)."""
        self.budget.reset()
        self.halted = None
        self.discard_autosave()
        self.subshells.forget()
        self._replacing = self._tasks.spawn(self._start_worker())
        await self._replacing
        if not self._ready.is_set():
            raise WorkerStartError(self.last_crash or "the worker could not be started")

    async def release_worker(self) -> None:
        """Let the current worker go (it is never reused)."""
        self._ready.clear()
        if self._owns_worker:
            self._owns_worker = False
            self.worker.on_unrouted = None  # its exit is not a crash
            with contextlib.suppress(Exception):
                await self.workers.release(self.worker)

    async def fork(self, **options: Any) -> Session:
        """A new session, started, whose worker is a copy-on-write fork of
        this one's, taken at an idle point: the whole namespace, sockets and
        generators included, independent afterwards (docs/fork.md). Its
        ``fork_report`` says what did not carry over. Raises ``ForkBusyError``
        while a cell runs. ``options``: ``session_id``, ``autosave``,
        ``on_unrouted`` of the new session."""
        from .fork import ForkError, fork_session

        if self.worker.sandbox is not None:  # its fork would share its sandbox
            raise ForkError(
                "a sandboxed kernel cannot be forked (the fork would share its sandbox); "
                "save a checkpoint and restore it in a new sandboxed session instead"
            )
        return await fork_session(self, **options)

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def _adopt_worker(self) -> None:
        try:
            await self._prepare(self.worker)
        except Exception as exc:
            log.error("could not configure the worker: %s", exc)
        self._ready.set()

    async def _prepare(self, worker: WorkerProcess) -> None:
        worker.on_unrouted = self._on_worker_unrouted
        await self.subshells.restore(worker)
        if self.autosave_dir and worker.sandbox_store:  # it can write only its own store
            self.autosave_dir = sandbox.adopt_store(worker.sandbox_store, self.autosave_dir)
        if self.autosave_dir:
            timetravel.write_settings(self.autosave_dir, self.keep_states, self.states_budget)
            await worker.request(ConfigureMessage(autosave=self.autosave_dir))
        self.monitor.attach(worker.pid)

    async def _start_worker(self, restore: bool = False) -> None:
        """A new worker; with ``restore``, the state of its predecessor's last
        successful cell is loaded into it (``_recovery_note`` says how it went)."""
        await self.release_worker()
        try:
            worker = await self.workers.acquire()
            await self._prepare(worker)
        except Exception as exc:
            log.error("could not start the worker: %s", exc)
            self.last_crash = str(exc)
            self._unrouted_note(f"pyrepl3: could not start a worker: {exc}\n")
            return
        self.worker = worker
        self._owns_worker = True
        # A worker replacing a crashed one continues the count (the next
        # execute tells it), so no two cells show one number.
        self._count_to_sync = restore
        if not restore:
            self.execution_count = 0  # a new worker counts from 1 again
        else:
            self._restoring, self._restore_death = True, None
            try:
                self._recovery_note = await self._restore_autosave()
            finally:
                self._restoring = False
            if not worker.is_alive:
                await self._restore_killed_worker(worker)
                return
        self._ready.set()

    async def _restore_killed_worker(self, worker: WorkerProcess) -> None:
        """Loading the saved state killed the new worker (an object whose
        unpickling crashes): discard that state, which would kill every
        worker that loads it, and start afresh. Counts as a crash."""
        cause = self._restore_death or worker.death_cause or "unknown cause"
        self.restarts += 1
        self.last_crash = cause
        self.discard_autosave()
        if not self.budget.record_crash():
            self.halted = self.budget.describe()
            log.error("restoring the saved state killed the worker (%s); %s", cause, self.halted)
            return
        log.warning("restoring the saved state killed the worker (%s); starting afresh", cause)
        await self._start_worker()
        self._recovery_note = (
            f"pyrepl3: loading the saved state killed the new worker ({cause}); the saved "
            "state was discarded and a fresh worker started: the state is lost\n"
        )

    async def _restore_autosave(self) -> str:
        """Load the automatic checkpoint into the new worker; say what happened."""
        return await recovery.restore_autosave(self.worker, self.autosave_dir, self.execution_count)

    def discard_autosave(self) -> None:
        if self.autosave_dir:
            shutil.rmtree(self.autosave_dir, ignore_errors=True)
            sandbox.discard_store(self.autosave_dir)

    async def ensure_worker(self) -> None:
        """Wait for a worker to serve the next request (one being started or
        replaced included); raises WorkerDeadError if none can be had."""
        if self._ready.is_set() and not self.worker.is_alive:
            self._on_worker_dead(self.worker.death_cause or "unknown cause")
        if self.halted is not None:
            raise WorkerDeadError(self.halted)
        if not self._ready.is_set():
            if self._replacing is None or self._replacing.done():
                self._replacing = self._tasks.spawn(self._start_worker())
            await self._replacing
            if not self._ready.is_set():
                raise WorkerDeadError(self.last_crash or "the worker could not be started")

    def _on_worker_dead(self, cause: str) -> None:
        if self._closing:
            return
        self.restarts += 1
        self.last_crash = cause
        self.monitor.cell_finished()
        for listener in list(self.death_listeners):
            listener(cause)
        self._ready.clear()
        if not self.budget.record_crash():
            self.halted = self.budget.describe()
            log.error("worker died (%s); %s", cause, self.halted)
            return
        log.warning("worker died (%s); starting a new one", cause)
        self._replacing = self._tasks.spawn(self._start_worker(restore=True))

    def kill_worker(self, reason: str) -> None:
        """Stop the worker at once (limits, interrupt escalation); the running
        cell's error names ``reason``, and recovery follows as for a crash."""
        pid = self.worker.pid if self.worker.is_alive else None
        if pid is None:
            return
        self._kill_reason = reason
        log.warning("stopping the worker: %s", reason)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def _death_cause(self, cause: str) -> str:
        """The words for a worker's death: the reason this session killed it,
        or what the exit status and the OOM counter say."""
        reason, self._kill_reason = self._kill_reason, None
        if reason is not None:
            return reason
        return self.monitor.explain_death(cause, self.worker.returncode)

    async def recovery_note(self, keep: bool = False) -> str | None:
        """After a crash: wait for the new worker; what was restored (told
        once, unless ``keep``: a subshell's cell tells it too)."""
        task = self._replacing
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        if self.halted is not None:
            return f"pyrepl3: {self.halted}\n"
        if keep:  # the main shell's cell may have taken it first
            return self._recovery_note or self._told_note
        note, self._recovery_note = self._recovery_note, None
        self._told_note = note
        return note

    def death_text(self) -> str:
        """Why the last worker died, in the words its running cells get."""
        return self._death_text or self.worker.death_cause or "unknown cause"

    def _warn_running(self, text: str) -> None:
        self._unrouted_note(text, self._running)

    def _unrouted_note(self, text: str, parent: str | None = None) -> None:
        if self.on_unrouted is not None:
            self.on_unrouted(
                OutputMessage(stream="stderr", data=text, parent_id=parent or self._last_request)
            )

    def _on_worker_unrouted(self, msg: Message) -> None:
        if msg.type == MessageType.STATUS and getattr(msg, "state", "") == "dead":
            # This arrives before the running cell's stream hands out the
            # error, so the cause is named here, once, for both.
            if self._restoring:  # _start_worker handles a death while restoring
                self._restore_death = self._death_cause(getattr(msg, "detail", ""))
                return
            cause = self._death_text = self._death_cause(getattr(msg, "detail", ""))
            idle = self._running is None and not self.subshells.running and not self._closing
            parent = msg.parent_id or self._last_request
            if idle:
                self._unrouted_note(
                    f"pyrepl3: the worker process died ({cause}) while idle\n", parent
                )
            self._on_worker_dead(cause)
            if idle:
                self._tasks.spawn(self._tell_recovery(parent))
            return
        if msg.type == MessageType.PROTOCOL_ERROR:
            log.warning("protocol error from the worker: %s", msg)
            return
        if self.on_unrouted is not None:
            self.on_unrouted(msg)

    async def _tell_recovery(self, parent: str | None) -> None:
        note = await self.recovery_note()
        if note:
            self._unrouted_note(note, parent)

    # -- requests ---------------------------------------------------------------------------

    def next_execution_count(self, message: ExecuteMessage) -> int:
        """The count the cell ``message`` will show (for execute_input)."""
        counted = message.store_history and not message.silent
        return self.execution_count + (1 if counted else 0)

    async def execute(
        self,
        message: ExecuteMessage,
        on_start: Callable[[int], None] | None = None,
    ) -> AsyncIterator[Message]:
        """Run a cell; yields every message of it, ending with its
        EXECUTE_REPLY. ``on_start`` is called with the cell's execution count
        once a worker is ready, just after the cell went to it. If the
        worker dies meanwhile, yields an ERROR naming the cause, an OUTPUT on
        stderr saying what the new worker got back, and an error reply."""
        if message.subshell_id:  # runs beside the main shell's cell
            async for out in self.subshells.execute(message, on_start):
                yield out
            return
        reply: ExecuteReplyMessage | None = None
        crashed: ErrorMessage | None = None
        self._death_text = None
        self._last_request = message.id
        try:
            # A worker being replaced (crash, restart) is waited for first, so
            # the execution count is the new worker's.
            await self.ensure_worker()
            if self._count_to_sync:
                self._count_to_sync = False
                await self.worker.request(
                    ConfigureMessage(execution_count=self.execution_count + 1)
                )
            # The cell goes to the worker first: what the caller does in
            # ``on_start`` (publishing execute_input) overlaps with the cell.
            outputs = self.worker.execute(message)
            if on_start is not None:
                on_start(self.next_execution_count(message))
            if self.resume is not None:  # the first cell after a resume on another host
                resumed, self.resume = self.resume + (self._recovery_note or ""), None
                self._recovery_note = None
                yield OutputMessage(stream="stderr", data=resumed, parent_id=message.id)
            self._running = message.id
            self.monitor.cell_started(message.id)
            if self.cell_observer is not None:
                self.cell_observer.cell_started(message.id, message.code)
            async for out in outputs:
                if out.type == MessageType.EXECUTE_REPLY:
                    assert isinstance(out, ExecuteReplyMessage)
                    reply = out
                    continue
                if out.type == MessageType.INPUT:
                    self._input_started(out.id)
                elif out.type == MessageType.ERROR and getattr(out, "ename", "") == WORKER_DIED:
                    cause = self._death_text or self.worker.death_cause or "unknown cause"
                    out = crashed = recovery.died_error(cause, message.id)
                yield out
            if crashed is not None and reply is not None:
                reply.evalue, reply.traceback = crashed.evalue, list(crashed.traceback)
        except WorkerDeadError as exc:
            crashed = ErrorMessage(
                ename=WORKER_DIED,
                evalue=exc.cause,
                traceback=[f"{WORKER_DIED}: {exc.cause}"],
                parent_id=message.id,
            )
            yield crashed
            reply = ExecuteReplyMessage(
                status="error",
                ename=WORKER_DIED,
                evalue=exc.cause,
                traceback=list(crashed.traceback),
                parent_id=message.id,
            )
        finally:
            self._running = None
            # An input() the cell left unanswered (interrupted, or the worker
            # died) is void.
            self._pending_inputs.clear()
            self.monitor.cell_finished(message.id)
            if self._interrupt_timer is not None:
                self._interrupt_timer.cancel()
                self._interrupt_timer = None
        if crashed is not None:
            # Before the reply: the new worker, and what it got back.
            note = await self.recovery_note()
            if note:
                yield OutputMessage(stream="stderr", data=note, parent_id=message.id)
        if self.cell_observer is not None:
            said = self.cell_observer.cell_finished()
            if said:
                yield OutputMessage(stream="stderr", data=said, parent_id=message.id)
        if reply is None:
            reply = ExecuteReplyMessage(
                status="error", ename=WORKER_DIED, evalue="no reply from the worker"
            )
            reply.parent_id = message.id
        if not reply.execution_count:
            # An aborted cell never ran: it takes no number of its own.
            aborted = reply.status == "aborted"
            reply.execution_count = (
                self.execution_count if aborted else self.next_execution_count(message)
            )
        self.execution_count = max(self.execution_count, reply.execution_count)
        yield reply

    async def stream(self, request: Message) -> AsyncIterator[Message]:
        """Send a request to a ready worker; yield what it causes up to its
        reply (a cell goes through :meth:`execute`)."""
        if isinstance(request, ExecuteMessage):
            async for msg in self.execute(request):
                yield msg
            return
        await self.ensure_worker()
        self._last_request = request.id
        async for msg in self.worker.stream(request):
            yield msg

    async def request(self, request: Message) -> Message:
        """Send a request to a ready worker and return its reply; messages it
        causes on the way go to ``on_unrouted``."""
        await self.ensure_worker()
        return await self.worker.request(request)

    async def configure(
        self, *, cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        await self.ensure_worker()
        await self.worker.configure(cwd=cwd, env=env)

    # -- input and interrupts ------------------------------------------------------------------

    def _input_started(self, request_id: str) -> None:
        self._pending_inputs.add(request_id)
        self.monitor.input_started()
        if self._interrupt_timer is not None:
            # Python asked for input after the interrupt: the interrupt
            # landed (a prompt such as pdb's caught it), nothing is stuck.
            self._interrupt_timer.cancel()
            self._interrupt_timer = None

    async def input_response(self, request_id: str, value: str) -> None:
        """Answer the INPUT message whose id is ``request_id``."""
        self._pending_inputs.discard(request_id)
        if not self._pending_inputs:
            self.monitor.input_finished()
        with contextlib.suppress(WorkerDeadError):
            await self.worker.input_response(request_id, value)

    async def interrupt(self) -> bool:
        """Interrupt the running cell (pending input() included), if any; says
        whether one was running. If it has not ended within
        ``limits.interrupt_grace`` seconds (code stuck in C does not see
        KeyboardInterrupt), the worker is stopped, a new one started and the
        state of the last successful cell restored."""
        target = self._running
        if target is None or not self.worker.is_alive:
            return False
        with contextlib.suppress(WorkerDeadError):
            await self.worker.interrupt(target=target)
        if self._pending_inputs:
            # The interrupt ends the pending input(): the next answer is for
            # the input() that the cell may ask for after catching it.
            self._pending_inputs.clear()
            self.monitor.input_finished()
        if self._interrupt_timer is None and self.limits.interrupt_grace > 0:
            grace = self.limits.interrupt_grace

            def escalate() -> None:
                self._interrupt_timer = None
                if self._running == target:
                    self.kill_worker(
                        f"the interrupt did not land within {grace:g} s (code stuck outside Python?); "
                        "the worker was stopped"
                    )

            self._interrupt_timer = asyncio.get_running_loop().call_later(grace, escalate)
        return True

    # -- health ---------------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """Resource usage of the worker's process tree, in the shape of
        ipykernel's usage_reply (jupyter-resource-usage reads it), plus the
        session's health: uptime, restarts, last crash, limits."""
        content = self._usage.report(self.worker.pid if self.worker.is_alive else None)
        content["pid"] = self.worker.pid
        content["pyrepl3"] = {
            "uptime_s": round(time.time() - self.started, 1),
            "restarts": self.restarts,
            "last_crash": self.last_crash,
            "halted": self.halted,
            "peak_rss": self.monitor.peak_rss,
            "limits": self.limits.describe(),
            # profile, how its limits are kept, processes now, forks refused
            "sandbox": self.worker.describe_sandbox(),
            "states_disk_bytes": timetravel.disk_usage(self.autosave_dir),
        }
        return content

    # -- time travel (docs/checkpoints.md) ------------------------------------------------------

    async def states(self) -> dict[str, Any]:
        """The states kept (one after each successful cell), the retention
        and the disk used; raises :class:`~.timetravel.TimeTravelError`."""
        return await timetravel.run(self, "states")

    async def checkout(self, cell: int) -> dict[str, Any]:
        """Put the namespace back, in place, to the state right after cell
        ``In[cell]``; the per-name report. A state that cannot be read
        raises :class:`~.timetravel.TimeTravelError`, the namespace unchanged."""
        return await timetravel.run(self, "checkout", str(int(cell)))

    async def undo(self) -> dict[str, Any]:
        """Back to the state before the last change (as ``%undo``)."""
        return await timetravel.run(self, "undo")

    def __repr__(self) -> str:
        return f"<Session {self.id} worker={self.worker!r} restarts={self.restarts}>"
