"""The worker: runs user code on the main thread, talks on an I/O thread.

Requests that touch the shell (execute, complete, inspect, history, comms, ...)
are queued to the main thread and answered in order; interrupt, input
responses, ping and health are answered on the I/O thread at once, even while
user code runs.
"""

from __future__ import annotations

import builtins
import getpass
import logging
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .._version import __version__
from ..language import language_info
from ..protocol import (
    DURING_AWAIT_REQUESTS,
    ORDERED_REQUESTS,
    SUPPORTED_VERSIONS,
    AckMessage,
    CheckpointReplyMessage,
    CommInfoReplyMessage,
    ExecuteMessage,
    ExecuteReplyMessage,
    HealthReplyMessage,
    HelloMessage,
    HistoryMessage,
    InputResponseMessage,
    InterruptMessage,
    Message,
    MessageType,
    PongMessage,
    ProtocolErrorMessage,
    ReadyMessage,
    ShutdownReplyMessage,
    failure_reply,
)
from . import history, introspection, launch, output, stdin
from .channel import Channel
from .checkpoint import Autosave, Checkpoints
from .debugger import Debugger
from .eventloop import IdleLoop, cells_loop, running_cells_loop
from .subshells import Subshells
from .transactions import TransactionManager

log = logging.getLogger("pyrepl3.worker")


CAPABILITIES = [
    "stdin",
    "interrupt",
    "comms",
    "display",
    "complete",
    "inspect",
    "history",
    "health",
]


class Worker:
    """One worker process: a shell, a channel and the request loop."""

    def __init__(self, sock: socket.socket, ipython_options: list[str] | None = None) -> None:
        self._ipython_options = list(ipython_options or [])
        self.channel = Channel(sock, (1, 2))
        self.started = time.monotonic()
        self._requests: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._inputs: dict[str, stdin.InputSlot] = {}
        self._parent: str | None = None  # request whose effects are being emitted
        self._running: str | None = None  # id of the request running user code
        #: Ids of the requests queued for the main thread (a queued one ends
        #: the wait for an automatic save's slot: a cell never waits for a
        #: save), and of those an interrupt reached while they waited
        #: (answered KeyboardInterrupt, never run).
        self._queued: set[str] = set()
        self._interrupted_queued: set[str] = set()
        self._queue_lock = threading.Lock()
        self._allow_stdin = False
        self._in_user_code = False
        self.subshells = Subshells(self)
        self._handlers: dict[MessageType, Callable[[Any], None]] = {
            MessageType.EXECUTE: self._execute,
            MessageType.COMPLETE: self._complete,
            MessageType.INSPECT: self._inspect,
            MessageType.HISTORY: self._history,
            MessageType.IS_COMPLETE: self._is_complete,
            MessageType.COMM_INFO: self._comm_info,
            MessageType.COMM_OPEN: self._comm,
            MessageType.COMM_MSG: self._comm,
            MessageType.COMM_CLOSE: self._comm,
            MessageType.CONFIGURE: self._configure,
            MessageType.CHECKPOINT: self._checkpoint,
            MessageType.FORK: self._fork,
        }
        self.shell = self._make_shell()
        #: JupyterLab's debugger (debugpy), where debugpy is installed.
        # Through self.channel at each send: the fork server gives each
        # worker it forks a channel of its own (worker/forkserver.py).
        self.debugger = Debugger(self.shell, lambda msg: self.channel.send(msg))
        self._history_writes = history.defer_writes(self.shell)
        self._act_as_ipykernel()
        self._idle_loop = IdleLoop(self._requests)
        self._set_session_name()
        self.checkpoints = Checkpoints(self.shell)
        self.transactions = TransactionManager(self.shell)
        from .fork import install_magic

        install_magic(self.shell)  # %fork inside a cell: a clear error (docs/fork.md)
        self.autosave = Autosave(self.checkpoints, [sock.fileno(), *self.channel.private_fds])
        self.shell.events.register("post_run_cell", self.autosave.after_cell)

    # -- Outlet (used by the shell hooks and comms) ---------------------------

    @property
    def parent_id(self) -> str | None:
        return self.subshells.parent_id(self._parent)  # a subshell's on its thread

    def emit(self, msg: Message) -> None:
        self.channel.drain_streams()
        self.channel.send(msg)

    # -- setup ----------------------------------------------------------------

    def _make_shell(self) -> Any:
        from traitlets.config import Config

        from . import comms
        from .shell import KernelShim, ZMQInteractiveShell

        # What the worker itself adds to its environment (here and in the
        # shell's init_environment) is done again by _configure for a launch's
        # environment: a warm worker must come out as a cold one would.
        launch.set_default_mpl_backend()
        config = Config()
        if self._ipython_options:
            from traitlets.config.loader import KVArgParseConfigLoader

            # As ipykernel takes them on its command line (nbclient passes
            # --HistoryManager.hist_file=:memory:).
            loader = KVArgParseConfigLoader([f"--{o}" for o in self._ipython_options])
            config.merge(loader.load_config())
        # tqdm.autonotebook and others look for this key to detect a kernel.
        config.IPKernelApp = Config()
        shell = ZMQInteractiveShell.instance(config=config, outlet=self)
        shell.kernel = KernelShim(self)
        shell.hidden_codes = frozenset({Worker._on_sigint.__code__})
        self.comm_manager = comms.install(self)
        builtins.input = self._input
        getpass.getpass = self._getpass
        #: The environment as the worker set it up; what is added to it later
        #: (by warm-up code) is kept across a configure (see _configure).
        self._env_baseline = dict(os.environ)
        return shell

    def _act_as_ipykernel(self) -> None:
        """What ipykernel's kernel app sets up around the shell, so that code
        sees the same process: an interruptible pdb (``pdb.set_trace()``
        stops at an interrupt instead of prompting again), ``''`` first on
        sys.path (imports from the working directory, also after
        ``os.chdir``), stdout and stderr that route a task's output to its
        cell, and a ``print`` that writes a line at once."""
        import pdb

        from IPython.core import debugger

        debugger.Pdb = debugger.InterruptiblePdb  # type: ignore[misc]
        pdb.Pdb = debugger.Pdb  # type: ignore[assignment,misc]
        pdb.set_trace = debugger.set_trace
        launch.put_cwd_on_path()
        output.install(self)

    # -- the request loop -----------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        reader = threading.Thread(
            target=self.channel.serve, args=(self._dispatch,), daemon=True, name="pyrepl3-io"
        )
        reader.start()
        self.channel.send(
            ReadyMessage(
                protocol_versions=list(SUPPORTED_VERSIONS),
                pid=os.getpid(),
                implementation="pyrepl3",
                implementation_version=__version__,
                language_info=language_info(),
                banner=self.shell.banner,
                capabilities=CAPABILITIES + self.debugger.capabilities,
            )
        )
        while True:
            # While an automatic checkpoint is pending, wake up to finish it;
            # history held back is written after a short idle time.
            timeout = self.autosave.wake_in()
            if self._history_writes is not None and self._history_writes.held_since is not None:
                timeout = min(timeout or history.IDLE_WRITE_S, history.IDLE_WRITE_S)
            try:
                # Background asyncio tasks of the cells run while we wait.
                ran = self._idle_loop.wait(timeout)
                req = self._requests.get(timeout=0 if ran else timeout)
            except queue.Empty:
                if self._history_writes is not None:
                    self._history_writes.flush()
                self.autosave.poll(until=self._queued.__len__)
                continue
            except KeyboardInterrupt:
                continue
            if req is None:
                break
            if req is self.subshells.wake:  # a subshell's cell changed the state
                self.autosave.poll(until=self._queued.__len__)
                continue
            with self._queue_lock:
                self._queued.discard(req.id)
                interrupted = req.id in self._interrupted_queued
                self._interrupted_queued.discard(req.id)
            if req.type == MessageType.SHUTDOWN:
                self._shutdown(req)
                break
            if interrupted:
                self._fail(req, "KeyboardInterrupt", "interrupted before it started")
                continue
            self._parent = output.last_request = req.id
            # What runs for this request writes as its own (tasks a cell
            # starts inherit the id: their output stays the cell's).
            output.cell_parent.set(req.id)
            try:
                self._handlers[req.type](req)
            except KeyboardInterrupt:
                self._fail(req, "KeyboardInterrupt", "interrupted")
            except Exception as exc:
                log.exception("error handling %s", req.type)
                self._fail(req, type(exc).__name__, str(exc))
            # The reply is out: now is the time for the automatic checkpoint
            # (and for the history, if it has waited long).
            if self._history_writes is not None and self._history_writes.overdue():
                self._history_writes.flush()
            if self.autosave.dirty:
                self.autosave.poll(until=self._queued.__len__)
            # Idle: what background tasks write from now on is sent as their
            # own cell's (see output.CellStream), not the last request's.
            self._parent = None

    def _dispatch(self, msg: Message) -> None:
        """Called on the I/O thread for every incoming message."""
        if self.subshells.dispatch(msg):
            return
        kind = msg.type
        if kind in DURING_AWAIT_REQUESTS and self._running is not None:
            # A cell in a top-level await may be waiting for this very
            # message (a widget's reply): hand it to the running loop, as
            # ipykernel runs comms concurrently with a busy shell.
            loop = running_cells_loop()
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._comm_during_cell, msg)
                    return
                except RuntimeError:
                    pass
        if kind in ORDERED_REQUESTS:
            with self._queue_lock:
                self._queued.add(msg.id)
            self._requests.put(msg)
            self._idle_loop.notify()
        elif kind == MessageType.INTERRUPT:
            assert isinstance(msg, InterruptMessage)
            running = self._running
            if running is not None and msg.target in (None, running):
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            elif msg.target is not None:
                with self._queue_lock:
                    if msg.target in self._queued:  # answered when it comes up
                        self._interrupted_queued.add(msg.target)
        elif kind == MessageType.INPUT_RESPONSE:
            assert isinstance(msg, InputResponseMessage)
            slot = self._inputs.get(msg.parent_id or "")
            if slot is None:
                log.warning("input_response for unknown input request %s", msg.parent_id)
            else:
                slot.value = msg.value
                slot.event.set()
        elif kind == MessageType.DEBUG_REQUEST:
            self.debugger.submit(msg)  # served on its own thread, also at a breakpoint
        elif kind == MessageType.PING:
            self.channel.send(PongMessage(parent_id=msg.id))
        elif kind == MessageType.HEALTH:
            self.channel.send(self._health(msg))
        elif kind == MessageType.HELLO:
            assert isinstance(msg, HelloMessage)
            if msg.version not in SUPPORTED_VERSIONS:
                self.channel.send(
                    ProtocolErrorMessage(
                        code="unsupported_version",
                        detail=f"version {msg.version} not supported",
                        parent_id=msg.id,
                    )
                )
        else:
            self.channel.send(
                ProtocolErrorMessage(
                    code="unexpected",
                    detail=f"a worker does not accept {kind.value!r} messages",
                    parent_id=msg.id,
                )
            )

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # An interrupt only ever lands in user code; one that arrives while the
        # worker does its own bookkeeping is dropped rather than lose a reply.
        if self._in_user_code:
            raise KeyboardInterrupt

    def _fail(self, req: Message, ename: str, evalue: str) -> None:
        self.emit(failure_reply(req, ename, evalue, execution_count=self.shell.execution_count - 1))

    # -- execution ------------------------------------------------------------

    def _execute(self, req: ExecuteMessage) -> None:
        shell = self.shell
        shell._last_traceback = None
        shell.displayhook_error = None
        shell.displayhook.in_progress = False
        self._allow_stdin = req.allow_stdin
        self._running = req.id
        result = None
        transaction = self.transactions.begin(req.code)  # None when the policy is off
        cells_loop()
        try:
            self._in_user_code = True
            result = shell.run_cell(
                req.code, store_history=req.store_history, silent=req.silent, cell_id=req.cell_id
            )
        except KeyboardInterrupt:
            pass
        finally:
            self._in_user_code = False
            self._running = None
        cells_loop()  # the cell may have made the loop: it is the cells' loop from now on
        if transaction is not None:
            self.transactions.end(transaction, result, silent=req.silent)
        self.emit(self.execute_reply(req, result, shell.execution_count - 1))

    def execute_reply(self, req: ExecuteMessage, result: Any, count: int) -> ExecuteReplyMessage:
        """The reply to a cell that ran on this thread's shell (the main one
        or a subshell's), from IPython's ``result`` (None: interrupted)."""
        shell = self.shell
        reply = ExecuteReplyMessage(parent_id=req.id, execution_count=count)
        if result is not None and result.success and shell.displayhook_error is not None:
            # The cell ran, but its result could not be shown (a __repr__ or
            # formatter raised): an error, as ipykernel replies, so that
            # nbclient and papermill stop there.
            reply.status = "error"
            reply.ename, reply.evalue = shell.displayhook_error
            reply.traceback = list(shell._last_traceback or [])
        elif result is not None and result.success:
            reply.user_expressions = self._user_expressions(req.user_expressions)
        else:
            err = None if result is None else (result.error_before_exec or result.error_in_exec)
            reply.status = "error"
            reply.ename = type(err).__name__ if err is not None else "KeyboardInterrupt"
            reply.evalue = str(err) if err is not None else ""
            reply.traceback = list(shell._last_traceback or [])
        payload_manager = shell.payload_manager
        reply.payload = self._jsonable(payload_manager.read_payload())
        payload_manager.clear_payload()
        return reply

    def _user_expressions(self, expressions: dict[str, Any]) -> dict[str, Any]:
        if not expressions:
            return {}
        return self._jsonable(self.shell.user_expressions(expressions))  # type: ignore[no-any-return]

    @staticmethod
    def _jsonable(value: Any) -> Any:
        from .shell import jsonable

        return jsonable(value)

    # -- stdin ------------------------------------------------------------------

    def _input(self, prompt: object = "") -> str:
        return self._request_input(str(prompt), password=False)

    def _getpass(self, prompt: str = "Password: ", stream: Any = None) -> str:
        return self._request_input(prompt, password=True)

    def _request_input(self, prompt: str, password: bool) -> str:
        subshell = self.subshells.current()
        if subshell is not None:
            return subshell.request_input(prompt, password)
        return stdin.request_input(self, prompt, password, self._parent, self._allow_stdin)

    # -- introspection ------------------------------------------------------------

    def _complete(self, req: Any) -> None:
        self.emit(introspection.complete(self.shell, req))

    def _inspect(self, req: Any) -> None:
        self.emit(introspection.inspect(self.shell, req))

    def _history(self, req: HistoryMessage) -> None:
        self.emit(introspection.history(self.shell, req))

    def _is_complete(self, req: Any) -> None:
        self.emit(introspection.is_complete(self.shell, req))

    # -- comms ------------------------------------------------------------------

    def _comm_info(self, req: Any) -> None:
        comms = {
            comm_id: {"target_name": c.target_name}
            for comm_id, c in list(self.comm_manager.comms.items())
            if req.target_name is None or c.target_name == req.target_name
        }
        self.emit(CommInfoReplyMessage(parent_id=req.id, comms=comms))

    def _comm(self, req: Any) -> None:
        from .comms import as_jupyter_msg

        handler = getattr(self.comm_manager, req.type.value)
        self._running = req.id
        self._allow_stdin = False
        try:
            self._in_user_code = True
            handler(None, None, as_jupyter_msg(req))
        finally:
            self._in_user_code = False
            self._running = None
        self.emit(AckMessage(parent_id=req.id))

    def _comm_during_cell(self, req: Any) -> None:
        """A comm message handled on the cells' event loop while a cell
        awaits (a callback of that loop, on the main thread). The running
        cell stays the running request."""
        from .comms import as_jupyter_msg

        reply = AckMessage(parent_id=req.id)
        try:
            getattr(self.comm_manager, req.type.value)(None, None, as_jupyter_msg(req))
        except Exception as exc:
            log.exception("error handling %s", req.type)
            reply.status, reply.ename, reply.evalue = "error", type(exc).__name__, str(exc)
        self.emit(reply)

    # -- session state ---------------------------------------------------------------

    def _checkpoint(self, req: Any) -> None:
        reply = CheckpointReplyMessage(parent_id=req.id, action=req.action, name=req.name)
        try:
            reply.result = self.checkpoints.run(
                req.action, req.name, store=req.store, clear=req.clear, force=req.force
            )
        except Exception as exc:
            reply.status = "error"
            reply.ename = type(exc).__name__
            reply.evalue = str(exc)
        self.emit(reply)

    def _fork(self, req: Any) -> None:
        from .fork import fork  # a copy-on-write copy of this worker (docs/fork.md)

        fork(self, req)

    # -- launch context -------------------------------------------------------------

    def _configure(self, req: Any) -> None:
        try:
            if req.env is not None:
                self._env_baseline = launch.take_environment(
                    self.shell, req.env, self._env_baseline
                )
            if req.cwd:
                launch.move_to(self.shell, req.cwd)
            if req.autosave is not None:
                self.autosave.configure(req.autosave)
            if req.execution_count is not None:
                self.shell.execution_count = max(1, int(req.execution_count))
            self._set_session_name()
        except OSError as exc:
            self.emit(
                AckMessage(
                    parent_id=req.id, status="error", ename=type(exc).__name__, evalue=str(exc)
                )
            )
            return
        self.emit(AckMessage(parent_id=req.id))

    def _set_session_name(self) -> None:
        # As ipykernel: the notebook's path, for code that wants to know it.
        name = os.environ.get("JPY_SESSION_NAME")
        if name:
            self.shell.user_ns["__session__"] = name

    # -- health and shutdown ------------------------------------------------------

    def _health(self, req: Message) -> HealthReplyMessage:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            rss = 0
        return HealthReplyMessage(
            parent_id=req.id,
            pid=os.getpid(),
            rss_bytes=rss,
            max_rss_bytes=usage.ru_maxrss * 1024,
            cpu_user_s=usage.ru_utime,
            cpu_system_s=usage.ru_stime,
            uptime_s=time.monotonic() - self.started,
            threads=threading.active_count(),
            executing=self._running,
            execution_count=getattr(self.shell, "execution_count", 0),
        )

    def _shutdown(self, req: Any) -> None:
        self.autosave.wait(timeout=5.0)
        try:
            self.shell.atexit_operations()
        except Exception:
            log.exception("error in atexit operations")
        sys.stdout.flush()
        sys.stderr.flush()
        self.emit(ShutdownReplyMessage(parent_id=req.id, restart=req.restart))


def _die_with_parent(parent_pid: int) -> None:
    """End the worker, and the processes its cells started, when the
    supervisor dies. Its end of the protocol socket closing does that (see
    Channel.serve); as a second way, Linux sends SIGHUP when the parent dies,
    and the handler does the same. Not SIGKILL: the worker must live long
    enough to kill its process group, or a cell's subprocesses outlive it."""
    from .channel import end_process_group

    signal.signal(signal.SIGHUP, lambda signum, frame: end_process_group())
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGHUP, 0, 0, 0)
    except Exception:
        pass
    if parent_pid and os.getppid() != parent_pid:
        end_process_group()  # the supervisor died before prctl took effect


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pyrepl3_kernel.worker")
    parser.add_argument(
        "--fd", type=int, required=True, help="inherited socket fd of the native protocol"
    )
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument(
        "--log-fd", type=int, default=-1, help="fd for the worker's own log (default: none)"
    )
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--ipython-option",
        action="append",
        default=[],
        help="IPython configuration for the shell, as Class.trait=value (repeatable)",
    )
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    sock = socket.socket(fileno=args.fd)
    os.set_inheritable(args.fd, False)
    if args.log_fd >= 0:
        os.set_inheritable(args.log_fd, False)
        handler = logging.StreamHandler(os.fdopen(args.log_fd, "w", buffering=1))
        handler.setFormatter(
            logging.Formatter("[pyrepl3 worker %(process)d] %(levelname)s %(message)s")
        )
        log.addHandler(handler)
        log.setLevel(args.log_level)
        log.propagate = False
    import faulthandler

    faulthandler.enable(file=2, all_threads=False)
    worker = Worker(sock, ipython_options=args.ipython_option)
    worker.run()
    os._exit(0)
