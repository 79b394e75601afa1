"""Tests of the sans-I/O native protocol (messages, codec, framing, handshake).

No processes, no sockets: bytes in, messages out. See docs/protocol.md.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import pathlib
import types
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrepl3_kernel.protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MESSAGE_CLASSES,
    PROTOCOL_VERSION,
    REPLY_TYPES,
    SUPPORTED_VERSIONS,
    AckMessage,
    CheckpointReplyMessage,
    CommMsgMessage,
    CompleteReplyMessage,
    ExecuteMessage,
    ExecuteReplyMessage,
    FrameDecoder,
    HealthReplyMessage,
    IsCompleteReplyMessage,
    Message,
    MessageType,
    OutputMessage,
    PingMessage,
    PongMessage,
    ProtocolError,
    ProtocolErrorCode,
    ProtocolErrorMessage,
    ReadyMessage,
    Reply,
    decode,
    encode,
    frame,
    from_dict,
    negotiate,
    to_dict,
)
from pyrepl3_kernel.protocol.framing import MAX_FRAME_SIZE
from pyrepl3_kernel.protocol.messages import FIELD_TYPES

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PER_CLASS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CODECS = ("msgpack", "json")

# -- strategies ----------------------------------------------------------------

# Values both codecs carry losslessly: 64-bit ints, finite floats, unicode text,
# bytes, lists and string-keyed maps. A map whose only key is "$binary" is the
# JSON encoding of bytes, so it cannot appear as data.
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
keys = st.text(max_size=12).filter(lambda k: k != "$binary")
scalars = st.none() | st.booleans() | ints | floats | st.text(max_size=30) | st.binary(max_size=30)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
maps = st.dictionaries(keys, values, max_size=5)


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    """A strategy of wire-valid values for a field annotated ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(arg) for arg in typing.get_args(hint)])
    if hint is type(None):
        return st.none()
    if hint is Any:
        return values
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return st.lists(strategy_for(item), max_size=4)
    if origin is dict:
        return maps
    return {
        bool: st.booleans(),
        int: ints,
        float: floats,
        str: st.text(max_size=40),
        bytes: st.binary(max_size=64),
    }[hint]


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    return st.builds(cls, **{name: strategy_for(h) for name, h in FIELD_TYPES[cls].items()})


any_message = st.sampled_from(sorted(MESSAGE_CLASSES.values(), key=lambda c: c.__name__)).flatmap(
    message_strategy
)


def packed(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def wire(**fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, **fields}


# -- message types -------------------------------------------------------------


def test_message_type_is_a_str_enum() -> None:
    assert MessageType.OUTPUT == "output"
    assert str(MessageType.OUTPUT) == "output"
    assert OutputMessage().type == "output"
    assert OutputMessage.type is MessageType.OUTPUT
    assert MessageType("execute_reply") is MessageType.EXECUTE_REPLY


def test_every_non_reserved_type_has_a_class() -> None:
    assert set(MESSAGE_CLASSES) == set(MessageType)
    for msg_type, cls in MESSAGE_CLASSES.items():
        assert cls.type is msg_type


def test_reply_types_are_real_messages() -> None:
    for request, reply in REPLY_TYPES.items():
        assert request in MESSAGE_CLASSES
        assert reply in MESSAGE_CLASSES


def test_defaults() -> None:
    a, b = PingMessage(), PingMessage()
    assert a.id != b.id
    assert len(a.id) == 32 and int(a.id, 16) >= 0
    assert isinstance(a.timestamp, float)
    assert a.parent_id is None
    e = ExecuteMessage()
    assert (e.code, e.silent, e.store_history, e.allow_stdin, e.cell_id) == (
        "",
        False,
        True,
        True,
        None,
    )


# -- replies -------------------------------------------------------------------


def test_every_reply_shares_the_reply_base() -> None:
    for reply_type in [*REPLY_TYPES.values(), MessageType.PROTOCOL_ERROR]:
        assert issubclass(MESSAGE_CLASSES[reply_type], Reply)
    # The base adds nothing to the wire: its fields are the common ones.
    assert [f.name for f in dataclasses.fields(Reply)] == ["id", "timestamp", "parent_id"]
    assert Reply not in MESSAGE_CLASSES.values()


def test_reply_fields_keep_their_wire_order() -> None:
    """The base class must not move a reply's fields: the encoder writes them
    in class order (docs/protocol.md 4.1)."""
    reply = ExecuteReplyMessage(id="i", timestamp=1.0, status="error", ename="E")
    assert list(to_dict(reply)) == [
        "v",
        "type",
        "id",
        "timestamp",
        "parent_id",
        "status",
        "execution_count",
        "ename",
        "evalue",
        "traceback",
        "payload",
        "user_expressions",
    ]
    assert list(to_dict(AckMessage()))[5:] == ["status", "ename", "evalue"]
    assert list(to_dict(PongMessage()))[5:] == []


def test_every_reply_reads_status_ok_ename_evalue() -> None:
    failed = AckMessage(status="error", ename="OSError", evalue="gone")
    assert (failed.status, failed.ok, failed.ename, failed.evalue) == (
        "error",
        False,
        "OSError",
        "gone",
    )
    assert ExecuteReplyMessage(status="aborted").ok is False
    assert CheckpointReplyMessage().ok is True
    # Replies without the fields read as succeeded, with nothing to say.
    for reply in (PongMessage(), HealthReplyMessage(), CompleteReplyMessage()):
        assert (reply.status, reply.ok, reply.ename, reply.evalue) == ("ok", True, "", "")
    assert CompleteReplyMessage(status="error").ok is False
    # is_complete_reply's status is its answer, never a failure.
    for answer in ("complete", "incomplete", "invalid", "unknown"):
        assert IsCompleteReplyMessage(status=answer).ok
    # A protocol error reads as a failed reply: its code names it.
    err = ProtocolErrorMessage(code="bad_field", detail="field 'code' must be str")
    assert (err.status, err.ok, err.ename, err.evalue) == (
        "error",
        False,
        "bad_field",
        "field 'code' must be str",
    )
    assert "status" not in to_dict(err) and "ename" not in to_dict(PongMessage())


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("cls", sorted(MESSAGE_CLASSES.values(), key=lambda c: c.__name__))
@PER_CLASS
@given(data=st.data())
def test_round_trip_every_class(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    for codec in CODECS:
        payload = encode(msg, codec)
        assert (payload[:1] == b"{") == (codec == "json")
        back = decode(payload)
        assert type(back) is cls
        assert back == msg, codec


@FAST
@given(msg=any_message)
def test_round_trip_through_frames(msg: Message) -> None:
    stream = frame(encode(msg)) + frame(encode(msg, "json"))
    dec = FrameDecoder()
    payloads = dec.feed(stream)
    assert dec.pending == 0
    assert [decode(p) for p in payloads] == [msg, msg]  # type: ignore[arg-type]


def test_wire_map_layout() -> None:
    msg = OutputMessage(id="i", timestamp=1.5, parent_id="p", stream="stderr", data="x")
    expected = {
        "v": 1,
        "type": "output",
        "id": "i",
        "timestamp": 1.5,
        "parent_id": "p",
        "stream": "stderr",
        "data": "x",
    }
    assert to_dict(msg) == expected
    assert msgpack.unpackb(encode(msg), raw=False) == expected
    assert json.loads(encode(msg, "json")) == expected
    assert from_dict(expected) == msg


def test_json_binary_values() -> None:
    msg = CommMsgMessage(comm_id="c", data={"blob": b"\x00\xff"}, buffers=[b"\x01\x02", b""])
    obj = json.loads(encode(msg, "json"))
    assert obj["buffers"] == [{"$binary": "AQI="}, {"$binary": ""}]
    assert obj["data"] == {"blob": {"$binary": base64.b64encode(b"\x00\xff").decode()}}
    assert decode(encode(msg, "json")) == msg


def test_msgpack_bytes_are_bin_and_text_is_str() -> None:
    msg = CommMsgMessage(comm_id="é", buffers=[b"ab"])
    raw = msgpack.unpackb(encode(msg), raw=True)
    assert raw[b"comm_id"] == "é".encode()
    assert raw[b"buffers"] == [b"ab"]
    with pytest.raises(ValueError):
        encode(msg, "xml")


def test_worked_example_bytes() -> None:
    """The exact bytes shown in docs/protocol.md (section "Worked example")."""
    msg = ExecuteMessage(
        id="5f2b0c1e9d8a4b7c8e6f1a2b3c4d5e6f", timestamp=1700000000.5, code="print('hi')"
    )
    payload = encode(msg)
    assert payload.hex() == (
        "8ca17601a474797065a765786563757465a26964d920356632623063316539643861"
        "3462376338653666316132623363346435653666a974696d657374616d70cb41d954"
        "fc40200000a9706172656e745f6964c0ab7375627368656c6c5f6964c0a4636f6465"
        "ab7072696e74282768692729a673696c656e74c2ad73746f72655f686973746f7279"
        "c3b0757365725f65787072657373696f6e7380ab616c6c6f775f737464696ec3a763"
        "656c6c5f6964c0"
    )
    assert frame(payload)[:4] == bytes.fromhex("000000b1")
    assert decode(payload) == msg


# -- garbage never raises anything but ProtocolError ---------------------------


def decodes_or_protocol_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ProtocolErrorCode)
        assert exc.code in {
            "malformed",
            "unknown_type",
            "unsupported_version",
            "bad_field",
            "too_large",
            "unsupported",
        }
    else:
        assert isinstance(msg, Message)


@FAST
@given(data=st.binary(max_size=200))
def test_garbage_bytes(data: bytes) -> None:
    decodes_or_protocol_error(data)


@FAST
@given(data=st.binary(max_size=200))
def test_garbage_json_prefixed(data: bytes) -> None:
    decodes_or_protocol_error(b"{" + data)


@FAST
@given(
    obj=st.dictionaries(
        st.sampled_from(["v", "type", "id", "timestamp", "parent_id", "code", "buffers", "data"])
        | st.text(max_size=5),
        values | st.sampled_from([1, 2, "execute", "comm_msg", "checkpoint", "nope"]),
        max_size=8,
    )
    | values,
    as_json=st.booleans(),
)
def test_structured_garbage(obj: Any, as_json: bool) -> None:
    data = packed(obj)
    if as_json and isinstance(obj, dict):
        try:
            data = json.dumps(obj, default=lambda b: {"$binary": base64.b64encode(b).decode()})
        except (TypeError, ValueError):
            return
        data = data.encode()
    decodes_or_protocol_error(data)


@FAST
@given(msg=any_message, data=st.data())
def test_mutated_messages(msg: Message, data: st.DataObject) -> None:
    payload = bytearray(encode(msg, data.draw(st.sampled_from(CODECS))))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    decodes_or_protocol_error(bytes(payload[:cut]))
    decodes_or_protocol_error(bytes(payload))


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    decodes_or_protocol_error(b"\x91" * 100_000)
    decodes_or_protocol_error(b'{"v":1,"type":"ping","x":' + b"[" * 100_000)


# -- error codes ---------------------------------------------------------------


def error_of(data: bytes, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, **kwargs)
    return info.value


@pytest.mark.parametrize("codec", CODECS)
def test_unknown_type(codec: str) -> None:
    obj = wire(type="teleport", id="abc")
    data = packed(obj) if codec == "msgpack" else json.dumps(obj).encode()
    err = error_of(data)
    assert err.code == "unknown_type"
    assert err.message_id == "abc"


@pytest.mark.parametrize("version", [0, 2, 99, -1])
def test_unsupported_version(version: int) -> None:
    err = error_of(packed({"v": version, "type": "ping", "id": "x"}))
    assert (err.code, err.message_id) == ("unsupported_version", "x")
    if version == 2:  # a receiver that also speaks 2 accepts it
        assert isinstance(decode(packed({"v": 2, "type": "ping"}), versions=(1, 2)), PingMessage)


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "ping"},  # no version
        {"v": "1", "type": "ping"},
        {"v": True, "type": "ping"},
        {"v": 1.0, "type": "ping"},
        {"v": 1},  # no type
        {"v": 1, "type": 7},
    ],
)
def test_bad_envelope_is_malformed(obj: dict[str, Any]) -> None:
    assert error_of(packed(obj)).code == "malformed"


@pytest.mark.parametrize("obj", [[1, "ping"], 42, "execute", None, b"\x01", [], 1.5])
def test_non_map_payload_is_malformed(obj: Any) -> None:
    assert error_of(packed(obj)).code == "malformed"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"{not json}",
        b'{"v":1,"type":"comm_msg","buffers":[{"$binary":"%%%"}]}',
        b'{"$binary":"AAAA"}',  # top level decodes to bytes, not a map
        packed(wire(type="ping")) + b"\x00",  # trailing bytes
        packed(wire(type="ping", x={1: 2})),  # non-string map key
        b"\xc1",  # never-used msgpack byte
        bytes([0x81, 0xA1, 0x76]),  # truncated map
        packed(wire(type="ping"))[:-1],
        bytes([0x81, 0xA1, 0x76, 0xA2, 0xFF, 0xFE]),  # invalid UTF-8 string
    ],
)
def test_malformed_payloads(data: bytes) -> None:
    assert error_of(data).code == "malformed"


@pytest.mark.parametrize(
    ("type_", "field", "value"),
    [
        ("execute", "code", 5),
        ("execute", "code", None),
        ("execute", "silent", 1),  # int is not bool
        ("execute", "user_expressions", []),
        ("execute", "cell_id", 3),
        ("result", "execution_count", True),  # bool is not int
        ("result", "execution_count", 1.0),
        ("ping", "timestamp", "now"),
        ("ping", "id", 12),
        ("ping", "parent_id", 12),
        ("comm_msg", "buffers", ["text"]),
        ("comm_msg", "buffers", b"x"),
        ("ready", "protocol_versions", [1, 1.5]),
        ("execute_reply", "payload", [1]),
        ("interrupt", "target", False),
    ],
)
def test_wrong_field_type(type_: str, field: str, value: Any) -> None:
    err = error_of(packed(wire(**{"type": type_, "id": "m1", field: value})))
    assert err.code == "bad_field"
    assert field in err.detail
    assert err.message_id == ("m1" if field != "id" else None)


def test_error_codes_are_one_str_enum() -> None:
    assert [c.value for c in ProtocolErrorCode] == [
        "malformed",
        "unknown_type",
        "unsupported_version",
        "too_large",
        "bad_field",
        "unexpected",
        "unsupported",
        "failed",
        "worker_died",
    ]
    for code in ProtocolErrorCode:
        assert code == code.value and str(code) == code.value and f"{code}" == code.value
    err = ProtocolError("malformed", "empty message")  # a plain string is taken
    assert err.code is ProtocolErrorCode.MALFORMED
    assert str(err) == "malformed: empty message"
    with pytest.raises(ValueError, match="unknown protocol error code 'oops'.*malformed"):
        ProtocolError("oops", "x")


@pytest.mark.parametrize("codec", CODECS)
def test_error_code_on_the_wire_is_its_string(codec: str) -> None:
    as_enum = ProtocolErrorMessage(id="i", timestamp=1.0, code=ProtocolErrorCode.TOO_LARGE)
    as_str = ProtocolErrorMessage(id="i", timestamp=1.0, code="too_large")
    assert encode(as_enum, codec) == encode(as_str, codec)
    back = decode(encode(as_enum, codec))
    assert back == as_enum and back == as_str
    # A code this side does not know (a newer peer) is kept as it is.
    newer = decode(packed(wire(type="protocol_error", code="from_the_future")))
    assert isinstance(newer, ProtocolErrorMessage) and newer.code == "from_the_future"


def test_docs_list_every_error_code() -> None:
    text = DOCS.read_text()
    table = text[text.index("| code                  | sent by | meaning |") :]
    table = table[: table.index("\n\n")]
    documented = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]]
    assert documented == [c.value for c in ProtocolErrorCode]


def test_too_large() -> None:
    data = encode(OutputMessage(data="x" * 200))
    err = error_of(data, max_size=100)
    assert err.code == "too_large"
    assert decode(data, max_size=len(data)) == decode(data)
    assert DEFAULT_MAX_MESSAGE_SIZE == 256 * 1024 * 1024


# -- forward compatibility -----------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_unknown_fields_are_ignored(codec: str) -> None:
    obj = wire(
        type="execute",
        id="e1",
        timestamp=2.0,
        code="1+1",
        future_field={"nested": [1, 2]},
        another=b"\x00" if codec == "msgpack" else "x",
    )
    data = packed(obj) if codec == "msgpack" else json.dumps(obj).encode()
    msg = decode(data)
    assert msg == ExecuteMessage(id="e1", timestamp=2.0, code="1+1")
    assert not hasattr(msg, "future_field")


def test_missing_fields_take_defaults() -> None:
    msg = decode(packed(wire(type="execute", code="x")))
    assert isinstance(msg, ExecuteMessage)
    assert (msg.code, msg.silent, msg.store_history, msg.parent_id) == ("x", False, True, None)
    assert len(msg.id) == 32


def test_integer_timestamp_is_accepted() -> None:
    assert decode(packed(wire(type="ping", timestamp=17))).timestamp == 17


# -- framing -------------------------------------------------------------------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]


@FAST
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_arbitrary_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    dec = FrameDecoder()
    out: list[Any] = []
    for chunk in chunked(stream, cuts):
        out += dec.feed(chunk)
    assert out == payloads
    assert dec.pending == 0


@FAST
@given(
    before=st.lists(st.binary(max_size=10), max_size=3),
    big=st.binary(min_size=11, max_size=200),
    after=st.lists(st.binary(max_size=10), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_oversized_frame_is_skipped(
    before: list[bytes], big: bytes, after: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frame(p) for p in [*before, big, *after])
    dec = FrameDecoder(max_size=10)
    out: list[Any] = []
    for chunk in chunked(stream, cuts):
        out += dec.feed(chunk)
    assert out[: len(before)] == before
    err = out[len(before)]
    assert isinstance(err, ProtocolError) and err.code == "too_large"
    assert out[len(before) + 1 :] == after
    assert dec.pending == 0


def test_oversized_frame_then_message_decodes() -> None:
    good = encode(PingMessage(id="after"))
    dec = FrameDecoder(max_size=len(good))
    out = dec.feed(frame(b"\x00" * (len(good) + 1)) + frame(good))
    assert isinstance(out[0], ProtocolError) and out[0].code == "too_large"
    assert decode(out[1]).id == "after"  # type: ignore[arg-type]


def test_pending_reports_truncation() -> None:
    dec = FrameDecoder()
    assert dec.pending == 0
    assert dec.feed(b"\x00\x00") == []
    assert dec.pending == 2  # half a header
    assert dec.feed(b"\x00\x05abc") == []
    assert dec.pending == 7  # header + 3 of 5 bytes
    assert dec.feed(b"de" + frame(b"z")) == [b"abcde", b"z"]
    assert dec.pending == 0


def test_pending_counts_bytes_still_to_skip() -> None:
    dec = FrameDecoder(max_size=4)
    out = dec.feed(frame(b"123456789")[:6])  # header + 2 of 9 bytes
    assert [e.code for e in out] == ["too_large"]  # type: ignore[union-attr]
    assert dec.pending == 7
    assert dec.feed(b"34567") == []
    assert dec.pending == 2
    assert dec.feed(b"89" + frame(b"ok")) == [b"ok"]
    assert dec.pending == 0


def test_empty_frame_is_an_empty_payload() -> None:
    (payload,) = FrameDecoder().feed(frame(b""))
    assert payload == b""
    assert error_of(payload).code == "malformed"  # type: ignore[arg-type]


def test_frame_header_is_big_endian_u32() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"x" * 0x1234)[:4] == b"\x00\x00\x12\x34"

    class Huge(bytes):
        def __len__(self) -> int:
            return MAX_FRAME_SIZE + 1

    with pytest.raises(ValueError):
        frame(Huge())


# -- handshake -----------------------------------------------------------------


@FAST
@given(
    worker=st.lists(st.integers(0, 20), max_size=6),
    client=st.lists(st.integers(0, 20), min_size=1, max_size=6),
    as_iterator=st.booleans(),
)
def test_negotiate(worker: list[int], client: list[int], as_iterator: bool) -> None:
    ready = ReadyMessage(protocol_versions=worker)
    supported: Any = iter(client) if as_iterator else tuple(client)
    common = set(worker) & set(client)
    if common:
        hello = negotiate(ready, supported)
        assert hello.version == max(common)
        assert hello.parent_id == ready.id
    else:
        with pytest.raises(ProtocolError) as info:
            negotiate(ready, supported)
        assert info.value.code == "unsupported_version"
        assert info.value.message_id == ready.id
        assert str(sorted(client)) in info.value.detail


def test_negotiate_defaults_to_this_implementation() -> None:
    assert SUPPORTED_VERSIONS == (1,) and PROTOCOL_VERSION == 1
    assert negotiate(ReadyMessage(protocol_versions=[1, 2, 3])).version == 1
    with pytest.raises(ProtocolError):
        negotiate(ReadyMessage(protocol_versions=[2]))
    hello = decode(encode(negotiate(ReadyMessage(protocol_versions=[1]))))
    assert hello.type == "hello"
