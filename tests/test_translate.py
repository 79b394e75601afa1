"""Jupyter <-> native translation (gateway/translate.py), without sockets or
processes: requests as clients send them become the native requests, and
native messages become the Jupyter content a client expects."""

from __future__ import annotations

from typing import Any

import pytest

from pyrepl3_kernel.gateway import translate
from pyrepl3_kernel.protocol import (
    CommCloseMessage,
    CommMsgMessage,
    CommOpenMessage,
    CompleteReplyMessage,
    DisplayMessage,
    ErrorMessage,
    ExecuteReplyMessage,
    MessageType,
    OutputMessage,
    ResultMessage,
    encode,
)


def jmsg(msg_type: str, content: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"header": {"msg_type": msg_type, "msg_id": "m1"}, "content": content, **extra}


def test_execute_request_defaults_follow_the_specification() -> None:
    native = translate.execute_request(jmsg("execute_request", {"code": "1+1"}), "n1")
    assert (native.id, native.code, native.silent, native.store_history) == (
        "n1",
        "1+1",
        False,
        True,
    )
    assert native.allow_stdin is True and native.user_expressions == {}
    silent = translate.execute_request(jmsg("execute_request", {"code": "", "silent": True}), "n2")
    assert silent.store_history is False  # store_history follows silent when not given
    cell = translate.execute_request(
        jmsg(
            "execute_request",
            {"code": "x", "allow_stdin": False, "user_expressions": {"a": "x"}},
            metadata={"cellId": "c-7"},
        ),
        "n3",
    )
    assert (cell.allow_stdin, cell.user_expressions, cell.cell_id) == (False, {"a": "x"}, "c-7")
    encode(cell)  # a valid native message


def test_complete_inspect_history_requests() -> None:
    complete = translate.complete_request({"code": "pri", "cursor_pos": 3})
    assert (complete.code, complete.cursor_pos) == ("pri", 3)
    inspect = translate.inspect_request({"code": "len", "cursor_pos": 3, "detail_level": 1})
    assert (inspect.code, inspect.detail_level) == ("len", 1)
    history = translate.history_request(
        {"hist_access_type": "range", "session": 2, "start": 1, "stop": 4, "raw": False}
    )
    assert (history.hist_access_type, history.session, history.start, history.stop) == (
        "range",
        2,
        1,
        4,
    )
    assert history.raw is False and history.n is None and history.pattern == "*"
    # What a client leaves out or sends malformed gets the default.
    odd = translate.history_request({"hist_access_type": "tail", "n": "ten", "stop": None})
    assert odd.n is None and odd.stop is None
    for native in (complete, inspect, history, odd):
        encode(native)


@pytest.mark.parametrize(
    ("msg_type", "cls"),
    [
        ("comm_open", CommOpenMessage),
        ("comm_msg", CommMsgMessage),
        ("comm_close", CommCloseMessage),
    ],
)
def test_comm_messages_keep_data_metadata_and_buffers(msg_type: str, cls: type) -> None:
    msg = jmsg(
        msg_type,
        {"comm_id": "c1", "target_name": "t", "data": {"x": 1}},
        metadata={"m": 2},
        buffers=[memoryview(b"ab"), b"cd"],
    )
    native: Any = translate.comm_message(msg)
    assert isinstance(native, cls)
    assert (native.comm_id, native.data, native.metadata, native.buffers) == (
        "c1",
        {"x": 1},
        {"m": 2},
        [b"ab", b"cd"],
    )
    if cls is CommOpenMessage:
        assert native.target_name == "t"
    encode(native)


def test_native_output_becomes_iopub() -> None:
    assert translate.iopub_for(OutputMessage(stream="stderr", data="x\n")) == (
        "stream",
        {"name": "stderr", "text": "x\n"},
        {},
        [],
    )
    update = translate.iopub_for(
        DisplayMessage(data={"text/plain": "1"}, transient={"display_id": "d"}, update=True)
    )
    assert update is not None and update[0] == "update_display_data"
    result = translate.iopub_for(ResultMessage(execution_count=3, data={"text/plain": "2"}))
    assert result is not None and result[1]["execution_count"] == 3
    error = translate.iopub_for(ErrorMessage(ename="E", evalue="v", traceback=["t"]))
    assert error == ("error", {"ename": "E", "evalue": "v", "traceback": ["t"]}, {}, [])


def test_replies() -> None:
    ok = translate.execute_reply_content(ExecuteReplyMessage(status="ok", execution_count=4))
    assert ok == {"status": "ok", "execution_count": 4, "user_expressions": {}, "payload": []}
    failed = translate.execute_reply_content(
        ExecuteReplyMessage(status="error", execution_count=5, ename="E", evalue="v")
    )
    assert failed["ename"] == "E" and failed["user_expressions"] == {}
    fields = translate.reply_content(
        CompleteReplyMessage(matches=["print"], cursor_start=0, cursor_end=3)
    )
    assert fields["matches"] == ["print"] and "id" not in fields and "parent_id" not in fields
    assert "type" not in fields or fields["type"] == MessageType.COMPLETE_REPLY
    assert translate.is_complete_content("incomplete", 4) == {
        "status": "incomplete",
        "indent": "    ",
    }
    assert translate.is_complete_content("incomplete", "  ") == {
        "status": "incomplete",
        "indent": "  ",
    }
    assert translate.is_complete_content("complete", 4) == {"status": "complete"}
