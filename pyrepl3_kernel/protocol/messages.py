"""The native protocol's messages, as plain data classes.

Every message has an ``id``, a ``timestamp`` and, when it answers or belongs to
another message, a ``parent_id``. Its ``type`` is a :class:`MessageType`, a
``str`` enum, so ``msg.type == "output"`` and ``msg.type == MessageType.OUTPUT``
both hold. ``docs/protocol.md`` is the normative description; this module is
its Python rendering and holds no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import time
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar


class MessageType(str, enum.Enum):
    """Every message type of protocol version 1."""

    # handshake and lifecycle
    READY = "ready"
    HELLO = "hello"
    PING = "ping"
    PONG = "pong"
    SHUTDOWN = "shutdown"
    SHUTDOWN_REPLY = "shutdown_reply"
    STATUS = "status"
    PROTOCOL_ERROR = "protocol_error"
    # execution
    EXECUTE = "execute"
    OUTPUT = "output"
    DISPLAY = "display"
    CLEAR_OUTPUT = "clear_output"
    RESULT = "result"
    ERROR = "error"
    EXECUTE_REPLY = "execute_reply"
    INPUT = "input"
    INPUT_RESPONSE = "input_response"
    INTERRUPT = "interrupt"
    # introspection
    COMPLETE = "complete"
    COMPLETE_REPLY = "complete_reply"
    INSPECT = "inspect"
    INSPECT_REPLY = "inspect_reply"
    HISTORY = "history"
    HISTORY_REPLY = "history_reply"
    IS_COMPLETE = "is_complete"
    IS_COMPLETE_REPLY = "is_complete_reply"
    # comms
    COMM_OPEN = "comm_open"
    COMM_MSG = "comm_msg"
    COMM_CLOSE = "comm_close"
    COMM_INFO = "comm_info"
    COMM_INFO_REPLY = "comm_info_reply"
    ACK = "ack"
    # launch context of a pooled worker
    CONFIGURE = "configure"
    # health
    HEALTH = "health"
    HEALTH_REPLY = "health_reply"
    # session state
    CHECKPOINT = "checkpoint"
    CHECKPOINT_REPLY = "checkpoint_reply"
    # the debugger: Debug Adapter Protocol messages (docs/debugger.md)
    DEBUG_REQUEST = "debug_request"
    DEBUG_REPLY = "debug_reply"
    DEBUG_EVENT = "debug_event"
    # a copy-on-write fork of the worker (docs/fork.md)
    FORK = "fork"
    FORK_REPLY = "fork_reply"
    # subshells (JEP 91)
    SUBSHELL = "subshell"
    SUBSHELL_REPLY = "subshell_reply"

    def __str__(self) -> str:
        return self.value


def new_id() -> str:
    """A fresh message id (32 hex digits)."""
    return uuid.uuid4().hex


@dataclass(kw_only=True)
class Message:
    """Fields common to every message."""

    type: ClassVar[MessageType]
    id: str = field(default_factory=new_id)
    timestamp: float = field(default_factory=time.time)
    parent_id: str | None = None


class ProtocolErrorCode(str, enum.Enum):
    """The ``code`` of a ``protocol_error`` (and of :class:`ProtocolError`).

    A ``str`` enum: on the wire a code is its plain string, and
    ``ProtocolErrorCode.MALFORMED == "malformed"``. ``docs/protocol.md``
    (section 13.1) says when each is used.
    """

    #: The payload is not a message (empty, undecodable, not a map, no ``v``
    #: or ``type``).
    MALFORMED = "malformed"
    #: ``type`` is not a message type of this version.
    UNKNOWN_TYPE = "unknown_type"
    #: ``v`` is a version the receiver does not speak, or the handshake found
    #: no common version.
    UNSUPPORTED_VERSION = "unsupported_version"
    #: The frame or payload is larger than the receiver's maximum.
    TOO_LARGE = "too_large"
    #: A known field has the wrong type.
    BAD_FIELD = "bad_field"
    #: A well-formed message that is not valid in this direction or state.
    UNEXPECTED = "unexpected"
    #: A reserved type the receiver does not implement (none in version 1).
    UNSUPPORTED = "unsupported"
    #: The worker's handler of a request failed and the request's reply type
    #: cannot carry an error (``ename``/``evalue``); ends the request.
    FAILED = "failed"
    #: Never on the wire: the client ends a request the dead worker still owed
    #: with it (section 12.2).
    WORKER_DIED = "worker_died"

    def __str__(self) -> str:
        return self.value


#: Reply statuses that say a request did not succeed.
FAILED_STATUSES = frozenset({"error", "aborted"})


@dataclass(kw_only=True)
class Reply(Message):
    """A message that ends a request: every reply type, and ``protocol_error``
    (which takes the place of the reply of the request it names).

    Each gives ``status``, ``ok``, ``ename`` and ``evalue``, whether or not its
    wire form has those fields: a reply type without ``ename``/``evalue``
    reads ``""``, ``pong`` and ``health_reply`` (answered at once, they cannot
    fail) read status ``ok``, and a ``protocol_error`` reads status ``error``
    with its ``code`` as ``ename`` and its ``detail`` as ``evalue``. This base
    adds no field: the wire form of every reply is its own class's fields.
    """

    @property
    def status(self) -> str:
        """``ok``, ``error`` or ``aborted`` (is_complete_reply: its answer)."""
        return "ok"

    @property
    def ok(self) -> bool:
        """The request was carried out (its status is not error/aborted)."""
        return self.status not in FAILED_STATUSES

    @property
    def ename(self) -> str:
        """What went wrong (an exception's name), or ``""``."""
        return ""

    @property
    def evalue(self) -> str:
        """What went wrong, in words, or ``""``."""
        return ""


@dataclass(kw_only=True)
class ShellRequest(Message):
    """A request the main shell or a subshell handles: ``subshell_id`` names
    the subshell (nil: the main shell, on the worker's main thread)."""

    subshell_id: str | None = None


# -- handshake and lifecycle -------------------------------------------------


@dataclass(kw_only=True)
class ReadyMessage(Message):
    """Worker -> client, first message: the worker is up and what it speaks."""

    type: ClassVar[MessageType] = MessageType.READY
    protocol_versions: list[int] = field(default_factory=list)
    pid: int = 0
    implementation: str = ""
    implementation_version: str = ""
    language_info: dict[str, Any] = field(default_factory=dict)
    banner: str = ""
    capabilities: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class HelloMessage(Message):
    """Client -> worker, answer to READY: the protocol version both will use."""

    type: ClassVar[MessageType] = MessageType.HELLO
    version: int = 1


@dataclass(kw_only=True)
class PingMessage(Message):
    type: ClassVar[MessageType] = MessageType.PING


@dataclass(kw_only=True)
class PongMessage(Reply):
    type: ClassVar[MessageType] = MessageType.PONG


@dataclass(kw_only=True)
class ShutdownMessage(Message):
    type: ClassVar[MessageType] = MessageType.SHUTDOWN
    restart: bool = False


@dataclass(kw_only=True)
class ShutdownReplyMessage(Reply):
    type: ClassVar[MessageType] = MessageType.SHUTDOWN_REPLY
    status: str = "ok"
    restart: bool = False


@dataclass(kw_only=True)
class StatusMessage(Message):
    """State of the worker as seen by its supervisor (``dead``, ``restarted``)."""

    type: ClassVar[MessageType] = MessageType.STATUS
    state: str = ""
    detail: str = ""


@dataclass(kw_only=True)
class ProtocolErrorMessage(Reply):
    """A message could not be accepted, or a request could not be answered.
    ``code`` is a :class:`ProtocolErrorCode` value (a plain ``str`` on the
    wire; a receiver keeps codes it does not know as they are). With the
    ``parent_id`` of an open request it ends that request."""

    type: ClassVar[MessageType] = MessageType.PROTOCOL_ERROR
    code: str = ""
    detail: str = ""

    @property
    def status(self) -> str:
        return "error"

    @property
    def ename(self) -> str:
        return self.code

    @property
    def evalue(self) -> str:
        return self.detail


# -- execution ---------------------------------------------------------------


@dataclass(kw_only=True)
class ExecuteMessage(ShellRequest):
    """Client -> worker: run ``code``."""

    type: ClassVar[MessageType] = MessageType.EXECUTE
    code: str = ""
    silent: bool = False
    store_history: bool = True
    user_expressions: dict[str, Any] = field(default_factory=dict)
    allow_stdin: bool = True
    cell_id: str | None = None


@dataclass(kw_only=True)
class OutputMessage(Message):
    """Text written to ``stdout`` or ``stderr`` (``stream``) while a request ran."""

    type: ClassVar[MessageType] = MessageType.OUTPUT
    stream: str = "stdout"
    data: str = ""


@dataclass(kw_only=True)
class DisplayMessage(Message):
    """A rich display (``update`` = update the display named by
    ``transient["display_id"]``)."""

    type: ClassVar[MessageType] = MessageType.DISPLAY
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    transient: dict[str, Any] = field(default_factory=dict)
    update: bool = False

    @property
    def display_id(self) -> str | None:
        value = self.transient.get("display_id")
        return value if isinstance(value, str) else None


@dataclass(kw_only=True)
class ClearOutputMessage(Message):
    type: ClassVar[MessageType] = MessageType.CLEAR_OUTPUT
    wait: bool = False


@dataclass(kw_only=True)
class ResultMessage(Message):
    """The value of the cell's last expression (Jupyter's execute_result)."""

    type: ClassVar[MessageType] = MessageType.RESULT
    execution_count: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ErrorMessage(Message):
    type: ClassVar[MessageType] = MessageType.ERROR
    ename: str = ""
    evalue: str = ""
    traceback: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ExecuteReplyMessage(Reply):
    """Last message of an execution. ``status`` is ``ok``, ``error`` or
    ``aborted``."""

    type: ClassVar[MessageType] = MessageType.EXECUTE_REPLY
    status: str = "ok"
    execution_count: int = 0
    ename: str = ""
    evalue: str = ""
    traceback: list[str] = field(default_factory=list)
    payload: list[dict[str, Any]] = field(default_factory=list)
    user_expressions: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class InputMessage(Message):
    """Worker -> client: the running code waits for a line of input. Answer
    with an INPUT_RESPONSE whose ``parent_id`` is this message's ``id``."""

    type: ClassVar[MessageType] = MessageType.INPUT
    prompt: str = ""
    password: bool = False


@dataclass(kw_only=True)
class InputResponseMessage(Message):
    type: ClassVar[MessageType] = MessageType.INPUT_RESPONSE
    value: str = ""


@dataclass(kw_only=True)
class InterruptMessage(Message):
    """Raise KeyboardInterrupt in the running code. With ``target``, only if
    the execution with that id is the one running."""

    type: ClassVar[MessageType] = MessageType.INTERRUPT
    target: str | None = None


# -- introspection -----------------------------------------------------------


@dataclass(kw_only=True)
class CompleteMessage(ShellRequest):
    type: ClassVar[MessageType] = MessageType.COMPLETE
    code: str = ""
    cursor_pos: int | None = None


@dataclass(kw_only=True)
class CompleteReplyMessage(Reply):
    type: ClassVar[MessageType] = MessageType.COMPLETE_REPLY
    status: str = "ok"
    matches: list[str] = field(default_factory=list)
    cursor_start: int = 0
    cursor_end: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class InspectMessage(ShellRequest):
    type: ClassVar[MessageType] = MessageType.INSPECT
    code: str = ""
    cursor_pos: int | None = None
    detail_level: int = 0


@dataclass(kw_only=True)
class InspectReplyMessage(Reply):
    type: ClassVar[MessageType] = MessageType.INSPECT_REPLY
    status: str = "ok"
    found: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class HistoryMessage(ShellRequest):
    """``hist_access_type`` is ``tail``, ``range`` or ``search``, with the
    fields of Jupyter's history_request."""

    type: ClassVar[MessageType] = MessageType.HISTORY
    hist_access_type: str = "tail"
    output: bool = False
    raw: bool = True
    session: int = 0
    start: int = 0
    stop: int | None = None
    n: int | None = None
    pattern: str = "*"
    unique: bool = False


@dataclass(kw_only=True)
class HistoryReplyMessage(Reply):
    """``history``: ``[session, line, input]`` or, with output,
    ``[session, line, [input, output]]`` entries."""

    type: ClassVar[MessageType] = MessageType.HISTORY_REPLY
    status: str = "ok"
    history: list[Any] = field(default_factory=list)


@dataclass(kw_only=True)
class IsCompleteMessage(ShellRequest):
    type: ClassVar[MessageType] = MessageType.IS_COMPLETE
    code: str = ""


@dataclass(kw_only=True)
class IsCompleteReplyMessage(Reply):
    """``status`` is ``complete``, ``incomplete``, ``invalid`` or ``unknown``."""

    type: ClassVar[MessageType] = MessageType.IS_COMPLETE_REPLY
    status: str = "unknown"
    indent: str = ""


# -- comms -------------------------------------------------------------------


@dataclass(kw_only=True)
class CommOpenMessage(ShellRequest):
    type: ClassVar[MessageType] = MessageType.COMM_OPEN
    comm_id: str = ""
    target_name: str = ""
    target_module: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    buffers: list[bytes] = field(default_factory=list)


@dataclass(kw_only=True)
class CommMsgMessage(ShellRequest):
    type: ClassVar[MessageType] = MessageType.COMM_MSG
    comm_id: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    buffers: list[bytes] = field(default_factory=list)


@dataclass(kw_only=True)
class CommCloseMessage(ShellRequest):
    type: ClassVar[MessageType] = MessageType.COMM_CLOSE
    comm_id: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    buffers: list[bytes] = field(default_factory=list)


@dataclass(kw_only=True)
class CommInfoMessage(ShellRequest):
    type: ClassVar[MessageType] = MessageType.COMM_INFO
    target_name: str | None = None


@dataclass(kw_only=True)
class CommInfoReplyMessage(Reply):
    type: ClassVar[MessageType] = MessageType.COMM_INFO_REPLY
    status: str = "ok"
    comms: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class AckMessage(Reply):
    """Last message for a client request that has no reply of its own
    (comm_open, comm_msg and comm_close from the client)."""

    type: ClassVar[MessageType] = MessageType.ACK
    status: str = "ok"
    ename: str = ""
    evalue: str = ""


# -- launch context ----------------------------------------------------------


@dataclass(kw_only=True)
class ConfigureMessage(Message):
    """Client -> worker: take on the working directory and environment of a
    kernel launch (a warm worker was started before anyone knew them).
    ``env``, when given, replaces the whole environment. Answered by ACK."""

    type: ClassVar[MessageType] = MessageType.CONFIGURE
    cwd: str | None = None
    env: dict[str, str] | None = None
    #: Store (directory or URL) for an automatic checkpoint named ``auto``
    #: after every successful cell; ``""`` turns it off, nil leaves it as is.
    autosave: str | None = None
    #: The number the next cell takes (a worker that replaces a crashed one
    #: continues its predecessor's count); nil leaves it as is.
    execution_count: int | None = None


# -- session state -----------------------------------------------------------


@dataclass(kw_only=True)
class CheckpointMessage(Message):
    """Client -> worker: ``action`` is ``save``, ``restore``, ``list``,
    ``delete`` or ``info``; ``name`` names the checkpoint (not for ``list``);
    ``store`` is a directory or fsspec URL (default: the worker's store);
    ``clear`` (restore): remove variables the checkpoint does not have;
    ``force`` (save): replace a checkpoint of that name even if another
    notebook or kernel saved it. The kernel's state history: ``states``,
    ``checkout`` (``name``: the cell number) and ``undo`` (docs/checkpoints.md)."""

    type: ClassVar[MessageType] = MessageType.CHECKPOINT
    action: str = "save"
    name: str = ""
    store: str | None = None
    clear: bool = True
    force: bool = False


@dataclass(kw_only=True)
class CheckpointReplyMessage(Reply):
    """``result`` for save/restore: the per-name report (``saved``,
    ``skipped``, ``failed``, ``removed``, ``bytes_written``, ``seconds``);
    for list: ``{"checkpoints": [...]}``; for info: the checkpoint's summary."""

    type: ClassVar[MessageType] = MessageType.CHECKPOINT_REPLY
    status: str = "ok"
    action: str = ""
    name: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    ename: str = ""
    evalue: str = ""


# -- subshells ---------------------------------------------------------------


@dataclass(kw_only=True)
class SubshellMessage(Message):
    """Client -> worker: ``action`` ``create`` (a subshell named
    ``subshell_id``, or a new id when nil), ``delete`` (the subshell
    ``subshell_id``: its running request is interrupted, its queued ones
    aborted) or ``list``. Answered at once by SUBSHELL_REPLY."""

    type: ClassVar[MessageType] = MessageType.SUBSHELL
    action: str = "list"
    subshell_id: str | None = None


@dataclass(kw_only=True)
class SubshellReplyMessage(Reply):
    """``subshell_id``: the subshell created or deleted; ``subshell_ids``:
    every subshell after the action. An unknown id: status ``error``, ename
    ``UnknownSubshellError``."""

    type: ClassVar[MessageType] = MessageType.SUBSHELL_REPLY
    status: str = "ok"
    action: str = ""
    subshell_id: str | None = None
    subshell_ids: list[str] = field(default_factory=list)
    ename: str = ""
    evalue: str = ""


@dataclass(kw_only=True)
class ForkMessage(Message):
    """Client -> worker, at an idle point: fork; the new worker connects to
    the Unix socket ``path``, sends ``token`` and takes the stdout/stderr
    pipes passed back to it (docs/fork.md). Answered by FORK_REPLY."""

    type: ClassVar[MessageType] = MessageType.FORK
    path: str = ""
    token: str = ""


@dataclass(kw_only=True)
class ForkReplyMessage(Reply):
    """``pid`` of the new worker; ``report``: what did not carry over the
    fork (``lost``), and what both workers now share (``shared``), by name."""

    type: ClassVar[MessageType] = MessageType.FORK_REPLY
    status: str = "ok"
    pid: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    ename: str = ""
    evalue: str = ""


# -- debugger ----------------------------------------------------------------


@dataclass(kw_only=True)
class DebugRequestMessage(Message):
    """Client -> worker: a Debug Adapter Protocol request (``content``: the
    DAP request as the frontend sent it in Jupyter's debug_request).
    Answered by DEBUG_REPLY, at once, also while a cell runs or is stopped
    at a breakpoint."""

    type: ClassVar[MessageType] = MessageType.DEBUG_REQUEST
    content: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DebugReplyMessage(Reply):
    """Worker -> client: the DAP response (``content``) to a DEBUG_REQUEST."""

    type: ClassVar[MessageType] = MessageType.DEBUG_REPLY
    content: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DebugEventMessage(Message):
    """Worker -> client, unsolicited: a DAP event (``content``: ``stopped``,
    ``continued``, ``output``, ...), Jupyter's debug_event."""

    type: ClassVar[MessageType] = MessageType.DEBUG_EVENT
    content: dict[str, Any] = field(default_factory=dict)


# -- health ------------------------------------------------------------------


@dataclass(kw_only=True)
class HealthMessage(Message):
    type: ClassVar[MessageType] = MessageType.HEALTH


@dataclass(kw_only=True)
class HealthReplyMessage(Reply):
    """Resource usage of the worker process, measured by the worker."""

    type: ClassVar[MessageType] = MessageType.HEALTH_REPLY
    pid: int = 0
    rss_bytes: int = 0
    max_rss_bytes: int = 0
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0
    uptime_s: float = 0.0
    threads: int = 0
    executing: str | None = None
    execution_count: int = 0


MESSAGE_CLASSES: dict[MessageType, type[Message]] = {}
for _cls in list(globals().values()):
    bases = (Message, Reply, ShellRequest)
    if isinstance(_cls, type) and issubclass(_cls, Message) and _cls not in bases:
        MESSAGE_CLASSES[_cls.type] = _cls


def _field_types(cls: type[Message]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


FIELD_TYPES: dict[type[Message], dict[str, Any]] = {
    cls: _field_types(cls) for cls in MESSAGE_CLASSES.values()
}
