"""``JupyterGateway``: one Jupyter kernel in front of one worker.

The gateway owns the kernel's five channels and key for the kernel's whole
life, translates Jupyter messaging (protocol 5.4) to the native protocol and
back, and replaces its worker when it dies. Several gateways can share one
asyncio event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session as JupyterSession

from .. import zmqsend
from ..protocol import (
    CheckpointMessage,
    CommCloseMessage,
    CommInfoMessage,
    CommMsgMessage,
    CommOpenMessage,
    CompleteMessage,
    ConfigureMessage,
    ExecuteMessage,
    ExecuteReplyMessage,
    HistoryMessage,
    InspectMessage,
    IsCompleteMessage,
    Message,
    MessageType,
)
from ..session import Session, WorkerDeadError, WorkerStartError
from ..session.limits import Limits, RestartBudget, WorkerMonitor
from ..session.workers import ColdWorkers, WorkerSource
from . import checkpoint_comm, translate
from .heartbeat import Heartbeat

log = logging.getLogger("pyrepl3.gateway")

JupyterMsg = dict[str, Any]

#: How long an is_complete_request waits for an idle worker before the
#: gateway answers it itself.
IS_COMPLETE_WORKER_TIMEOUT = 0.25
#: How long a kernel_info_request waits for the kernel's first iopub
#: subscriber (see ``_kernel_info``).
IOPUB_SUBSCRIBER_GRACE = 1.0
#: Shell requests answered by the gateway at once, even while a cell runs
#: (jupyter console gives up on is_complete after 1 s). Every other shell
#: request is answered in order, as ipykernel does; kernel_info answers at
#: once on the control channel.
IMMEDIATE_SHELL = frozenset({"is_complete_request"})
#: Comm messages that arrive while a cell runs are delivered at once (a cell
#: in a top-level await may wait for one), as ipykernel does.
COMM_MESSAGES = frozenset({"comm_open", "comm_msg", "comm_close"})


class JupyterGateway:
    """Serve one Jupyter kernel on the ports of ``connection_info``.

    Ports given as 0 are chosen at bind time; :attr:`connection_info` holds
    the final ones. ``session`` is the worker supervisor (a new
    :class:`Session` by default; a started one is adopted as it is).
    """

    def __init__(
        self,
        connection_info: dict[str, Any],
        *,
        workers: WorkerSource | None = None,
        session: Session | None = None,
        kernel_id: str | None = None,
        on_shutdown: Callable[[bool], Awaitable[None] | None] | None = None,
        autosave_dir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        info = dict(connection_info)
        key = info.get("key", b"")
        if isinstance(key, str):
            key = key.encode()
        info["key"] = key
        info.setdefault("transport", "tcp")
        info.setdefault("ip", "127.0.0.1")
        info.setdefault("signature_scheme", "hmac-sha256")
        self.connection_info = info
        self.kernel_id = kernel_id or str(uuid.uuid4())
        self.workers: WorkerSource = workers or ColdWorkers()
        # ``session`` (optional) is a started worker the gateway adopts; it
        # goes back to ``workers`` like any other.
        self._owns_session = session is not None
        self.session = session or Session()
        self.session.on_unrouted = self._on_unrouted
        #: Called with the ``restart`` flag of a shutdown_request; without it,
        #: the gateway just lets its worker go.
        self.on_shutdown = on_shutdown
        self.jsession = JupyterSession(
            key=key, signature_scheme=info["signature_scheme"], username="kernel"
        )
        self._ctx = zmq.asyncio.Context.instance()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._heartbeat: Heartbeat | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shell_queue: asyncio.Queue[tuple[list[bytes], JupyterMsg]] = asyncio.Queue()
        self._parents: collections.OrderedDict[str, JupyterMsg] = collections.OrderedDict()
        self._last_parent: JupyterMsg = {}
        self._input_requests: dict[str, str] = {}  # jupyter input_request msg_id -> native input id
        self._running_exec: str | None = None
        self._busy = False
        self._exec_count = 0
        #: A new worker replaced a crashed one: set its count before its first cell.
        self._count_to_sync = False
        self._worker_ready = asyncio.Event()
        self._iopub_subscribed = asyncio.Event()
        self._checkpoint_comms = checkpoint_comm.CheckpointComms(
            self._worker_request, self._publish
        )
        self._restarting: asyncio.Task[None] | None = None
        self._closing = False
        self.closed = asyncio.Event()
        self.restarts = 0
        self.last_crash: str | None = None
        self.started = time.time()
        self.limits = Limits.from_env(env)
        self.budget = RestartBudget(self.limits.max_restarts, self.limits.restart_window)
        self.monitor = WorkerMonitor(
            self.limits, kill=self.kill_worker, warn=self._warn_running_cell
        )
        #: Where the worker saves the state after each successful cell, for
        #: crash recovery (None: no automatic checkpoints).
        self.autosave_dir = (
            autosave_dir if autosave_dir is not None else _default_autosave_dir(self.kernel_id, env)
        )
        self._kill_reason: str | None = None
        self._halted: str | None = None  # set when the restart budget is spent
        self._recovery_note: str | None = None
        #: While a new worker loads the saved state: its death, if it dies.
        self._restoring = False
        self._restore_death: str | None = None
        self._interrupt_timer: asyncio.TimerHandle | None = None
        self._death_text: str | None = None
        self._usage_processes: dict[int, Any] = {}

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Bind the channels and bring the worker up."""
        self._bind()
        self._publish_status("starting", {})
        for channel in ("shell", "control", "stdin", "iopub"):
            self._spawn(self._recv_loop(channel))
        self._spawn(self._shell_loop())
        if self.session.is_alive:
            self._restarting = self._spawn(self._adopt_worker())
        else:
            self._restarting = self._spawn(self._start_worker())

    async def _adopt_worker(self) -> None:
        """Take on the started worker given to the constructor."""
        try:
            await self._prepare(self.session)
        except Exception as exc:
            log.error("could not configure the worker: %s", exc)
        self._worker_ready.set()

    async def _prepare(self, session: Session) -> None:
        session.on_unrouted = self._on_unrouted
        if self.autosave_dir:
            await session.request(ConfigureMessage(autosave=self.autosave_dir))
        self.monitor.attach(session.pid)

    async def wait_ready(self) -> None:
        await self._worker_ready.wait()

    async def stop(self) -> None:
        """Stop the worker and close every channel."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.release_worker()
        self._discard_autosave()
        for sock in self._sockets.values():
            sock.close(linger=200)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.closed.set()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway task failed", exc_info=task.exception())

    def _bind(self) -> None:
        info = self.connection_info
        transport, ip = info["transport"], info["ip"]
        url = f"{transport}://{ip}"
        kinds = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER, "iopub": zmq.XPUB}
        for channel, kind in kinds.items():
            sock = self._ctx.socket(kind)
            sock.linger = 1000
            if kind == zmq.ROUTER:
                # As ipykernel: a client that reconnects with its identity
                # (all clients of one KernelManager share one) takes over.
                sock.router_handover = 1
            if kind == zmq.XPUB:
                sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            port = int(info.get(f"{channel}_port") or 0)
            if transport == "tcp":
                if port:
                    sock.bind(f"{url}:{port}")
                else:
                    port = sock.bind_to_random_port(url)
            else:
                if not port:
                    raise ValueError("ipc transport needs explicit port numbers")
                sock.bind(f"{url}-{port}")
            info[f"{channel}_port"] = port
            self._sockets[channel] = sock
        self._heartbeat = Heartbeat(url, int(info.get("hb_port") or 0))
        info["hb_port"] = self._heartbeat.port
        self._heartbeat.start()

    async def release_worker(self) -> None:
        """Let the current worker go (it is never reused)."""
        self._worker_ready.clear()
        if self._owns_session:
            self._owns_session = False
            self.session.on_unrouted = None  # its exit is not a crash
            with contextlib.suppress(Exception):
                await self.workers.release(self.session)

    async def _start_worker(self, restore: bool = False) -> None:
        """A new worker; with ``restore``, the state of its predecessor's last
        successful cell is loaded into it (``_recovery_note`` says how it went)."""
        await self.release_worker()
        try:
            session = await self.workers.acquire()
            await self._prepare(session)
        except Exception as exc:
            log.error("could not start the worker: %s", exc)
            self.last_crash = str(exc)
            self._publish(
                "stream",
                {"name": "stderr", "text": f"pyrepl3: could not start a worker: {exc}\n"},
                self._last_parent,
            )
            return
        self.session = session
        self._owns_session = True
        if restore:
            # A worker replacing a crashed one continues the count (the next
            # execute tells it), so no two cells of the notebook show one.
            self._count_to_sync = True
        else:
            self._exec_count = 0  # a new worker counts from 1 again
            self._count_to_sync = False
        if restore:
            self._restoring, self._restore_death = True, None
            try:
                self._recovery_note = await self._restore_autosave()
            finally:
                self._restoring = False
            if not session.is_alive:
                await self._restore_killed_worker(session)
                return
        self._worker_ready.set()

    async def _restore_killed_worker(self, session: Session) -> None:
        """Loading the saved state killed the new worker (an object whose
        unpickling crashes): discard that state, which would kill every
        worker that loads it, and start afresh. Counts as a crash."""
        cause = self._restore_death or session.death_cause or "unknown cause"
        self.restarts += 1
        self.last_crash = cause
        self._discard_autosave()
        if not self.budget.record_crash():
            self._halted = self.budget.describe()
            log.error("restoring the saved state killed the worker (%s); %s", cause, self._halted)
            return
        log.warning("restoring the saved state killed the worker (%s); starting afresh", cause)
        await self._start_worker()
        self._recovery_note = (
            f"pyrepl3: loading the saved state killed the new worker ({cause}); the saved "
            "state was discarded and a fresh worker started: the state is lost\n"
        )

    async def _restore_autosave(self) -> str:
        """Load the automatic checkpoint into the new worker; say what happened."""
        head = "pyrepl3: a new worker is running"
        if not self.autosave_dir:
            return (
                f"{head}; the state is lost (automatic checkpoints are off: PYREPL3_AUTOSAVE=0)\n"
            )
        nothing = f"{head}; no saved state to restore (no cell had completed)\n"
        # The directory comes with the first save; ``auto.json`` only once it
        # is written: a crash right after the first cell finds the save still
        # on its way, and the restore waits for it (in the worker).
        if not os.path.isdir(self.autosave_dir):
            return nothing
        try:
            reply: Any = await self.session.request(
                CheckpointMessage(action="restore", name="auto", store=self.autosave_dir)
            )
        except WorkerDeadError as exc:
            return f"{head}, but restoring the state failed: {exc}\n"
        if getattr(reply, "status", "") != "ok":
            if not os.path.exists(os.path.join(self.autosave_dir, "auto.json")):
                return nothing
            detail = getattr(reply, "evalue", "") or getattr(reply, "detail", "")
            return f"{head}; the saved state could not be restored: {detail}\n"
        result = reply.result
        saved_cell = result.get("cell_number")  # the prompt the user saw
        if not isinstance(saved_cell, int):  # a worker from before cell_number
            count = result.get("execution_count")
            saved_cell = count - 1 if isinstance(count, int) and count > 0 else self._exec_count
        names = sorted(result.get("saved", {}))
        lines = [
            f"{head}; restored {len(names)} variable{'' if len(names) == 1 else 's'} as of cell {saved_cell}"
            + (f": {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}" if names else "")
        ]
        for var, reason in {**result.get("skipped", {}), **result.get("failed", {})}.items():
            lines.append(f"  not restored: {var}: {reason}")
        return "\n".join(lines) + "\n"

    def _discard_autosave(self) -> None:
        if self.autosave_dir:
            shutil.rmtree(self.autosave_dir, ignore_errors=True)

    async def _ensure_worker(self) -> None:
        if self._worker_ready.is_set() and not self.session.is_alive:
            self._on_worker_dead(self.session.death_cause or "unknown cause")
        if self._halted is not None:
            raise WorkerDeadError(self._halted)
        if not self._worker_ready.is_set():
            if self._restarting is None or self._restarting.done():
                self._restarting = self._spawn(self._start_worker())
            await self._restarting
            if not self._worker_ready.is_set():
                raise WorkerDeadError(self.last_crash or "the worker could not be started")

    def _on_worker_dead(self, cause: str) -> None:
        if self._closing:
            return
        self.restarts += 1
        self.last_crash = cause
        self.monitor.cell_finished()
        self._worker_ready.clear()
        if not self.budget.record_crash():
            self._halted = self.budget.describe()
            log.error("worker died (%s); %s", cause, self._halted)
            return
        log.warning("worker died (%s); starting a new one", cause)
        self._restarting = self._spawn(self._start_worker(restore=True))

    def kill_worker(self, reason: str) -> None:
        """Stop the worker at once (limits, interrupt escalation); the running
        cell's error names ``reason``, and recovery follows as for a crash."""
        pid = self.session.pid if self.session.is_alive else None
        if pid is None:
            return
        self._kill_reason = reason
        log.warning("stopping the worker: %s", reason)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def _warn_running_cell(self, text: str) -> None:
        parent = self._parents.get(self._running_exec or "", self._last_parent)
        self._publish("stream", {"name": "stderr", "text": text}, parent)

    def _death_cause(self, cause: str) -> str:
        """The words for a worker's death: the reason the gateway killed it,
        or what the exit status and the OOM counter say."""
        reason, self._kill_reason = self._kill_reason, None
        if reason is not None:
            return reason
        return self.monitor.explain_death(cause, self.session.returncode)

    async def _publish_recovery(self, parent: JupyterMsg) -> None:
        """After a crash: wait for the new worker and tell what was restored."""
        task = self._restarting
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        note: str | None
        if self._halted is not None:
            note = f"pyrepl3: {self._halted}\n"
        else:
            note, self._recovery_note = self._recovery_note, None
        if note:
            self._publish("stream", {"name": "stderr", "text": note}, parent)

    # -- receiving ----------------------------------------------------------------

    async def _recv_loop(self, channel: str) -> None:
        sock = self._sockets[channel]
        while True:
            frames = await sock.recv_multipart()
            if channel == "iopub":
                self._on_subscription(frames)
                continue
            try:
                idents, msg_list = self.jsession.feed_identities(frames)
                msg = self.jsession.deserialize(msg_list)
            except Exception as exc:
                log.warning("dropped an invalid message on %s: %s", channel, exc)
                continue
            msg_type = msg["header"].get("msg_type", "")
            if channel == "shell":
                if msg_type in IMMEDIATE_SHELL:
                    self._spawn(self._handle_shell(idents, msg))
                elif msg_type in COMM_MESSAGES and self._running_exec is not None:
                    # No busy/idle: the running cell's status stands.
                    self._spawn(self._comm(idents, msg, concurrent=True))
                else:
                    self._shell_queue.put_nowait((idents, msg))
            elif channel == "control":
                self._spawn(self._handle_control(idents, msg))
            else:
                self._handle_stdin(msg)

    def _on_subscription(self, frames: list[bytes]) -> None:
        for frame in frames:
            if frame[:1] == b"\x01":
                self._iopub_subscribed.set()
                topic = frame[1:]
                # JEP 65: tell each new subscriber that it is connected.
                self._send(
                    self._sockets["iopub"],
                    "iopub_welcome",
                    {"subscription": topic.decode(errors="replace")},
                    parent=None,
                    ident=topic or None,
                )

    async def _shell_loop(self) -> None:
        while True:
            idents, msg = await self._shell_queue.get()
            try:
                await self._handle_shell(idents, msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("error handling %s", msg["header"].get("msg_type"))

    # -- shell ----------------------------------------------------------------------

    async def _handle_shell(self, idents: list[bytes], msg: JupyterMsg) -> None:
        msg_type = msg["header"].get("msg_type", "")
        owns_status = not (msg_type in IMMEDIATE_SHELL and self._busy)
        if owns_status:
            self._busy = msg_type not in IMMEDIATE_SHELL or self._busy
            self._publish_status("busy", msg)
        try:
            handler = self._shell_handlers.get(msg_type)
            if handler is None:
                self._reply_unknown(self._sockets["shell"], idents, msg)
            else:
                await handler(self, idents, msg)
        finally:
            if owns_status:
                if msg_type not in IMMEDIATE_SHELL:
                    self._busy = False
                self._publish_status("idle", msg)

    async def _kernel_info(
        self, idents: list[bytes], msg: JupyterMsg, channel: str = "shell"
    ) -> None:
        if self._halted is None:  # a halted kernel answers at once: it has no worker
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._worker_ready.wait()), 30)
        if not self._iopub_subscribed.is_set():
            # A client connects all its channels at launch, and each retries
            # on its own timer (ZMQ: 100 ms) until the kernel has bound its
            # ports. A kernel as quick as this one could answer on shell
            # before the client's iopub subscription arrives, and XPUB drops
            # what has no subscriber: jupyter console, which waits for
            # kernel_info only, then lost all output of its first cell.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._iopub_subscribed.wait(), IOPUB_SUBSCRIBER_GRACE)
        self._reply(
            channel,
            idents,
            msg,
            "kernel_info_reply",
            translate.kernel_info_content(self.session.ready),
        )

    async def _execute(self, idents: list[bytes], msg: JupyterMsg) -> None:
        content = msg["content"]
        code = content.get("code", "")
        silent = bool(content.get("silent", False))
        store_history = bool(content.get("store_history", not silent))
        stop_on_error = bool(content.get("stop_on_error", True))
        msg_id = msg["header"]["msg_id"]
        native = ExecuteMessage(
            id=msg_id if msg_id and msg_id not in self._parents else uuid.uuid4().hex,
            code=code,
            silent=silent,
            store_history=store_history,
            user_expressions=content.get("user_expressions") or {},
            allow_stdin=bool(content.get("allow_stdin", True)),
            cell_id=(msg.get("metadata") or {}).get("cellId"),
        )
        started = datetime.now(timezone.utc).isoformat()
        reply: Any = None
        crashed = False
        self._death_text = None
        self._remember(native.id, msg)
        try:
            # A worker being replaced (crash, restart) is waited for first, so
            # the execution count shown is the new worker's.
            await self._ensure_worker()
            if self._count_to_sync:
                self._count_to_sync = False
                await self.session.request(ConfigureMessage(execution_count=self._exec_count + 1))
            if not silent:
                count = self._exec_count + 1 if store_history else self._exec_count
                self._publish("execute_input", {"code": code, "execution_count": count}, msg)
            self._running_exec = native.id
            self.monitor.cell_started()
            async for out in self.session.execute(native):
                if out.type == MessageType.EXECUTE_REPLY:
                    reply = out
                elif out.type == MessageType.INPUT:
                    self._forward_input(idents, msg, out)
                elif out.type == MessageType.ERROR and out.ename == "WorkerDied":  # type: ignore[attr-defined]
                    crashed = True
                    cause = self._death_text or self.session.death_cause or "unknown cause"
                    evalue = f"the worker process died ({cause}) while running this cell; the cell is not re-run"
                    self._publish(
                        "error",
                        {
                            "ename": "WorkerDied",
                            "evalue": evalue,
                            "traceback": [f"\x1b[0;31mWorkerDied\x1b[0m: {evalue}"],
                        },
                        msg,
                    )
                else:
                    self._publish_native(out, msg)
            if crashed and reply is not None:
                reply.evalue = evalue
                reply.traceback = [f"\x1b[0;31mWorkerDied\x1b[0m: {evalue}"]
        except WorkerDeadError as exc:
            crashed = True
            error = translate.error_reply_content("WorkerDied", exc.cause)
            self._publish("error", {k: error[k] for k in ("ename", "evalue", "traceback")}, msg)
            reply = ExecuteReplyMessage(status="error", ename="WorkerDied", evalue=exc.cause)
        finally:
            self._running_exec = None
            # An input() the cell left unanswered (interrupted, or the worker
            # died) is void: the next input_reply is for the next input().
            self._input_requests.clear()
            self.monitor.cell_finished()
            if self._interrupt_timer is not None:
                self._interrupt_timer.cancel()
                self._interrupt_timer = None
        if crashed:
            # Before the reply: the new worker, and what it got back.
            await self._publish_recovery(msg)
        if reply is None:
            reply = ExecuteReplyMessage(
                status="error", ename="WorkerDied", evalue="no reply from the worker"
            )
        reply_content = translate.execute_reply_content(reply)
        if reply.status == "ok" or not reply_content.get("execution_count"):
            reply_content["execution_count"] = reply.execution_count or self._exec_count + (
                1 if store_history and not silent else 0
            )
        self._exec_count = max(self._exec_count, reply_content["execution_count"])
        metadata = {
            "started": started,
            "dependencies_met": True,
            "engine": self.kernel_id,
            "status": reply.status,
        }
        self._reply("shell", idents, msg, "execute_reply", reply_content, metadata=metadata)
        if crashed or (reply.status == "error" and stop_on_error):
            await self._abort_queued()

    async def _abort_queued(self) -> None:
        """Reply ``aborted`` to the execute requests already queued."""
        keep: list[tuple[list[bytes], JupyterMsg]] = []
        while not self._shell_queue.empty():
            idents, msg = self._shell_queue.get_nowait()
            if msg["header"].get("msg_type") != "execute_request":
                keep.append((idents, msg))
                continue
            self._publish_status("busy", msg)
            self._reply(
                "shell",
                idents,
                msg,
                "execute_reply",
                {"status": "aborted", "execution_count": self._exec_count},
                metadata={"status": "aborted", "engine": self.kernel_id},
            )
            self._publish_status("idle", msg)
        for item in keep:
            self._shell_queue.put_nowait(item)

    async def _worker_request(self, native: Message) -> Message:
        await self._ensure_worker()
        return await self.session.request(native)

    def _forward_input(self, idents: list[bytes], parent: JupyterMsg, request: Any) -> None:
        sent = self._send(
            self._sockets["stdin"],
            "input_request",
            {"prompt": request.prompt, "password": request.password},
            parent=parent,
            ident=idents,
        )
        self._input_requests[sent["header"]["msg_id"]] = request.id
        self.monitor.input_started()
        if self._interrupt_timer is not None:
            # Python asked for input after the interrupt: the interrupt
            # landed (a prompt such as pdb's caught it), nothing is stuck.
            self._interrupt_timer.cancel()
            self._interrupt_timer = None

    async def _forward(
        self, idents: list[bytes], msg: JupyterMsg, native: Message, reply_type: str
    ) -> None:
        """Send a request to the worker; reply with its answer's fields."""
        try:
            await self._ensure_worker()
            reply: Any = None
            async for out in self.session.stream(native):
                if out.parent_id == native.id and out.type in (
                    MessageType.PROTOCOL_ERROR,
                    *_REPLY_OF.values(),
                ):
                    reply = out
                else:
                    self._publish_native(out, msg)
        except WorkerDeadError as exc:
            self._reply(
                "shell",
                idents,
                msg,
                reply_type,
                translate.error_reply_content("WorkerDied", exc.cause),
            )
            return
        if reply is None or reply.type == MessageType.PROTOCOL_ERROR:
            detail = getattr(reply, "detail", "no reply")
            self._reply(
                "shell",
                idents,
                msg,
                reply_type,
                translate.error_reply_content("KernelError", detail),
            )
            return
        if reply_type:
            fields = {
                k: v for k, v in reply.__dict__.items() if k not in ("id", "timestamp", "parent_id")
            }
            self._reply("shell", idents, msg, reply_type, fields)

    async def _complete(self, idents: list[bytes], msg: JupyterMsg) -> None:
        c = msg["content"]
        native = CompleteMessage(code=c.get("code", ""), cursor_pos=c.get("cursor_pos"))
        await self._forward(idents, msg, native, "complete_reply")

    async def _inspect(self, idents: list[bytes], msg: JupyterMsg) -> None:
        c = msg["content"]
        native = InspectMessage(
            code=c.get("code", ""),
            cursor_pos=c.get("cursor_pos"),
            detail_level=int(c.get("detail_level") or 0),
        )
        await self._forward(idents, msg, native, "inspect_reply")

    async def _history(self, idents: list[bytes], msg: JupyterMsg) -> None:
        c = msg["content"]
        native = HistoryMessage(
            hist_access_type=str(c.get("hist_access_type", "tail")),
            output=bool(c.get("output", False)),
            raw=bool(c.get("raw", True)),
            session=int(c.get("session") or 0),
            start=int(c.get("start") or 0),
            stop=c.get("stop") if isinstance(c.get("stop"), int) else None,
            n=c.get("n") if isinstance(c.get("n"), int) else None,
            pattern=str(c.get("pattern") or "*"),
            unique=bool(c.get("unique", False)),
        )
        await self._forward(idents, msg, native, "history_reply")

    async def _is_complete(self, idents: list[bytes], msg: JupyterMsg) -> None:
        code = msg["content"].get("code", "")
        content: dict[str, Any] | None = None
        if not self._busy and self.session.is_alive:
            # An idle worker answers in well under a millisecond; asking it
            # keeps IPython out of the gateway process.
            with contextlib.suppress(asyncio.TimeoutError, WorkerDeadError):
                reply: Any = await asyncio.wait_for(
                    self.session.request(IsCompleteMessage(code=code)), IS_COMPLETE_WORKER_TIMEOUT
                )
                if reply.type == MessageType.IS_COMPLETE_REPLY:
                    content = {"status": reply.status}
                    if reply.status == "incomplete":
                        content["indent"] = reply.indent
        if content is None:
            # The worker is busy with a cell: answer here, so a console
            # never waits for the cell to finish (it gives up after 1 s).
            status, indent = await asyncio.get_running_loop().run_in_executor(
                None, _check_complete, code
            )
            content = {"status": status}
            if status == "incomplete":
                content["indent"] = " " * (indent or 0)
        self._reply("shell", idents, msg, "is_complete_reply", content)

    async def _comm_info(self, idents: list[bytes], msg: JupyterMsg) -> None:
        target = msg["content"].get("target_name")
        try:
            await self._ensure_worker()
            reply: Any = await self.session.request(CommInfoMessage(target_name=target))
        except WorkerDeadError as exc:
            self._reply(
                "shell",
                idents,
                msg,
                "comm_info_reply",
                translate.error_reply_content("WorkerDied", exc.cause),
            )
            return
        comms = dict(getattr(reply, "comms", {}) or {})
        if target in (None, checkpoint_comm.TARGET):
            comms.update(
                {
                    cid: {"target_name": checkpoint_comm.TARGET}
                    for cid in self._checkpoint_comms.comm_ids
                }
            )
        self._reply("shell", idents, msg, "comm_info_reply", {"status": "ok", "comms": comms})

    async def _comm(self, idents: list[bytes], msg: JupyterMsg, concurrent: bool = False) -> None:
        if self._checkpoint_comms.handles(msg):
            await self._checkpoint_comms.handle(msg)
            return
        c = msg["content"]
        buffers = [bytes(b) for b in msg.get("buffers") or []]
        fields: dict[str, Any] = {
            "comm_id": str(c.get("comm_id", "")),
            "data": c.get("data") or {},
            "metadata": msg.get("metadata") or {},
            "buffers": buffers,
        }
        msg_type = msg["header"]["msg_type"]
        native: Message
        if msg_type == "comm_open":
            native = CommOpenMessage(
                target_name=str(c.get("target_name", "")),
                target_module=c.get("target_module"),
                **fields,
            )
        elif msg_type == "comm_msg":
            native = CommMsgMessage(**fields)
        else:
            native = CommCloseMessage(**fields)
        self._remember(native.id, msg, last=not concurrent)
        await self._forward(idents, msg, native, "")

    async def _shutdown_shell(self, idents: list[bytes], msg: JupyterMsg) -> None:
        await self._shutdown("shell", idents, msg)

    _shell_handlers: dict[str, Callable[..., Awaitable[None]]] = {
        "kernel_info_request": _kernel_info,
        "execute_request": _execute,
        "complete_request": _complete,
        "inspect_request": _inspect,
        "history_request": _history,
        "is_complete_request": _is_complete,
        "comm_info_request": _comm_info,
        "comm_open": _comm,
        "comm_msg": _comm,
        "comm_close": _comm,
        "shutdown_request": _shutdown_shell,
    }

    # -- control and stdin -------------------------------------------------------------

    async def _handle_control(self, idents: list[bytes], msg: JupyterMsg) -> None:
        # As ipykernel: busy and idle around every control request (clients
        # that track the execution state wait for that idle).
        self._publish_status("busy", msg)
        try:
            await self._dispatch_control(idents, msg)
        finally:
            self._publish_status("idle", msg)

    async def _dispatch_control(self, idents: list[bytes], msg: JupyterMsg) -> None:
        msg_type = msg["header"].get("msg_type", "")
        if msg_type == "kernel_info_request":
            await self._kernel_info(idents, msg, channel="control")
        elif msg_type == "interrupt_request":
            await self.interrupt()
            self._reply("control", idents, msg, "interrupt_reply", {"status": "ok"})
        elif msg_type == "shutdown_request":
            await self._shutdown("control", idents, msg)
        elif msg_type == "usage_request":
            self._reply("control", idents, msg, "usage_reply", self.usage())
        else:
            self._reply_unknown(self._sockets["control"], idents, msg)

    def usage(self) -> dict[str, Any]:
        """Resource usage of the worker's process tree, in the shape of
        ipykernel's usage_reply (jupyter-resource-usage reads it), plus the
        kernel's health: uptime, restarts, last crash, limits."""
        import socket as _socket

        import psutil

        content: dict[str, Any] = {"hostname": _socket.gethostname(), "pid": self.session.pid}
        procs: list[Any] = []
        if self.session.is_alive and self.session.pid:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.session.pid)
                procs = [root, *root.children(recursive=True)]
        # Process objects are kept between requests: cpu_percent measures
        # from the previous call.
        self._usage_processes = {p.pid: self._usage_processes.get(p.pid, p) for p in procs}
        cpu = 0.0
        memory = 0
        for proc in self._usage_processes.values():
            with contextlib.suppress(psutil.Error):
                cpu += proc.cpu_percent(None)
                info = proc.memory_full_info()
                memory += getattr(info, "pss", info.rss)
        content["kernel_cpu"] = cpu
        content["kernel_memory"] = memory
        content["cpu_count"] = psutil.cpu_count(logical=True)
        content["host_virtual_memory"] = dict(psutil.virtual_memory()._asdict())
        lim = self.limits
        content["pyrepl3"] = {
            "uptime_s": round(time.time() - self.started, 1),
            "restarts": self.restarts,
            "last_crash": self.last_crash,
            "halted": self._halted,
            "peak_rss": self.monitor.peak_rss,
            "limits": {
                "memory_limit": lim.memory_limit,
                "memory_soft_limit": lim.memory_soft_limit,
                "cell_timeout": lim.cell_timeout,
                "cell_cpu_limit": lim.cell_cpu_limit,
                "interrupt_grace": lim.interrupt_grace,
                "max_restarts": lim.max_restarts,
                "restart_window": lim.restart_window,
            },
        }
        return content

    def _handle_stdin(self, msg: JupyterMsg) -> None:
        if msg["header"].get("msg_type") != "input_reply":
            log.warning("unexpected message on stdin: %s", msg["header"].get("msg_type"))
            return
        parent_id = (msg.get("parent_header") or {}).get("msg_id", "")
        native_id = self._input_requests.pop(parent_id, None)
        if native_id is None and self._input_requests:
            # A client that does not set the parent header answers the oldest.
            native_id = self._input_requests.pop(next(iter(self._input_requests)))
        if native_id is None:
            log.warning("input_reply for no pending input request")
            return
        value = msg["content"].get("value", "")
        if not self._input_requests:
            self.monitor.input_finished()
        with contextlib.suppress(WorkerDeadError):
            self._spawn(self.session.input_response(native_id, str(value)))

    async def interrupt(self) -> None:
        """Interrupt the running cell (pending input() included), if any. If
        it has not ended within ``limits.interrupt_grace`` seconds (code stuck
        in C does not see KeyboardInterrupt), the worker is stopped, a new one
        started and the state of the last successful cell restored."""
        target = self._running_exec
        if target is None or not self.session.is_alive:
            return
        with contextlib.suppress(WorkerDeadError):
            await self.session.interrupt(target=target)
        if self._input_requests:
            # The interrupt ends the pending input(): the next input_reply is
            # for the input() that the cell may ask for after catching it.
            self._input_requests.clear()
            self.monitor.input_finished()
        if self._interrupt_timer is None and self.limits.interrupt_grace > 0:
            grace = self.limits.interrupt_grace

            def escalate() -> None:
                self._interrupt_timer = None
                if self._running_exec == target:
                    self.kill_worker(
                        f"the interrupt did not land within {grace:g} s (code stuck outside Python?); "
                        "the worker was stopped"
                    )

            self._interrupt_timer = asyncio.get_running_loop().call_later(grace, escalate)

    async def _shutdown(self, channel: str, idents: list[bytes], msg: JupyterMsg) -> None:
        restart = bool(msg["content"].get("restart", False))
        content = {"status": "ok", "restart": restart}
        self._reply(channel, idents, msg, "shutdown_reply", content)
        self._publish("shutdown_reply", content, msg)
        if self.on_shutdown is not None:
            result = self.on_shutdown(restart)
            if asyncio.iscoroutine(result):
                await result
        else:
            await self.release_worker()

    async def restart_worker(self) -> None:
        """Swap in a new worker; ports and key stay (restart in place). A
        restart asked for by the user starts afresh: no state is restored and
        the restart budget is reset."""
        self.budget.reset()
        self._halted = None
        self._discard_autosave()
        self._restarting = self._spawn(self._start_worker())
        await self._restarting
        if not self._worker_ready.is_set():
            raise WorkerStartError(self.last_crash or "the worker could not be started")

    # -- sending --------------------------------------------------------------------

    def _reply(
        self,
        channel: str,
        idents: list[bytes],
        parent: JupyterMsg,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if self._closing and channel not in self._sockets:
            return
        self._send(
            self._sockets[channel],
            msg_type,
            content,
            parent=parent,
            ident=idents,
            metadata=metadata,
        )

    def _send(
        self,
        sock: zmq.asyncio.Socket,
        msg_type: str,
        content: dict[str, Any],
        *,
        parent: JupyterMsg | None,
        ident: bytes | list[bytes] | None,
        metadata: dict[str, Any] | None = None,
        buffers: list[Any] | None = None,
    ) -> JupyterMsg:
        """Sign and send one message (see :mod:`pyrepl3_kernel.zmqsend`)."""
        msg: JupyterMsg = self.jsession.msg(
            msg_type, content=content, parent=parent, metadata=metadata
        )
        zmqsend.send(self.jsession, sock, msg, ident, buffers)
        return msg

    def _reply_unknown(
        self, sock: zmq.asyncio.Socket, idents: list[bytes], msg: JupyterMsg
    ) -> None:
        msg_type = msg["header"].get("msg_type", "")
        log.warning("unsupported request %r", msg_type)
        if msg_type.endswith("_request"):
            content = translate.error_reply_content(
                "NotImplementedError", f"{msg_type} is not supported by this kernel"
            )
            self._send(
                sock, msg_type[: -len("_request")] + "_reply", content, parent=msg, ident=idents
            )

    def _publish(
        self,
        msg_type: str,
        content: dict[str, Any],
        parent: JupyterMsg,
        metadata: dict[str, Any] | None = None,
        buffers: list[Any] | None = None,
    ) -> None:
        sock = self._sockets.get("iopub")
        if sock is None or sock.closed:
            return
        topic = f"kernel.{self.kernel_id}.{msg_type}".encode()
        self._send(
            sock,
            msg_type,
            content,
            parent=parent or None,
            ident=topic,
            metadata=metadata,
            buffers=buffers,
        )

    def _publish_status(self, state: str, parent: JupyterMsg) -> None:
        self._publish("status", {"execution_state": state}, parent)

    def _publish_native(self, msg: Message, parent: JupyterMsg) -> None:
        out = translate.iopub_for(msg)
        if out is not None:
            msg_type, content, metadata, buffers = out
            self._publish(msg_type, content, parent, metadata=metadata, buffers=buffers)

    def _remember(self, native_id: str, parent: JupyterMsg, last: bool = True) -> None:
        self._parents[native_id] = parent
        if last:
            self._last_parent = parent
        while len(self._parents) > 512:
            self._parents.popitem(last=False)

    def _on_unrouted(self, msg: Message) -> None:
        """Output of background threads, comm traffic after a cell ended, and
        the death of the worker."""
        parent = self._parents.get(msg.parent_id or "", self._last_parent)
        if msg.type == MessageType.STATUS and getattr(msg, "state", "") == "dead":
            # This arrives before the running cell's stream hands out the
            # error, so the cause is named here, once, for both.
            if self._restoring:  # _start_worker handles a death while restoring
                self._restore_death = self._death_cause(getattr(msg, "detail", ""))
                return
            cause = self._death_text = self._death_cause(getattr(msg, "detail", ""))
            idle = self._running_exec is None and not self._closing
            if idle:
                self._publish(
                    "stream",
                    {
                        "name": "stderr",
                        "text": f"pyrepl3: the worker process died ({cause}) while idle\n",
                    },
                    parent,
                )
            self._on_worker_dead(cause)
            if idle:
                self._spawn(self._publish_recovery(parent))
            return
        if msg.type == MessageType.PROTOCOL_ERROR:
            log.warning("protocol error from the worker: %s", msg)
            return
        self._publish_native(msg, parent)


_REPLY_OF = {
    MessageType.COMPLETE: MessageType.COMPLETE_REPLY,
    MessageType.INSPECT: MessageType.INSPECT_REPLY,
    MessageType.HISTORY: MessageType.HISTORY_REPLY,
    MessageType.COMM_INFO: MessageType.COMM_INFO_REPLY,
    MessageType.COMM_OPEN: MessageType.ACK,
}


_transformer_manager: Any = None


def _check_complete(code: str) -> tuple[str, int | None]:
    global _transformer_manager
    if _transformer_manager is None:
        from IPython.core.inputtransformer2 import TransformerManager

        _transformer_manager = TransformerManager()
    return _transformer_manager.check_complete(code)  # type: ignore[no-any-return]


def _default_autosave_dir(kernel_id: str, env: Mapping[str, str] | None = None) -> str | None:
    """``<runtime dir>/pyrepl3-autosave/<kernel id>``, unless PYREPL3_AUTOSAVE=0
    in ``env`` (the kernel's launch environment; default: this process's)."""
    env = os.environ if env is None else env
    if env.get("PYREPL3_AUTOSAVE", "1").lower() in ("0", "off", "false", "no"):
        return None
    from jupyter_core.paths import jupyter_runtime_dir

    return os.path.join(jupyter_runtime_dir(), "pyrepl3-autosave", kernel_id)
