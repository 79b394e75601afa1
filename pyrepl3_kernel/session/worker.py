"""``WorkerProcess``: start and talk to one worker process.

The worker runs in its own process group. Its stdout and stderr are pipes read
here, turned into OUTPUT messages for the request running on the worker's main
thread, so everything printed before a crash still arrives. Requests and
replies travel over a socketpair. All incoming data is dispatched synchronously
in the event loop's read callbacks, which keeps stream output in order with the
worker's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from ..errors import Pyrepl3Error
from ..protocol import (
    ConfigureMessage,
    Conversation,
    ExecuteMessage,
    FrameDecoder,
    InputResponseMessage,
    InterruptMessage,
    Message,
    MessageType,
    ProtocolError,
    ProtocolErrorMessage,
    ReadyMessage,
    Reply,
    ShutdownMessage,
    StatusMessage,
    decode,
    encode,
    ends_request,
    frame,
    negotiate,
)
from ..sandbox.profile import Profile, SandboxError
from .output import PipeOutput

log = logging.getLogger("pyrepl3.session")


class WorkerStartError(Pyrepl3Error, RuntimeError):
    """The worker process did not come up."""


class WorkerDeadError(Pyrepl3Error, RuntimeError):
    """The worker process is not running; ``cause`` says why it died."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"the worker is not running ({cause}); restart the session")
        self.cause = cause


def describe_exit(returncode: int | None) -> str:
    """``exit code 3`` or ``killed by signal SIGSEGV (Segmentation fault)``."""
    if returncode is None:
        return "unknown cause"
    if returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
            text = signal.strsignal(signum) or ""
        except ValueError:
            return f"killed by signal {signum}"
        return f"killed by signal {name} ({text})" if text else f"killed by signal {name}"
    return f"exit code {returncode}"


def worker_environment(env: Mapping[str, str]) -> dict[str, str]:
    """What a worker's environment holds of ``env``: all of it but
    ``PYTHONSTARTUP``, an interactive interpreter's start-up file, which a
    worker neither has nor runs, whether started with ``env`` or configured
    with it later (a warm worker then looks like a cold one)."""
    env = dict(env)
    env.pop("PYTHONSTARTUP", None)
    return env


class WorkerSpawner(Protocol):
    """Makes a worker process some other way than a new interpreter (a fork
    server): its transport, protocol and our end of its protocol socket, or
    None to have a new interpreter started after all."""

    async def spawn(
        self,
        protocol_factory: Callable[[], asyncio.SubprocessProtocol],
        *,
        cwd: str | None,
        env: Mapping[str, str],
        log_level: str,
        ipython_options: list[str],
    ) -> tuple[asyncio.SubprocessTransport, asyncio.SubprocessProtocol, socket.socket] | None: ...


class _ControlProtocol(asyncio.Protocol):
    def __init__(self, session: WorkerProcess, generation: int) -> None:
        self.session = session
        self.generation = generation
        self.decoder = FrameDecoder()

    def data_received(self, data: bytes) -> None:
        if self.generation != self.session._generation:
            return
        for item in self.decoder.feed(data):
            self.session._on_frame(item)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session._on_worker_gone(self.generation)


class _ProcessProtocol(asyncio.SubprocessProtocol):
    def __init__(self, session: WorkerProcess, generation: int) -> None:
        self.session = session
        self.generation = generation
        self.open_pipes = {1, 2}
        self.pipes_closed = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if self.generation != self.session._generation:
            return
        self.session._on_output(fd, data if isinstance(data, bytes) else data.encode())

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.open_pipes.discard(fd)
        if not self.open_pipes and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        self.session._on_worker_gone(self.generation)


class WorkerProcess:
    """One worker process and the conversation with it.

    >>> session = WorkerProcess()
    >>> await session.start()
    >>> async for msg in session.execute(ExecuteMessage(code="print(1)")):
    ...     print(msg.type, getattr(msg, "data", ""))
    >>> await session.shutdown()
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
        ipython_options: list[str] | None = None,
        spawner: WorkerSpawner | None = None,
        sandbox: Profile | Mapping[str, Any] | bool | None = None,
    ) -> None:
        self.python = python or sys.executable
        #: The sandbox profile (pyrepl3_kernel/sandbox); by default what
        #: ``env`` asks for (PYREPL3_SANDBOX, KERNEL_PYREPL3_SANDBOX). A
        #: sandboxed worker is never forked by a spawner: it starts in its
        #: own sandbox.
        self.sandbox = (
            Profile.from_env(os.environ if env is None else env)
            if sandbox is None
            else Profile.coerce(sandbox)
        )
        self._launch: Any = None
        self._sandbox_cause: str | None = None
        #: Where the process comes from: a fork server forks it (see
        #: session/forkserver.py), or, without one or when it cannot, a new
        #: interpreter starts.
        self.spawner = spawner
        #: IPython configuration for the worker's shell, as command-line
        #: options (``--HistoryManager.hist_file=:memory:``).
        self.ipython_options = list(ipython_options or [])
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.startup_timeout = startup_timeout
        self.worker_log_level = worker_log_level
        #: Called with every message that belongs to no open request stream
        #: (output of background threads, comm traffic after a cell ended,
        #: STATUS ``dead``).
        self.on_unrouted = on_unrouted
        self.ready: ReadyMessage | None = None
        self.returncode: int | None = None
        self.death_cause: str | None = None
        self._process: asyncio.SubprocessTransport | None = None
        self._process_protocol: _ProcessProtocol | None = None
        self._control: asyncio.Transport | None = None
        self._ready_future: asyncio.Future[ReadyMessage] | None = None
        self._streams: dict[str, asyncio.Queue[Message]] = {}
        self._conversation = Conversation()
        self._startup_stderr = bytearray()
        self._output = PipeOutput(self._route)
        self._gone_task: asyncio.Task[None] | None = None
        self._dead = asyncio.Event()
        self._generation = 0
        self._shutting_down = False

    # -- lifecycle --------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.get_pid() if self._process else None

    @property
    def is_alive(self) -> bool:
        return self._process is not None and self.ready is not None and not self._dead.is_set()

    async def start(self) -> None:
        """Start the worker and wait until it is ready for requests."""
        if self._process is not None and not self._dead.is_set():
            raise RuntimeError("session already started")
        self._reset()
        generation = self._generation
        loop = asyncio.get_running_loop()
        self._ready_future = loop.create_future()
        env = worker_environment(os.environ if self.env is None else self.env)
        forked = None
        if self.spawner is not None and self.sandbox is None:
            forked = await self.spawner.spawn(
                lambda: _ProcessProtocol(self, generation),
                cwd=self.cwd,
                env=env,
                log_level=self.worker_log_level,
                ipython_options=self.ipython_options,
            )
        if forked is not None:
            self._process, self._process_protocol, parent_sock = forked  # type: ignore[assignment]
        else:
            parent_sock = await self._exec(generation, env)
        control, _ = await loop.create_unix_connection(
            lambda: _ControlProtocol(self, generation), sock=parent_sock
        )
        self._control = control
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready_future), self.startup_timeout)
        except (asyncio.TimeoutError, WorkerDeadError) as exc:
            stderr = self._startup_stderr.decode(errors="replace").strip()
            await self._kill()
            detail = (
                "did not become ready in time"
                if isinstance(exc, asyncio.TimeoutError)
                else str(exc)
            )
            raise WorkerStartError(
                f"worker {detail}" + (f":\n{stderr}" if stderr else "")
            ) from None
        try:
            self._send(negotiate(ready))
        except ProtocolError as exc:
            await self._kill()
            raise WorkerStartError(str(exc)) from None
        self.ready = ready
        self._startup_stderr.clear()

    async def _exec(self, generation: int, env: dict[str, str]) -> socket.socket:
        """Start the worker as a new interpreter; our end of its protocol socket."""
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fd = child_sock.fileno()
        cmd = [
            self.python,
            "-u",
            "-m",
            "pyrepl3_kernel.worker",
            "--fd",
            str(child_fd),
            "--parent-pid",
            str(os.getpid()),
            "--log-fd",
            "2",
            "--log-level",
            self.worker_log_level,
            *(f"--ipython-option={option}" for option in self.ipython_options),
        ]
        extra_fds: tuple[int, ...] = ()
        if self.sandbox is not None:
            try:
                cmd, env, extra_fds = self._sandboxed(cmd, env)
            except (SandboxError, OSError) as exc:
                parent_sock.close()
                child_sock.close()
                self._launch = None
                raise WorkerStartError(f"could not start the sandbox: {exc}") from exc
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _ProcessProtocol(self, generation),
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(child_fd, *extra_fds),
                start_new_session=True,
                cwd=self.cwd,
                env=env,
            )
        except OSError as exc:
            parent_sock.close()
            if self._launch is not None:
                self._launch.abandon()
                self._launch = None
            raise WorkerStartError(f"could not start the worker ({self.python}): {exc}") from exc
        finally:
            child_sock.close()
            if self._launch is not None:
                self._launch.spawned()
        self._process = transport  # type: ignore[assignment]
        self._process_protocol = protocol
        return parent_sock

    async def shutdown(self, timeout: float = 3.0) -> None:
        """Stop the worker (gracefully if it answers within ``timeout``)."""
        if self._process is None:
            return
        self._shutting_down = True
        if self.is_alive:
            try:
                await asyncio.wait_for(self.request(ShutdownMessage()), timeout)
            except Exception:
                pass  # no answer (busy or stuck): it is killed below
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._dead.wait(), timeout)
        self._generation += 1  # what the old worker does from now on is not news
        await self._kill()
        if not self._dead.is_set():
            self.death_cause = "shut down"
            self._dead.set()
            # A cell still running (or queued) must not leave its stream open.
            self._end_open_requests(self.death_cause)

    async def restart(self) -> None:
        """A new worker in place of the current one (state is not kept)."""
        await self.shutdown()
        await self.start()

    async def __aenter__(self) -> WorkerProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- requests ---------------------------------------------------------------

    def execute(self, message: ExecuteMessage) -> AsyncIterator[Message]:
        """Send code to run now; the iterator yields every message of the
        execution, ending with its EXECUTE_REPLY. If the worker dies
        meanwhile, yields an ERROR naming the cause and an EXECUTE_REPLY with
        status ``error``."""
        return self.stream(message)

    def stream(self, request: Message) -> AsyncIterator[Message]:
        """Send ``request`` now; the iterator yields everything it causes up
        to its reply. Raises :class:`WorkerDeadError` at once if the worker
        is not running."""
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._open(request, queue)
        return self._read_stream(request, queue)

    async def _read_stream(
        self, request: Message, queue: asyncio.Queue[Message]
    ) -> AsyncIterator[Message]:
        try:
            while True:
                msg = await queue.get()
                yield msg
                if ends_request(msg, request):
                    return
        finally:
            self._streams.pop(request.id, None)

    async def request(self, request: Message) -> Reply:
        """Send ``request`` and return its reply; messages it causes on the way
        are passed to ``on_unrouted``."""
        reply: Reply | None = None
        async for msg in self.stream(request):
            if ends_request(msg, request):
                assert isinstance(msg, Reply)
                reply = msg
            elif self.on_unrouted is not None:
                self.on_unrouted(msg)
        assert reply is not None
        return reply

    async def configure(
        self, *, cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        """Move the worker to ``cwd`` and give it ``env`` (the whole
        environment), as if it had been started with them."""
        if self.sandbox is not None or env is not None:
            from ..sandbox import check_configure

            check_configure(self.sandbox, self._launch, cwd, env)
        reply = await self.request(
            ConfigureMessage(cwd=cwd, env=worker_environment(env) if env is not None else None)
        )
        if not reply.ok:
            raise RuntimeError(f"could not configure the worker: {reply.evalue}")

    async def input_response(self, request_id: str, value: str) -> None:
        """Answer the INPUT message whose id is ``request_id``."""
        self._send(InputResponseMessage(parent_id=request_id, value=value))

    async def interrupt(self, target: str | None = None) -> None:
        """Interrupt the running code. Without ``target``, SIGINT goes to the
        worker's process group (subprocesses included); with it, only the
        execution with that id is interrupted, if it is still running."""
        if not self.is_alive:
            return
        if target is not None:
            self._send(InterruptMessage(target=target))
            return
        pid = self.pid
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGINT)

    @property
    def executing(self) -> str | None:
        """Id of the request the worker's main thread is on, if any."""
        return self._conversation.running

    # -- internals: sending -----------------------------------------------------

    def _open(self, request: Message, queue: asyncio.Queue[Message]) -> None:
        if not self.is_alive:
            raise WorkerDeadError(self.death_cause or "not started")
        self._conversation.send(request)  # ValueError for what gets no reply
        self._streams[request.id] = queue
        self._send(request)

    def _send(self, msg: Message) -> None:
        if self._control is None or self._control.is_closing():
            raise WorkerDeadError(self.death_cause or "not started")
        self._control.write(frame(encode(msg)))

    # -- internals: receiving (synchronous, in the loop's read callbacks) -------

    def _on_frame(self, item: bytes | ProtocolError) -> None:
        if isinstance(item, bytes):
            try:
                msg = decode(item)
            except ProtocolError as exc:
                item = exc
            else:
                self._on_message(msg)
                return
        log.warning("protocol error from worker %s: %s", self.pid, item)
        self._route(ProtocolErrorMessage(code=item.code, detail=f"from worker: {item.detail}"))

    def _on_message(self, msg: Message) -> None:
        if self._output:
            self._output.flush()
        if msg.type == MessageType.READY:
            assert isinstance(msg, ReadyMessage)
            if self._ready_future is not None and not self._ready_future.done():
                self._ready_future.set_result(msg)
            return
        ended = self._conversation.receive(msg)
        self._route(msg, final=ended is not None)

    def _on_output(self, fd: int, data: bytes) -> None:
        if self.ready is None:
            if fd == 2:
                self._startup_stderr += data[-65536:]
            return
        self._output.feed(fd, data, self._conversation.output_owner)

    def _route(self, msg: Message, final: bool = False) -> None:
        parent = msg.parent_id or ""
        queue = self._streams.get(parent)
        if queue is not None:
            queue.put_nowait(msg)
            if final:
                # The stream ends with this message: what comes later for this
                # request (output of a thread the cell left running) goes to
                # ``on_unrouted``, not to a queue nobody reads any more.
                del self._streams[parent]
        elif self.on_unrouted is not None:
            self.on_unrouted(msg)
        elif msg.type == MessageType.PROTOCOL_ERROR:
            log.warning("unrouted protocol error: %s", msg)

    # -- internals: death -------------------------------------------------------

    def _on_worker_gone(self, generation: int) -> None:
        if generation != self._generation:
            return
        if self._gone_task is None and not self._dead.is_set():
            self._gone_task = asyncio.get_running_loop().create_task(self._finish_dead_worker())

    async def _finish_dead_worker(self) -> None:
        # Deliver everything the worker wrote before it died: the pipes hold it
        # even after the process is gone. A grandchild holding a pipe open
        # must not keep us waiting, so the wait is bounded.
        proto = self._process_protocol
        if proto is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(proto.pipes_closed), 0.25)
        await self._kill()
        if self._output:
            self._output.flush()
        cause = self._sandbox_cause or describe_exit(self.returncode)
        self.death_cause = cause
        self._dead.set()
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_exception(WorkerDeadError(cause))
            return
        owner = self._conversation.output_owner
        self._end_open_requests(cause)
        # The death is news for the supervisor, not for a request stream
        # (those have just been closed with their replies).
        status = StatusMessage(state="dead", detail=cause, parent_id=owner)
        if self.on_unrouted is not None and not self._shutting_down:
            self.on_unrouted(status)

    def _end_open_requests(self, cause: str) -> None:
        """End every open request stream with what the worker's death makes of
        it (docs/protocol.md 12.2): the running cell an ERROR and an error
        reply, queued cells ``aborted``, other requests a protocol error."""
        if self._output:
            self._output.flush()  # output the worker wrote comes before the replies
        for msg in self._conversation.worker_died(cause):
            # A request nobody listens to any more (its stream was abandoned)
            # needs no ending.
            if msg.parent_id in self._streams:
                self._route(msg, final=isinstance(msg, Reply))

    async def _kill(self) -> None:
        """Kill the worker's process group and reap the worker."""
        transport = self._process
        if transport is None:
            return
        pid = transport.get_pid()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for _ in range(200):
            if transport.get_returncode() is not None:
                break
            await asyncio.sleep(0.005)
        self.returncode = transport.get_returncode()
        if self._control is not None:
            self._control.close()
        transport.close()
        if self._launch is not None:
            launch, self._launch = self._launch, None
            self._sandbox_cause = launch.explain(describe_exit(self.returncode), self.returncode)
            await launch.cleanup()

    def _reset(self) -> None:
        self._generation += 1
        self._shutting_down = False
        self.ready = None
        self.returncode = None
        self.death_cause = None
        self._process = None
        self._process_protocol = None
        self._control = None
        self._streams.clear()
        self._conversation.clear()
        self._startup_stderr.clear()
        self._output.clear()
        self._gone_task = None
        self._dead = asyncio.Event()
        self._launch = None
        self._sandbox_cause = None

    # -- the sandbox (pyrepl3_kernel/sandbox) -------------------------------------

    def _sandboxed(
        self, cmd: list[str], env: dict[str, str]
    ) -> tuple[list[str], dict[str, str], tuple[int, ...]]:
        from ..sandbox import SandboxLaunch

        assert self.sandbox is not None
        self._launch = SandboxLaunch(self.sandbox, cwd=self.cwd, python=self.python)
        return self._launch.wrap(cmd, env)

    @property
    def sandbox_store(self) -> str | None:
        """A sandboxed worker's own store directory (the only place outside
        its working directory and /tmp it can write)."""
        return self._launch.store if self._launch is not None else None

    def describe_sandbox(self) -> dict[str, Any] | None:
        return self._launch.describe() if self._launch is not None else None

    def __repr__(self) -> str:
        state = (
            "alive"
            if self.is_alive
            else (f"dead: {self.death_cause}" if self.death_cause else "not started")
        )
        return f"<WorkerProcess pid={self.pid} {state}>"
