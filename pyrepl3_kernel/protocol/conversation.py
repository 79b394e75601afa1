"""The request/reply conversation between a client and a worker (sans-I/O).

In the spirit of h11's ``_state.py``: the rules of the conversation as data
(:data:`REQUESTS`, one table from which every other table here derives) and a
small state machine (:class:`Conversation`) that a client feeds with the
requests it sends and the messages it receives. Nothing here reads a socket,
starts a process or knows about asyncio; ``docs/protocol.md`` sections 6 and
12.2 describe the same rules for implementers in other languages.

What the module answers:

* which reply ends which request (:data:`REPLY_TYPES`, :func:`ends_request`);
* which request the worker's main thread is on (:attr:`Conversation.running`)
  and which request owns stream output now (:attr:`Conversation.output_owner`);
* what the client synthesizes for every open request when the worker dies
  (:meth:`Conversation.worker_died`);
* what a worker replies when its handler of a request fails
  (:func:`failure_reply`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .messages import (
    AckMessage,
    CheckpointReplyMessage,
    CommInfoReplyMessage,
    CompleteReplyMessage,
    DebugReplyMessage,
    ErrorMessage,
    ExecuteReplyMessage,
    ForkReplyMessage,
    HealthReplyMessage,
    HistoryReplyMessage,
    InspectReplyMessage,
    IsCompleteReplyMessage,
    Message,
    MessageType,
    PongMessage,
    ProtocolErrorCode,
    ProtocolErrorMessage,
    Reply,
    ShutdownReplyMessage,
    SubshellReplyMessage,
)


@dataclass(frozen=True)
class RequestRule:
    """How a worker answers one type of request."""

    #: The reply that ends the request (a ``protocol_error`` naming the
    #: request may take its place).
    reply: type[Reply]
    #: Handled one at a time, in arrival order, on the worker's main thread,
    #: where user code runs. Otherwise answered at once by the I/O thread,
    #: even while code runs, so its reply may overtake earlier requests'.
    ordered: bool
    #: An ordered request the worker may also handle while a cell awaits (in
    #: a top-level ``await``, the cell may be waiting for it, as for a
    #: widget's reply); its reply then comes before the running cell's.
    during_await: bool = False


#: Every request of protocol version 1 and how it is answered. The one table:
#: everything below derives from it.
REQUESTS: Mapping[MessageType, RequestRule] = MappingProxyType(
    {
        MessageType.EXECUTE: RequestRule(ExecuteReplyMessage, ordered=True),
        MessageType.COMPLETE: RequestRule(CompleteReplyMessage, ordered=True),
        MessageType.INSPECT: RequestRule(InspectReplyMessage, ordered=True),
        MessageType.HISTORY: RequestRule(HistoryReplyMessage, ordered=True),
        MessageType.IS_COMPLETE: RequestRule(IsCompleteReplyMessage, ordered=True),
        MessageType.COMM_INFO: RequestRule(CommInfoReplyMessage, ordered=True),
        MessageType.COMM_OPEN: RequestRule(AckMessage, ordered=True, during_await=True),
        MessageType.COMM_MSG: RequestRule(AckMessage, ordered=True, during_await=True),
        MessageType.COMM_CLOSE: RequestRule(AckMessage, ordered=True, during_await=True),
        MessageType.CONFIGURE: RequestRule(AckMessage, ordered=True),
        MessageType.CHECKPOINT: RequestRule(CheckpointReplyMessage, ordered=True),
        MessageType.FORK: RequestRule(ForkReplyMessage, ordered=True),
        MessageType.SHUTDOWN: RequestRule(ShutdownReplyMessage, ordered=True),
        MessageType.PING: RequestRule(PongMessage, ordered=False),
        MessageType.HEALTH: RequestRule(HealthReplyMessage, ordered=False),
        MessageType.DEBUG_REQUEST: RequestRule(DebugReplyMessage, ordered=False),
        MessageType.SUBSHELL: RequestRule(SubshellReplyMessage, ordered=False),
    }
)

#: The reply type that ends each request.
REPLY_TYPES: Mapping[MessageType, MessageType] = MappingProxyType(
    {request: rule.reply.type for request, rule in REQUESTS.items()}
)
#: The reply class that ends each request.
REPLY_CLASSES: Mapping[MessageType, type[Reply]] = MappingProxyType(
    {request: rule.reply for request, rule in REQUESTS.items()}
)
#: Requests a worker answers one after the other, in order, on its main
#: thread. Everything else a client sends (interrupt, input_response, ping,
#: health, hello) is handled at once.
ORDERED_REQUESTS: frozenset[MessageType] = frozenset(
    request for request, rule in REQUESTS.items() if rule.ordered
)
#: Ordered requests a worker may handle while a cell awaits (comms).
DURING_AWAIT_REQUESTS: frozenset[MessageType] = frozenset(
    request for request, rule in REQUESTS.items() if rule.during_await
)
#: Types of the messages that can end a request: every reply type, and
#: ``protocol_error``. Exactly the types of the :class:`Reply` classes.
TERMINAL_TYPES: frozenset[MessageType] = frozenset(REPLY_TYPES.values()) | {
    MessageType.PROTOCOL_ERROR
}

#: ``ename`` of the ERROR and EXECUTE_REPLY a client synthesizes for the cell
#: that was running when the worker died.
WORKER_DIED = "WorkerDied"
#: The ``ename`` of a request for a subshell that does not exist (as ipykernel).
UNKNOWN_SUBSHELL = "UnknownSubshellError"


def ends_request(msg: Message, request: Message) -> bool:
    """``msg`` is the last message of ``request``: its reply, or a
    ``protocol_error`` naming it. Everything else the worker sends for the
    request comes before."""
    if msg.parent_id != request.id:
        return False
    rule = REQUESTS.get(request.type)
    return rule is not None and (
        msg.type is rule.reply.type or msg.type is MessageType.PROTOCOL_ERROR
    )


def failure_reply(request: Message, ename: str, evalue: str, *, execution_count: int = 0) -> Reply:
    """What a worker answers when its handler of ``request`` fails with
    ``ename: evalue``: the request's own reply with status ``error`` if that
    reply carries ``ename``/``evalue`` (``execute_reply``, ``ack``,
    ``checkpoint_reply``), else ``protocol_error`` code ``failed``.
    ``execution_count`` goes into an ``execute_reply``."""
    rule = REQUESTS.get(request.type)
    if rule is None:
        raise ValueError(f"{request.type.value!r} is not a request: {_requests_named()}")
    names = {f.name for f in dataclasses.fields(rule.reply)}
    if {"status", "ename", "evalue"} <= names:
        fields: dict[str, Any] = {"status": "error", "ename": ename, "evalue": evalue}
        if "execution_count" in names:
            fields["execution_count"] = execution_count
        return rule.reply(parent_id=request.id, **fields)
    return ProtocolErrorMessage(
        code=ProtocolErrorCode.FAILED, detail=f"{ename}: {evalue}", parent_id=request.id
    )


def worker_died_text(cause: str) -> str:
    """The ``evalue`` of the cell that was running when the worker died."""
    return f"the worker process died ({cause}) while running this cell"


class Conversation:
    """The client's side of the conversation with one worker.

    Feed it every request sent (:meth:`send`) and every message received
    (:meth:`receive`); it says which request the worker is on, which request
    stream output belongs to, and, when the worker dies, the messages that
    end every request still open (:meth:`worker_died`).

    >>> conv = Conversation()
    >>> cell = ExecuteMessage(code="1")  # any request
    >>> conv.send(cell)
    >>> conv.running == cell.id
    True
    >>> conv.receive(ExecuteReplyMessage(parent_id=cell.id)) == cell.id
    True
    >>> conv.running is None
    True
    """

    def __init__(self) -> None:
        #: Every request without its reply yet, in the order sent.
        self._open: dict[str, MessageType] = {}
        #: The ordered ones among them, in the order sent: the first is the
        #: one the worker's main thread is on.
        self._main: collections.deque[str] = collections.deque()
        self._last_ordered: str | None = None
        #: Ordered requests for a subshell (``subshell_id`` set), per
        #: subshell, in the order sent: each subshell's first is running on
        #: its own thread, concurrently with the main thread.
        self._lanes: dict[str, collections.deque[str]] = {}
        self._lane_of: dict[str, str] = {}

    # -- feeding ----------------------------------------------------------------

    def send(self, request: Message) -> None:
        """Record that ``request`` was sent; it is open until it ends.

        Raises :class:`ValueError` for a message that is not a request (it
        would get no reply) and for an id that is already open.
        """
        rule = REQUESTS.get(request.type)
        if rule is None:
            raise ValueError(
                f"{request.type.value!r} is not a request, it gets no reply: {_requests_named()}"
            )
        if request.id in self._open:
            raise ValueError(f"a request with id {request.id!r} is already open")
        self._open[request.id] = request.type
        subshell = getattr(request, "subshell_id", None)
        if rule.ordered and subshell:
            self._lanes.setdefault(subshell, collections.deque()).append(request.id)
            self._lane_of[request.id] = subshell
        elif rule.ordered:
            self._main.append(request.id)
            self._last_ordered = request.id

    def receive(self, msg: Message) -> str | None:
        """Take in a message from the worker. Returns the id of the request it
        ends (which is then closed), or None if it ends none.

        A request ends with its own reply type or a ``protocol_error`` whose
        ``parent_id`` names it, whatever its place: a comm's ``ack`` may come
        before the running cell's reply (the worker handled it while the cell
        awaited), a ``pong`` before anything sent earlier. The running
        request stays the running request until its own reply.
        """
        request_id = msg.parent_id
        if request_id is None or msg.type not in TERMINAL_TYPES:
            return None
        request_type = self._open.get(request_id)
        if request_type is None:
            return None
        if msg.type is not MessageType.PROTOCOL_ERROR and msg.type is not REPLY_TYPES[request_type]:
            return None
        del self._open[request_id]
        subshell = self._lane_of.pop(request_id, None)
        if subshell is not None:
            lane = self._lanes[subshell]
            lane.remove(request_id)
            if not lane:
                del self._lanes[subshell]
        elif REQUESTS[request_type].ordered:
            if self._main[0] == request_id:
                self._main.popleft()
            else:
                self._main.remove(request_id)
        return request_id

    def worker_died(self, cause: str) -> list[Message]:
        """The messages that end every open request now that the worker is
        gone (``cause``: ``exit code 3``, ``killed by signal SIGKILL (Killed)``),
        in the order the requests were sent. Afterwards no request is open.

        * The running ``execute`` (the main thread's, and each subshell's):
          an ERROR then an EXECUTE_REPLY with status ``error``, both
          ``WorkerDied`` and :func:`worker_died_text`.
        * A queued ``execute``: an EXECUTE_REPLY with status ``aborted``.
        * A ``shutdown``: a SHUTDOWN_REPLY (status ``ok``: the worker is gone).
        * Any other request: a PROTOCOL_ERROR code ``worker_died``.
        """
        running = {self.running, *(lane[0] for lane in self._lanes.values())}
        out: list[Message] = []
        for request_id, request_type in self._open.items():
            if request_type is MessageType.EXECUTE:
                if request_id in running:
                    evalue = worker_died_text(cause)
                    traceback = [f"\x1b[0;31m{WORKER_DIED}\x1b[0m: {evalue}"]
                    out.append(
                        ErrorMessage(
                            ename=WORKER_DIED,
                            evalue=evalue,
                            traceback=traceback,
                            parent_id=request_id,
                        )
                    )
                    out.append(
                        ExecuteReplyMessage(
                            status="error",
                            ename=WORKER_DIED,
                            evalue=evalue,
                            traceback=list(traceback),
                            parent_id=request_id,
                        )
                    )
                else:
                    out.append(ExecuteReplyMessage(status="aborted", parent_id=request_id))
            elif request_type is MessageType.SHUTDOWN:
                out.append(ShutdownReplyMessage(parent_id=request_id))
            else:
                out.append(
                    ProtocolErrorMessage(
                        code=ProtocolErrorCode.WORKER_DIED,
                        detail=f"the worker process died ({cause})",
                        parent_id=request_id,
                    )
                )
        self.clear()
        return out

    def clear(self) -> None:
        """Forget every open request without ending it (a new worker). The
        last ordered request sent stays :attr:`output_owner`."""
        self._open.clear()
        self._main.clear()
        self._lanes.clear()
        self._lane_of.clear()

    # -- what it knows ------------------------------------------------------------

    @property
    def running(self) -> str | None:
        """Id of the request on the worker's main thread: the oldest ordered
        request without its reply. None when the worker is idle."""
        return self._main[0] if self._main else None

    def running_in(self, subshell_id: str) -> str | None:
        """Id of the request the subshell ``subshell_id`` is running, if any."""
        lane = self._lanes.get(subshell_id)
        return lane[0] if lane else None

    @property
    def queued(self) -> list[str]:
        """Ids of the ordered requests waiting behind the running one."""
        return list(self._main)[1:]

    @property
    def output_owner(self) -> str | None:
        """Id of the request stream output belongs to now: the running
        request, or when the worker is idle the last ordered request sent
        (output of a thread a cell left running), or None."""
        return self._main[0] if self._main else self._last_ordered

    @property
    def open_requests(self) -> Mapping[str, MessageType]:
        """Every open request (id to type), in the order sent (read-only)."""
        return MappingProxyType(self._open)

    def request_type(self, request_id: str) -> MessageType | None:
        """The type of the open request ``request_id``, or None."""
        return self._open.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._open

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    def __repr__(self) -> str:
        return f"<Conversation open={len(self._open)} running={self.running}>"


def _requests_named() -> str:
    return "requests are " + ", ".join(sorted(t.value for t in REQUESTS))
