"""Tests of the request/reply conversation (``pyrepl3_kernel.protocol.conversation``).

No processes, no sockets: requests and messages in, what the client knows out.
See docs/protocol.md sections 6 and 12.2.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrepl3_kernel.protocol import (
    DURING_AWAIT_REQUESTS,
    MESSAGE_CLASSES,
    ORDERED_REQUESTS,
    REPLY_CLASSES,
    REPLY_TYPES,
    REQUESTS,
    TERMINAL_TYPES,
    WORKER_DIED,
    AckMessage,
    CheckpointMessage,
    CheckpointReplyMessage,
    CommMsgMessage,
    CommOpenMessage,
    CompleteMessage,
    ConfigureMessage,
    Conversation,
    ErrorMessage,
    ExecuteMessage,
    ExecuteReplyMessage,
    HealthMessage,
    InputResponseMessage,
    InterruptMessage,
    IsCompleteMessage,
    Message,
    MessageType,
    OutputMessage,
    PingMessage,
    PongMessage,
    ProtocolErrorCode,
    ProtocolErrorMessage,
    Reply,
    ShutdownMessage,
    ShutdownReplyMessage,
    decode,
    encode,
    ends_request,
    failure_reply,
    worker_died_text,
)

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CAUSE = "killed by signal SIGKILL (Killed)"
DIED = f"the worker process died ({CAUSE}) while running this cell"
RED_DIED = f"\x1b[0;31mWorkerDied\x1b[0m: {DIED}"


def request_of(kind: MessageType) -> Message:
    return MESSAGE_CLASSES[kind]()


def reply_to(request: Message, **fields: Any) -> Message:
    return REPLY_CLASSES[request.type](parent_id=request.id, **fields)


def sent(*requests: Message) -> Conversation:
    conv = Conversation()
    for request in requests:
        conv.send(request)
    return conv


def doc_table(heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading`` in docs/protocol.md."""
    text = DOCS.read_text()
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # without the header and its rule


# -- the table -------------------------------------------------------------------


def test_every_table_derives_from_the_one_table() -> None:
    assert dict(REPLY_TYPES) == {req: rule.reply.type for req, rule in REQUESTS.items()}
    assert dict(REPLY_CLASSES) == {req: rule.reply for req, rule in REQUESTS.items()}
    assert ORDERED_REQUESTS == set(REQUESTS) - {
        MessageType.PING,
        MessageType.HEALTH,
        MessageType.SUBSHELL,
        MessageType.DEBUG_REQUEST,
    }
    assert DURING_AWAIT_REQUESTS == {
        MessageType.COMM_OPEN,
        MessageType.COMM_MSG,
        MessageType.COMM_CLOSE,
    }
    assert DURING_AWAIT_REQUESTS <= ORDERED_REQUESTS
    for req, reply_cls in REPLY_CLASSES.items():
        assert req in MESSAGE_CLASSES
        assert MESSAGE_CLASSES[reply_cls.type] is reply_cls


def test_terminal_types_are_exactly_the_reply_classes() -> None:
    replies = {t for t, cls in MESSAGE_CLASSES.items() if issubclass(cls, Reply)}
    assert TERMINAL_TYPES == replies
    assert MessageType.PROTOCOL_ERROR in TERMINAL_TYPES
    assert MessageType.ERROR not in TERMINAL_TYPES  # an error is not the end of a cell


def test_docs_list_every_request_as_the_table_does() -> None:
    rows = doc_table("### 6.1 Requests and replies")
    documented = {}
    for request, reply, handled in rows:
        documented[MessageType(request.strip("`"))] = (
            MessageType(reply.strip("`")),
            handled.startswith("main thread"),
            "during a cell's await" in handled,
        )
    assert documented == {
        req: (rule.reply.type, rule.ordered, rule.during_await) for req, rule in REQUESTS.items()
    }


# -- what ends a request -----------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_a_request_ends_with_its_reply_or_a_protocol_error(kind: MessageType) -> None:
    request = request_of(kind)
    assert ends_request(reply_to(request), request)
    assert ends_request(ProtocolErrorMessage(code="bad_field", parent_id=request.id), request)
    assert not ends_request(reply_to(request), request_of(kind))  # another request's
    assert not ends_request(OutputMessage(parent_id=request.id), request)
    assert not ends_request(ErrorMessage(parent_id=request.id), request)
    others = {t for t in TERMINAL_TYPES if t not in (REPLY_TYPES[kind], "protocol_error")}
    for other in others:
        assert not ends_request(MESSAGE_CLASSES[other](parent_id=request.id), request)


def test_a_message_that_is_no_request_is_never_ended() -> None:
    interrupt = InterruptMessage()
    assert not ends_request(ProtocolErrorMessage(parent_id=interrupt.id), interrupt)


def test_a_message_that_is_no_request_cannot_be_sent() -> None:
    conv = Conversation()
    for msg in (InterruptMessage(), InputResponseMessage(), ExecuteReplyMessage()):
        with pytest.raises(ValueError, match="is not a request.*requests are .*execute"):
            conv.send(msg)
    assert len(conv) == 0


def test_an_open_id_cannot_be_sent_twice() -> None:
    cell = ExecuteMessage()
    conv = sent(cell)
    with pytest.raises(ValueError, match=f"{cell.id!r} is already open"):
        conv.send(ExecuteMessage(id=cell.id))
    conv.receive(reply_to(cell))
    conv.send(ExecuteMessage(id=cell.id))  # once ended, the id may come again
    assert conv.running == cell.id


# -- running, queued, output owner -----------------------------------------------------


def test_ordered_requests_run_one_after_the_other() -> None:
    a, b, c = ExecuteMessage(), CompleteMessage(), ExecuteMessage()
    conv = sent(a, b, c)
    assert (conv.running, conv.queued, conv.output_owner) == (a.id, [b.id, c.id], a.id)
    assert conv.receive(OutputMessage(parent_id=a.id)) is None
    assert conv.receive(ErrorMessage(parent_id=a.id)) is None
    assert conv.running == a.id
    assert conv.receive(reply_to(a, status="error")) == a.id
    assert (conv.running, conv.queued) == (b.id, [c.id])
    assert conv.receive(reply_to(b)) == b.id
    assert conv.receive(reply_to(c)) == c.id
    assert (conv.running, conv.queued, len(conv)) == (None, [], 0)


def test_idle_output_belongs_to_the_last_ordered_request() -> None:
    conv = Conversation()
    assert conv.output_owner is None
    cell, ping = ExecuteMessage(), PingMessage()
    conv.send(cell)
    conv.send(ping)  # answered at once: never the owner of output
    assert conv.output_owner == cell.id
    conv.receive(reply_to(cell))
    assert (conv.running, conv.output_owner) == (None, cell.id)
    conv.clear()  # a new worker: the output of an old cell's thread still goes to it
    assert (len(conv), conv.output_owner) == (0, cell.id)


def test_ping_and_health_are_answered_at_once() -> None:
    cell, ping, health = ExecuteMessage(), PingMessage(), HealthMessage()
    conv = sent(cell, ping, health)
    assert (conv.running, conv.queued) == (cell.id, [])
    assert conv.receive(reply_to(health)) == health.id
    assert conv.receive(PongMessage(parent_id=ping.id)) == ping.id
    assert (conv.running, list(conv)) == (cell.id, [cell.id])


def test_comm_acks_may_overtake_the_running_cell() -> None:
    """The worker handles comm messages while a cell awaits (a widget's
    reply the cell waits for): their ACKs come before the cell's reply, in
    any order, and the cell stays the running request."""
    cell = ExecuteMessage(code="await reply")
    first, second = CommMsgMessage(comm_id="w"), CommOpenMessage(comm_id="v")
    after = ExecuteMessage()
    conv = sent(cell, first, second, after)
    assert conv.receive(AckMessage(parent_id=second.id)) == second.id
    assert (conv.running, conv.queued) == (cell.id, [first.id, after.id])
    assert conv.receive(AckMessage(parent_id=first.id, status="error", ename="E")) == first.id
    assert (conv.running, conv.queued, conv.output_owner) == (cell.id, [after.id], cell.id)
    assert conv.receive(reply_to(cell)) == cell.id
    assert conv.running == after.id


def test_a_protocol_error_naming_a_request_ends_it() -> None:
    bad, good = ExecuteMessage(), ExecuteMessage()
    conv = sent(bad, good)
    err = ProtocolErrorMessage(code=ProtocolErrorCode.BAD_FIELD, parent_id=bad.id)
    assert conv.receive(err) == bad.id
    assert conv.running == good.id
    # One with no parent (a frame too large to read) ends nothing.
    assert conv.receive(ProtocolErrorMessage(code="too_large")) is None
    assert conv.running == good.id


def test_stray_replies_end_nothing() -> None:
    cell = ExecuteMessage()
    conv = sent(cell)
    assert conv.receive(AckMessage(parent_id=cell.id)) is None  # not an execute's reply
    assert conv.receive(ExecuteReplyMessage(parent_id="unknown")) is None
    assert conv.receive(ExecuteReplyMessage()) is None
    assert conv.running == cell.id
    assert conv.receive(reply_to(cell)) == cell.id
    assert conv.receive(reply_to(cell)) is None  # a duplicate
    assert len(conv) == 0


# -- worker death ------------------------------------------------------------------


def test_death_ends_the_running_cell_with_an_error() -> None:
    cell = ExecuteMessage()
    conv = sent(cell)
    error, reply = conv.worker_died(CAUSE)
    assert isinstance(error, ErrorMessage) and isinstance(reply, ExecuteReplyMessage)
    assert (error.parent_id, error.ename, error.evalue) == (cell.id, "WorkerDied", DIED)
    assert error.traceback == [RED_DIED]
    assert (reply.parent_id, reply.status, reply.ename, reply.evalue) == (
        cell.id,
        "error",
        WORKER_DIED,
        DIED,
    )
    assert reply.traceback == [RED_DIED]
    assert reply.execution_count == 0
    assert worker_died_text(CAUSE) == DIED
    assert (len(conv), conv.running) == (0, None)
    assert conv.output_owner == cell.id  # output drained after the death still goes to it


def test_docs_give_the_texts_a_death_produces() -> None:
    section = DOCS.read_text()
    section = section[section.index("### 12.2 Worker death") : section.index("### 12.3 Status")]
    out = sent(ExecuteMessage(), CompleteMessage()).worker_died("<cause>")
    error, _, failed = out
    assert isinstance(error, ErrorMessage) and isinstance(failed, ProtocolErrorMessage)
    assert f'`evalue` `"{error.evalue}"`' in section
    assert '`traceback` `["\\x1b[0;31mWorkerDied\\x1b[0m: <evalue>"]`' in section
    assert error.traceback == [f"\x1b[0;31mWorkerDied\x1b[0m: {error.evalue}"]
    assert f'`code` `"{failed.code}"` and `detail` `"{failed.detail}"`' in section


def test_death_aborts_queued_cells_and_fails_other_requests() -> None:
    running, queued = ExecuteMessage(), ExecuteMessage()
    complete, ping, comm = CompleteMessage(), PingMessage(), CommMsgMessage()
    checkpoint, configure = CheckpointMessage(), ConfigureMessage()
    conv = sent(running, queued, complete, ping, comm, checkpoint, configure)
    out = conv.worker_died("exit code 3")
    assert [(m.type, m.parent_id) for m in out] == [
        (MessageType.ERROR, running.id),
        (MessageType.EXECUTE_REPLY, running.id),
        (MessageType.EXECUTE_REPLY, queued.id),
        (MessageType.PROTOCOL_ERROR, complete.id),
        (MessageType.PROTOCOL_ERROR, ping.id),
        (MessageType.PROTOCOL_ERROR, comm.id),
        (MessageType.PROTOCOL_ERROR, checkpoint.id),
        (MessageType.PROTOCOL_ERROR, configure.id),
    ]
    aborted = out[2]
    assert isinstance(aborted, ExecuteReplyMessage)
    assert (aborted.status, aborted.ename, aborted.evalue, aborted.traceback) == (
        "aborted",
        "",
        "",
        [],
    )
    for msg in out[3:]:
        assert isinstance(msg, ProtocolErrorMessage)
        assert msg.code == "worker_died" and msg.code is ProtocolErrorCode.WORKER_DIED
        assert msg.detail == "the worker process died (exit code 3)"
        assert (msg.ok, msg.ename, msg.evalue) == (False, "worker_died", msg.detail)
    assert len(conv) == 0


def test_death_while_a_completion_runs_gives_no_cell_error() -> None:
    complete, cell = CompleteMessage(), ExecuteMessage()
    conv = sent(complete, cell)
    out = conv.worker_died(CAUSE)
    assert [(m.type, m.parent_id) for m in out] == [
        (MessageType.PROTOCOL_ERROR, complete.id),
        (MessageType.EXECUTE_REPLY, cell.id),
    ]
    assert isinstance(out[1], ExecuteReplyMessage) and out[1].status == "aborted"


def test_death_answers_a_shutdown_with_its_reply() -> None:
    cell, shutdown = ExecuteMessage(), ShutdownMessage(restart=True)
    out = sent(cell, shutdown).worker_died("shut down")
    assert [m.type for m in out] == ["error", "execute_reply", "shutdown_reply"]
    assert isinstance(out[2], ShutdownReplyMessage)
    assert (out[2].parent_id, out[2].status, out[2].restart) == (shutdown.id, "ok", False)
    (alone,) = sent(shutdown).worker_died("shut down")
    assert isinstance(alone, ShutdownReplyMessage) and alone.status == "ok"


def test_death_after_out_of_order_acks_ends_only_what_is_open() -> None:
    cell, comm, later = ExecuteMessage(), CommMsgMessage(), CommMsgMessage()
    conv = sent(cell, comm, later)
    conv.receive(AckMessage(parent_id=later.id))
    out = conv.worker_died(CAUSE)
    assert [(m.type, m.parent_id) for m in out] == [
        (MessageType.ERROR, cell.id),
        (MessageType.EXECUTE_REPLY, cell.id),
        (MessageType.PROTOCOL_ERROR, comm.id),
    ]


def test_death_of_an_idle_worker_produces_nothing() -> None:
    cell = ExecuteMessage()
    conv = sent(cell)
    conv.receive(reply_to(cell))
    assert conv.worker_died(CAUSE) == []


def test_synthetic_messages_survive_the_codec() -> None:
    out = sent(ExecuteMessage(), ExecuteMessage(), PingMessage()).worker_died(CAUSE)
    for msg in out:
        for codec in ("msgpack", "json"):
            assert decode(encode(msg, codec)) == msg


# -- a failing handler --------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_a_failed_handler_ends_its_request(kind: MessageType) -> None:
    request = request_of(kind)
    reply = failure_reply(request, "KeyboardInterrupt", "interrupted", execution_count=4)
    assert ends_request(reply, request)
    assert isinstance(reply, Reply) and not reply.ok
    assert (reply.status, reply.ename, reply.evalue) == (
        ("error", "KeyboardInterrupt", "interrupted")
        if reply.type != "protocol_error"
        else ("error", "failed", "KeyboardInterrupt: interrupted")
    )


def test_failure_replies_are_those_the_worker_sends() -> None:
    reply = failure_reply(ExecuteMessage(id="e"), "NameError", "x", execution_count=7)
    assert reply == ExecuteReplyMessage(
        id=reply.id,
        timestamp=reply.timestamp,
        parent_id="e",
        status="error",
        ename="NameError",
        evalue="x",
        execution_count=7,
    )
    for answered in (CommOpenMessage(), CommMsgMessage(), ConfigureMessage()):
        ack = failure_reply(answered, "OSError", "no such directory")
        assert isinstance(ack, AckMessage)
        assert (ack.status, ack.ename, ack.evalue) == ("error", "OSError", "no such directory")
    checkpoint = failure_reply(CheckpointMessage(), "KeyboardInterrupt", "interrupted")
    assert isinstance(checkpoint, CheckpointReplyMessage) and checkpoint.status == "error"
    for request in (CompleteMessage(), IsCompleteMessage(), ShutdownMessage()):
        err = failure_reply(request, "ValueError", "bad")
        assert isinstance(err, ProtocolErrorMessage)
        assert (err.code, err.detail, err.parent_id) == ("failed", "ValueError: bad", request.id)
    with pytest.raises(ValueError, match="'interrupt' is not a request"):
        failure_reply(InterruptMessage(), "E", "v")


# -- any interleaving a worker may produce --------------------------------------------


REQUEST_KINDS = sorted(REQUESTS)


@FAST
@given(data=st.data())
def test_any_conversation_then_a_death(data: st.DataObject) -> None:
    """A worker that answers ordered requests in order, comms early while a
    cell runs, and ping/health at once; then dies. At every step the
    conversation knows what runs; at the end every request has ended exactly
    once, the synthetic endings in the order the requests were sent."""
    conv = Conversation()
    requests: dict[str, Message] = {}
    main: list[str] = []  # ordered, unanswered, in order sent
    at_once: list[str] = []  # ping/health, unanswered
    ended: list[str] = []
    last_ordered: str | None = None

    for _ in range(data.draw(st.integers(0, 30))):
        step = data.draw(st.sampled_from(["send", "send", "head", "overtake", "at_once", "stray"]))
        if step == "send":
            request = request_of(data.draw(st.sampled_from(REQUEST_KINDS)))
            conv.send(request)
            requests[request.id] = request
            if request.type in ORDERED_REQUESTS:
                main.append(request.id)
                last_ordered = request.id
            else:
                at_once.append(request.id)
            continue
        if step == "stray":
            target = data.draw(st.sampled_from([*ended, "nobody"]))
            stray = ExecuteReplyMessage(parent_id=target)
            assert conv.receive(stray) is None
            continue
        if step == "head" and main:
            rid = main[0]
        elif step == "overtake" and main and requests[main[0]].type == MessageType.EXECUTE:
            early = [r for r in main[1:] if requests[r].type in DURING_AWAIT_REQUESTS]
            if not early:
                continue
            rid = data.draw(st.sampled_from(early))
        elif step == "at_once" and at_once:
            rid = data.draw(st.sampled_from(at_once))
        else:
            continue
        request = requests[rid]
        assert conv.receive(OutputMessage(parent_id=rid)) is None
        if data.draw(st.booleans()):
            end: Message = reply_to(request)
        else:
            end = ProtocolErrorMessage(code="bad_field", parent_id=rid)
        assert conv.receive(end) == rid
        (main if rid in main else at_once).remove(rid)
        ended.append(rid)

        assert conv.running == (main[0] if main else None)
        assert conv.queued == main[1:]
        assert conv.output_owner == (main[0] if main else last_ordered)
        assert set(conv) == set(main) | set(at_once)

    running = main[0] if main else None
    open_in_order = [rid for rid in requests if rid in set(main) | set(at_once)]
    assert list(conv.open_requests) == open_in_order
    out = conv.worker_died(CAUSE)
    endings = [m for m in out if isinstance(m, Reply)]
    assert [m.parent_id for m in endings] == open_in_order
    for msg in endings:
        assert msg.parent_id is not None
        assert ends_request(msg, requests[msg.parent_id])
        assert msg.status in ("error", "aborted") or msg.type == MessageType.SHUTDOWN_REPLY
    errors = [m for m in out if isinstance(m, ErrorMessage)]
    if running is not None and requests[running].type == MessageType.EXECUTE:
        assert [e.parent_id for e in errors] == [running]
        assert out[out.index(errors[0]) + 1].parent_id == running
    else:
        assert errors == []
    assert set(ended).isdisjoint(m.parent_id for m in out)
    assert (len(conv), conv.running, conv.output_owner) == (0, None, last_ordered)
    assert all(
        r.status == "aborted"
        for r in endings
        if r.type == "execute_reply" and r.parent_id != running
    )
