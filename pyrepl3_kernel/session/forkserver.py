"""``ForkServer``: warm workers in milliseconds, by forking a prepared process.

A :class:`ForkServer` runs one ``python -m pyrepl3_kernel.worker.forkserver``
process (the server; see that module for the wire and what makes a fork
safe) for one interpreter, warm-up code and start-up environment, and hands
:class:`~.worker.WorkerProcess` a forked worker through its ``spawner``
hook: a fresh protocol socket and fresh stdout/stderr pipes per worker, the
launch's working directory and environment taken on in the child.

When the server cannot be used (it is starting and fails, the warm-up code
left threads running, it died and could not be restarted), :meth:`spawn`
returns ``None`` and the worker starts as a new interpreter, as without a
fork server; :attr:`reason` says why, for the log and ``pyrepl3-kernel
status``. A server that dies is restarted on the next spawn (and at once,
if it was serving); a fork request it did not answer falls back to a new
interpreter with a new socket pair, so a half-forked child finds its
protocol socket closed and ends: no worker is handed out twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import Pyrepl3Error
from .forked import ForkedWorker

log = logging.getLogger("pyrepl3.forkserver")

#: Failed starts of the server in a row after which it is given up (spawns
#: then start new interpreters) until :meth:`ForkServer.start` is called again.
MAX_START_FAILURES = 3
_MAX_MESSAGE = 1 << 20
_FORK_FDS = 3


#: A server that dies more often than this within the window is given up.
MAX_RESTARTS_IN_WINDOW = 5
RESTART_WINDOW_S = 60.0


class ForkServerError(Pyrepl3Error, RuntimeError):
    """The fork server could not fork a worker (the caller starts one cold)."""


class ForkServer:
    """One fork server process, started on demand and restarted if it dies.

    >>> server = ForkServer(python=sys.executable, warmup_code="import json")
    >>> await server.start()          # True: ready to fork
    >>> worker = WorkerProcess(spawner=server)
    >>> await worker.start()          # forked, not a new interpreter
    """

    def __init__(
        self,
        *,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        warmup_code: str = "",
        startup_timeout: float = 60.0,
        log_level: str = "WARNING",
    ) -> None:
        self.python = python or sys.executable
        self.env = dict(env) if env is not None else None
        self.warmup_code = warmup_code
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        #: ``stopped``, ``starting``, ``ready``, ``unsafe`` (the warm-up left
        #: threads), ``failed`` (it cannot be started) or ``dead`` (it died;
        #: the next spawn restarts it).
        self.state = "stopped"
        #: Why workers are not forked now (None while ready).
        self.reason: str | None = None
        self.pid: int | None = None
        self.native_threads = 0
        self.warmup_error: str | None = None
        #: Workers forked, workers started cold instead, restarts of the server.
        self.forked = 0
        self.fallbacks = 0
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._starting: asyncio.Task[bool] | None = None
        self._waiter: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._children: dict[int, ForkedWorker] = {}
        self._early_exits: dict[int, int | None] = {}
        self._first_answer: asyncio.Future[dict[str, Any]] | None = None
        self._next_id = 0
        self._failures = 0
        self._stopping = False
        self._deaths: list[float] = []

    # -- lifecycle --------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.state in ("ready", "starting", "dead", "stopped") and not self._stopping

    async def start(self) -> bool:
        """Start the server (if it is not running) and wait until it can
        fork; False (and :attr:`reason`) if it cannot."""
        if self.state == "ready":
            return True
        if self.state in ("unsafe", "failed") and self._starting is None:
            self._failures = 0  # asked again: try again
        return await asyncio.shield(self.start_soon())

    def start_soon(self) -> asyncio.Future[bool]:
        """Begin starting the server (unless it is starting); its outcome."""
        if self._starting is None:
            task = asyncio.ensure_future(self._start())
            self._starting = task

            def done(t: asyncio.Future[bool]) -> None:
                if self._starting is t:
                    self._starting = None

            task.add_done_callback(done)
        return self._starting

    async def stop(self) -> None:
        """Stop the server. Workers it forked are not stopped: each belongs
        to its supervisor (and dies with it)."""
        self._stopping = True
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        await self._kill_server()
        self.state = "stopped"
        self.reason = "stopped"

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "reason": self.reason,
            "forked": self.forked,
            "fallbacks": self.fallbacks,
            "restarts": self.restarts,
            "native_threads": self.native_threads,
            "warmup_error": self.warmup_error,
        }

    # -- the spawner hook of WorkerProcess ---------------------------------------

    async def spawn(
        self,
        protocol_factory: Callable[[], asyncio.SubprocessProtocol],
        *,
        cwd: str | None,
        env: Mapping[str, str],
        log_level: str = "WARNING",
        ipython_options: list[str] | None = None,
    ) -> tuple[ForkedWorker, asyncio.SubprocessProtocol, socket.socket] | None:
        """A forked worker: its transport, its protocol and the supervisor's
        end of its protocol socket. ``None`` when the server cannot fork now
        (the caller starts a new interpreter; :attr:`reason` says why)."""
        if not self.usable or self._failures >= MAX_START_FAILURES:
            self.fallbacks += 1
            return None
        if self.state != "ready" and not await self.start():
            self.fallbacks += 1
            return None
        try:
            return await self._fork(
                protocol_factory, cwd=cwd, env=env, log_level=log_level, options=ipython_options
            )
        except ForkServerError as exc:
            log.warning(
                "fork server %s could not fork a worker (%s); starting it cold", self.pid, exc
            )
            self.fallbacks += 1
            return None

    async def _fork(
        self,
        protocol_factory: Callable[[], asyncio.SubprocessProtocol],
        *,
        cwd: str | None,
        env: Mapping[str, str],
        log_level: str,
        options: list[str] | None,
    ) -> tuple[ForkedWorker, asyncio.SubprocessProtocol, socket.socket]:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[int] = loop.create_future()
        self._pending[request_id] = future
        request = {
            "op": "fork",
            "id": request_id,
            "cwd": cwd,
            "env": dict(env),
            "log_level": log_level,
            "ipython_options": list(options or []),
        }
        try:
            try:
                await self._send(request, [child_sock.fileno(), out_w, err_w])
            finally:
                child_sock.close()
                os.close(out_w)
                os.close(err_w)
            pid = await asyncio.wait_for(future, self.startup_timeout)
        except BaseException as exc:
            # The child, if one was forked, finds its socket closed and ends.
            parent_sock.close()
            os.close(out_r)
            os.close(err_r)
            if isinstance(exc, (OSError, asyncio.TimeoutError, ValueError)):
                raise ForkServerError(str(exc) or type(exc).__name__) from None
            raise
        finally:
            self._pending.pop(request_id, None)
        protocol = protocol_factory()
        transport = ForkedWorker(pid, protocol)
        self._children[pid] = transport  # before any await: its exit report finds it
        if pid in self._early_exits:
            transport.exited(self._early_exits.pop(pid))
        await transport.adopt(out_r, err_r, self._on_child_gone)
        self.forked += 1
        return transport, protocol, parent_sock

    # -- internals ----------------------------------------------------------------

    async def _start(self) -> bool:
        self._stopping = False
        await self._kill_server()  # a dead one's remains
        while self._failures < MAX_START_FAILURES:
            self.state = "starting"
            try:
                answer = await asyncio.wait_for(self._launch(), self.startup_timeout)
            except (OSError, asyncio.TimeoutError, ForkServerError) as exc:
                await self._kill_server()
                self._failures += 1
                self.reason = f"the fork server did not start: {exc or type(exc).__name__}"
                log.warning("%s", self.reason)
                continue
            if answer.get("op") == "ready":
                self._failures = 0
                self.state = "ready"
                self.reason = None
                self.native_threads = int(answer.get("native_threads") or 0)
                self.warmup_error = answer.get("warmup_error")
                log.info(
                    "fork server %s ready (%s; %d native threads)",
                    self.pid,
                    self.python,
                    self.native_threads,
                )
                return True
            await self._kill_server()
            self.state = "unsafe"
            self.reason = "cannot fork workers: " + str(answer.get("reason") or answer)
            log.warning(
                "fork server for %s: %s; the pool starts workers cold", self.python, self.reason
            )
            self._failures = MAX_START_FAILURES  # it would say the same again
            return False
        self.state = "failed"
        return False

    async def _launch(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _MAX_MESSAGE * 2)
        env = dict(os.environ if self.env is None else self.env)
        env.pop("PYTHONSTARTUP", None)
        try:
            self._process = await asyncio.create_subprocess_exec(
                self.python,
                "-u",
                "-m",
                "pyrepl3_kernel.worker.forkserver",
                "--fd",
                str(theirs.fileno()),
                "--parent-pid",
                str(os.getpid()),
                "--log-level",
                self.log_level,
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                env=env,
            )
        finally:
            theirs.close()
        self.pid = self._process.pid
        ours.setblocking(False)
        self._control = ours
        await self._send({"op": "prepare", "warmup_code": self.warmup_code}, [])
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._first_answer = answer
        loop.add_reader(ours.fileno(), self._on_readable)
        self._waiter = asyncio.ensure_future(self._wait_server(self._process))
        return await answer

    async def _send(self, obj: dict[str, Any], fds: list[int]) -> None:
        import array
        import json

        sock = self._control
        if sock is None:
            raise ForkServerError("the fork server is not running")
        data = json.dumps(obj, separators=(",", ":")).encode()
        if len(data) > _MAX_MESSAGE:
            raise ForkServerError(f"a fork request of {len(data)} bytes exceeds {_MAX_MESSAGE}")
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        loop = asyncio.get_running_loop()
        for _ in range(1000):  # bounded: the server reads continuously
            try:
                sock.sendmsg([data], ancillary)
                return
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(sock.fileno(), writable.set_result, None)
                try:
                    await asyncio.wait_for(writable, 5.0)
                finally:
                    loop.remove_writer(sock.fileno())
        raise ForkServerError("the fork server does not read its requests")

    def _on_readable(self) -> None:
        sock = self._control
        if sock is None:
            return
        for _ in range(64):
            try:
                msg, fds = _receive(sock)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                self._on_server_gone()
                return
            self._on_message(msg)

    def _on_message(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op in ("ready", "unsafe"):
            first = self._first_answer
            if first is not None and not first.done():
                first.set_result(msg)
        elif op in ("forked", "fork_failed"):
            future = self._pending.get(int(msg.get("id") or 0))
            if future is not None and not future.done():
                if op == "forked":
                    future.set_result(int(msg["pid"]))
                else:
                    future.set_exception(ForkServerError(str(msg.get("error"))))
        elif op == "exited":
            pid = int(msg.get("pid") or 0)
            rc = msg.get("returncode")
            rc = rc if isinstance(rc, int) else None
            child = self._children.pop(pid, None)
            if child is not None:
                child.exited(rc)
            elif len(self._early_exits) < 1024:
                # Reported before _fork registered it (it died at once).
                self._early_exits[pid] = rc
        else:
            log.warning("fork server %s: unexpected message %r", self.pid, msg)

    def _on_child_gone(self, child: ForkedWorker) -> None:
        """The pidfd of a forked worker says it ended. The server reports how
        (``exited``); if the server is gone, nobody will."""
        child._stop_watch()
        if self.state == "ready":
            # The report follows the exit at once; give it a moment.
            asyncio.get_running_loop().call_later(1.0, self._unreported, child)
        else:
            self._unreported(child)

    def _unreported(self, child: ForkedWorker) -> None:
        if self._children.get(child.get_pid()) is child:
            del self._children[child.get_pid()]
            child.exited(None)

    def _on_server_gone(self) -> None:
        sock, self._control = self._control, None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        first = self._first_answer
        if first is not None and not first.done():
            first.set_exception(ForkServerError("the fork server exited while preparing"))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ForkServerError("the fork server died"))
        was_ready = self.state == "ready"
        if self.state in ("ready", "starting"):
            self.state = "dead"
            self.reason = "the fork server died; restarting it"
        # Its workers' exits are no longer reported: their pidfds tell.
        if was_ready and not self._stopping:
            self.restarts += 1
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(self._deaths) > MAX_RESTARTS_IN_WINDOW:
                self.state = "failed"
                self.reason = (
                    f"the fork server died {len(self._deaths)} times within "
                    f"{RESTART_WINDOW_S:.0f} s; workers start as new interpreters"
                )
                log.error("%s", self.reason)
                return
            log.warning("fork server %s died; restarting it", self.pid)
            self.start_soon()

    async def _wait_server(self, process: asyncio.subprocess.Process) -> None:
        await process.wait()
        if process is self._process:
            self._on_server_gone()

    async def _kill_server(self) -> None:
        process, self._process = self._process, None
        waiter, self._waiter = self._waiter, None
        if self._control is not None:
            self._on_server_gone_quietly()
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), 5.0)
        if waiter is not None:
            waiter.cancel()

    def _on_server_gone_quietly(self) -> None:
        sock, self._control = self._control, None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ForkServerError("the fork server was stopped"))


def _receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message from the server and the descriptors it carried (none are
    expected: they are closed); ``(None, [])`` at EOF."""
    import array
    import json

    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(
        _MAX_MESSAGE, socket.CMSG_SPACE(_FORK_FDS * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        return None, list(fds)
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    return (obj if isinstance(obj, dict) else {"op": "invalid"}), list(fds)
