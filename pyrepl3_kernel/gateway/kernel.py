"""``JupyterGateway``: one Jupyter kernel in front of one worker.

The gateway owns the kernel's five channels and key for the kernel's whole
life and translates Jupyter messaging (protocol 5.4) to the native protocol
and back. Its session (:class:`~..session.Session`) replaces the worker when it
dies; the gateway presents what the session says. Several gateways can share
one asyncio event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from ..protocol import (
    WORKER_DIED,
    CommInfoMessage,
    IsCompleteMessage,
    Message,
    MessageType,
    ShellRequest,
    ends_request,
)
from ..session.supervised import Session
from ..session.worker import WorkerDeadError, WorkerProcess
from ..session.workers import ColdWorkers, WorkerSource
from ..tasks import BackgroundTasks
from . import checkpoint_comm, fork_magic, translate
from .channels import CHANNELS, KernelChannels
from .debugger import DebugRelay
from .subshells import FEATURE as SUBSHELLS_FEATURE
from .subshells import GatewaySubshells, subshell_of

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
    the final ones. ``workers`` is where workers come from (default: cold
    starts); ``session``, if given, is a started worker to adopt as the
    first. ``autosave_dir`` (default: under the runtime dir, by kernel id)
    and the limits in ``env`` go to the kernel's supervised :class:`Session`.
    """

    def __init__(
        self,
        connection_info: dict[str, Any],
        *,
        workers: WorkerSource | None = None,
        session: WorkerProcess | None = None,
        kernel_id: str | None = None,
        on_shutdown: Callable[[bool], Awaitable[None] | None] | None = None,
        autosave_dir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.kernel_id = kernel_id or str(uuid.uuid4())
        self.channels = KernelChannels(connection_info, self.kernel_id)
        self.connection_info = self.channels.connection_info
        self.session = Session(
            workers=workers or ColdWorkers(),
            worker=session,
            session_id=self.kernel_id,
            autosave=autosave_dir if autosave_dir is not None else True,
            env=env,
            on_unrouted=self._on_unrouted,
        )
        #: Called with the ``restart`` flag of a shutdown_request; without it,
        #: the gateway just lets its worker go.
        self.on_shutdown = on_shutdown
        self._tasks = BackgroundTasks(log)
        self._shell_queue: asyncio.Queue[tuple[list[bytes], JupyterMsg]] = asyncio.Queue()
        self._parents: collections.OrderedDict[str, JupyterMsg] = collections.OrderedDict()
        self._last_parent: JupyterMsg = {}
        self._input_requests: dict[str, str] = {}  # jupyter input_request msg_id -> native input id
        self._busy = False
        self._busy_unpublished: JupyterMsg | None = None
        self._iopub_subscribed = asyncio.Event()
        self._checkpoint_comms = checkpoint_comm.CheckpointComms(
            self.session.request, self._publish
        )
        self._closing = False
        self.closed = asyncio.Event()
        self._subshells = GatewaySubshells(self)
        self._main_asked: set[str] = set()  # input requests of the main shell's cell
        #: Where ``%fork`` puts the new kernel (set by the kernel's host, the
        #: daemon); None: ``%fork`` is refused (gateway/fork_magic.py).
        self.fork_host: fork_magic.ForkHost | None = None
        self._debugger = DebugRelay(self.session.request, self._publish)
        self.session.death_listeners.append(self._debugger.worker_died)

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Bind the channels and bring the worker up."""
        self.channels.bind()
        self._publish_status("starting", {})
        for channel in CHANNELS:
            self._tasks.spawn(self._recv_loop(channel))
        self._tasks.spawn(self._shell_loop())
        self.session.begin()

    async def wait_ready(self) -> None:
        await self.session.wait_ready()

    async def stop(self) -> None:
        """Stop the worker and close every channel."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        await self._tasks.cancel()
        await self._subshells.stop()
        await self.session.shutdown()
        self.channels.close()
        self.closed.set()

    # -- receiving ----------------------------------------------------------------

    async def _recv_loop(self, channel: str) -> None:
        while True:
            frames = await self.channels.recv(channel)
            if channel == "iopub":
                self._on_subscription(frames)
                continue
            try:
                idents, msg = self.channels.parse(frames)
            except Exception as exc:
                log.warning("dropped an invalid message on %s: %s", channel, exc)
                continue
            msg_type = msg["header"].get("msg_type", "")
            if channel == "shell":
                if self._subshells.submit(idents, msg):
                    pass  # its subshell's queue (gateway/subshells.py)
                elif msg_type in IMMEDIATE_SHELL:
                    self._tasks.spawn(self._handle_shell(idents, msg))
                elif msg_type in COMM_MESSAGES and self.session.running is not None:
                    # No busy/idle: the running cell's status stands.
                    self._tasks.spawn(self._comm(idents, msg, concurrent=True))
                else:
                    self._shell_queue.put_nowait((idents, msg))
            elif channel == "control":
                self._tasks.spawn(self._handle_control(idents, msg))
            else:
                self._handle_stdin(msg)

    def _on_subscription(self, frames: list[bytes]) -> None:
        for frame in frames:
            if frame[:1] == b"\x01":
                self._iopub_subscribed.set()
                topic = frame[1:]
                # JEP 65: tell each new subscriber that it is connected.
                self.channels.send(
                    "iopub",
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
            if msg_type == "execute_request" and self.session.is_ready:
                # Published once the cell went to the worker, so the two
                # overlap (see _execute); at once while a worker comes up.
                self._busy_unpublished = msg
            else:
                self._publish_status("busy", msg)
        try:
            handler = self._shell_handlers.get(msg_type)
            if handler is None:
                self._reply_unknown("shell", idents, msg)
            else:
                await handler(self, idents, msg)
        finally:
            if owns_status:
                if msg_type not in IMMEDIATE_SHELL:
                    self._busy = False
                self._publish_busy()
                self._publish_status("idle", msg)

    async def _kernel_info(
        self, idents: list[bytes], msg: JupyterMsg, channel: str = "shell"
    ) -> None:
        if self.session.halted is None:  # a halted kernel answers at once: it has no worker
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.session.wait_ready(), 30)
        if not self._iopub_subscribed.is_set():
            # A client connects all its channels at launch, and each retries
            # on its own timer (ZMQ: 100 ms) until the kernel has bound its
            # ports. A kernel as quick as this one could answer on shell
            # before the client's iopub subscription arrives, and XPUB drops
            # what has no subscriber: jupyter console, which waits for
            # kernel_info only, then lost all output of its first cell.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._iopub_subscribed.wait(), IOPUB_SUBSCRIBER_GRACE)
        content = translate.kernel_info_content(self.session.ready)
        content["supported_features"] = [*content["supported_features"], SUBSHELLS_FEATURE]
        self._reply(channel, idents, msg, "kernel_info_reply", content)

    async def _execute(self, idents: list[bytes], msg: JupyterMsg) -> None:
        if fork_magic.is_fork_cell(msg["content"].get("code", "")):
            await fork_magic.run_fork_cell(self, idents, msg)  # between cells, not in one
            return
        msg_id = msg["header"]["msg_id"]
        native = translate.execute_request(
            msg, msg_id if msg_id and msg_id not in self._parents else uuid.uuid4().hex
        )
        native.subshell_id = subshell_of(msg)
        asked: set[str] = set()  # its input requests
        if native.subshell_id is None:
            self._main_asked = asked
        stop_on_error = bool(msg["content"].get("stop_on_error", True))
        started = datetime.now(timezone.utc).isoformat()
        reply: Any = None
        self._remember(native.id, msg)

        def publish_input(count: int) -> None:
            self._publish_busy()
            if not native.silent:
                content = {"code": native.code, "execution_count": count}
                self._publish("execute_input", content, msg)

        try:
            async for out in self.session.execute(native, on_start=publish_input):
                if out.type == MessageType.EXECUTE_REPLY:
                    reply = out
                elif out.type == MessageType.INPUT:
                    asked.add(out.id)
                    self._forward_input(idents, msg, out)
                else:
                    self._publish_native(out, msg)
        finally:
            # An input() the cell left unanswered (interrupted, or the worker
            # died) is void: the next input_reply is for the next input()
            # (a cell on another subshell may still wait for its own).
            for key, native_id in list(self._input_requests.items()):
                if native_id in asked:
                    del self._input_requests[key]
        metadata = {
            "started": started,
            "dependencies_met": True,
            "engine": self.kernel_id,
            "status": reply.status,
        }
        content = translate.execute_reply_content(reply)
        self._publish_busy()
        self._reply("shell", idents, msg, "execute_reply", content, metadata=metadata)
        crashed = reply.status == "error" and reply.ename == WORKER_DIED
        if crashed or (reply.status == "error" and stop_on_error):
            if not self._subshells.abort_queued(msg):  # a subshell's own queue
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
                {"status": "aborted", "execution_count": self.session.execution_count},
                metadata={"status": "aborted", "engine": self.kernel_id},
            )
            self._publish_status("idle", msg)
        for item in keep:
            self._shell_queue.put_nowait(item)

    def _forward_input(self, idents: list[bytes], parent: JupyterMsg, request: Any) -> None:
        sent = self.channels.send(
            "stdin",
            "input_request",
            {"prompt": request.prompt, "password": request.password},
            parent=parent,
            ident=idents,
        )
        self._input_requests[sent["header"]["msg_id"]] = request.id

    async def _forward(
        self, idents: list[bytes], msg: JupyterMsg, native: Message, reply_type: str
    ) -> None:
        """Send a request to the worker; reply with its answer's fields."""
        if isinstance(native, ShellRequest):
            native.subshell_id = subshell_of(msg)
        try:
            reply: Any = None
            async for out in self.session.stream(native):
                if ends_request(out, native):
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
            self._reply("shell", idents, msg, reply_type, translate.reply_content(reply))

    async def _complete(self, idents: list[bytes], msg: JupyterMsg) -> None:
        native = translate.complete_request(msg["content"])
        await self._forward(idents, msg, native, "complete_reply")

    async def _inspect(self, idents: list[bytes], msg: JupyterMsg) -> None:
        native = translate.inspect_request(msg["content"])
        await self._forward(idents, msg, native, "inspect_reply")

    async def _history(self, idents: list[bytes], msg: JupyterMsg) -> None:
        native = translate.history_request(msg["content"])
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
                    content = translate.is_complete_content(reply.status, reply.indent)
        if content is None:
            # The worker is busy with a cell: answer here, so a console
            # never waits for the cell to finish (it gives up after 1 s).
            status, indent = await asyncio.get_running_loop().run_in_executor(
                None, _check_complete, code
            )
            content = translate.is_complete_content(status, indent)
        self._reply("shell", idents, msg, "is_complete_reply", content)

    async def _comm_info(self, idents: list[bytes], msg: JupyterMsg) -> None:
        target = msg["content"].get("target_name")
        try:
            native = CommInfoMessage(target_name=target, subshell_id=subshell_of(msg))
            reply: Any = await self.session.request(native)
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
        native = translate.comm_message(msg)
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
        # that track the execution state wait for that idle). Debug
        # requests one at a time, each busy ... idle, as ipykernel's.
        async with self._debugger.turn(msg):
            self._publish_status("busy", msg)
            try:
                await self._dispatch_control(idents, msg)
            finally:
                self._publish_status("idle", msg)

    async def _dispatch_control(self, idents: list[bytes], msg: JupyterMsg) -> None:
        msg_type = msg["header"].get("msg_type", "")
        if await self._subshells.control(idents, msg):
            return  # create/list/delete_subshell, a subshell's interrupt
        if msg_type == "kernel_info_request":
            await self._kernel_info(idents, msg, channel="control")
        elif msg_type == "interrupt_request":
            await self.interrupt()
            self._reply("control", idents, msg, "interrupt_reply", {"status": "ok"})
        elif msg_type == "shutdown_request":
            await self._shutdown("control", idents, msg)
        elif msg_type == "debug_request":
            content = await self._debugger.handle(msg)
            self._reply("control", idents, msg, "debug_reply", content)
        elif msg_type == "usage_request":
            self._reply("control", idents, msg, "usage_reply", self.session.usage())
        elif msg_type == fork_magic.FORK_REQUEST:  # the REST fork of a standalone kernel
            await fork_magic.run_fork_request(self, idents, msg)
        else:
            self._reply_unknown("control", idents, msg)

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
        self._tasks.spawn(self.session.input_response(native_id, str(value)))

    async def interrupt(self) -> None:
        """Interrupt the running cell (see :meth:`Session.interrupt`)."""
        if await self.session.interrupt():
            # The interrupt ends the pending input(): the next input_reply is
            # for the input() that the cell may ask for after catching it (a
            # subshell's cell may still wait for its own).
            for key, native_id in list(self._input_requests.items()):
                if native_id in self._main_asked:
                    del self._input_requests[key]

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
            await self.session.release_worker()

    async def restart_worker(self) -> None:
        """Swap in a new worker; ports and key stay (restart in place). A
        restart asked for by the user starts afresh: no state is restored and
        the restart budget is reset."""
        await self.session.restart()

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
        if self._closing and not self.channels.open(channel):
            return
        self.channels.send(
            channel, msg_type, content, parent=parent, ident=idents, metadata=metadata
        )

    def _reply_unknown(self, channel: str, idents: list[bytes], msg: JupyterMsg) -> None:
        msg_type = msg["header"].get("msg_type", "")
        log.warning("unsupported request %r", msg_type)
        if msg_type.endswith("_request"):
            content = translate.error_reply_content(
                "NotImplementedError", f"{msg_type} is not supported by this kernel"
            )
            reply_type = msg_type[: -len("_request")] + "_reply"
            self.channels.send(channel, reply_type, content, parent=msg, ident=idents)

    def _publish(
        self,
        msg_type: str,
        content: dict[str, Any],
        parent: JupyterMsg,
        metadata: dict[str, Any] | None = None,
        buffers: list[Any] | None = None,
    ) -> None:
        self.channels.publish(msg_type, content, parent, metadata=metadata, buffers=buffers)

    def _publish_status(self, state: str, parent: JupyterMsg) -> None:
        self._publish("status", {"execution_state": state}, parent)

    def _publish_busy(self) -> None:
        """The busy status of the execute request that holds it back, if any."""
        parent, self._busy_unpublished = self._busy_unpublished, None
        if parent is not None:
            self._publish_status("busy", parent)

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
        """Output of background threads and tasks, comm traffic after a cell
        ended, and what the session says of a worker's death while idle."""
        if msg.type == MessageType.DEBUG_EVENT:
            self._debugger.on_event(msg, self._last_parent)  # type: ignore[arg-type]
            return
        self._publish_native(msg, self._parents.get(msg.parent_id or "", self._last_parent))


_transformer_manager: Any = None


def _check_complete(code: str) -> tuple[str, int | None]:
    global _transformer_manager
    if _transformer_manager is None:
        from IPython.core.inputtransformer2 import TransformerManager

        _transformer_manager = TransformerManager()
    return _transformer_manager.check_complete(code)  # type: ignore[no-any-return]
