"""gateway/wire.py against jupyter_client's Session: each reads what the
other writes, and bad frames are refused with a clear error."""

from __future__ import annotations

import pytest
from jupyter_client.session import Session

from pyrepl3_kernel.gateway.wire import Wire, WireError

KEY = b"secret-key"


def _client() -> Session:
    return Session(key=KEY, signature_scheme="hmac-sha256", username="client")


def test_jupyter_client_reads_what_the_wire_writes() -> None:
    wire, client = Wire(KEY), _client()
    request = client.msg("execute_request", content={"code": "1+1"})
    _, parsed = wire.parse(client.serialize(request))
    msg = wire.new_message(
        "execute_result",
        {"data": {"text/plain": "2"}, "execution_count": 1, "nan": "é"},
        parent=parsed,
        metadata={"started": "2026-12-03T00:00:00Z"},
    )
    frames = wire.frames(msg, [b"topic"])
    idents, rest = client.feed_identities(frames)
    assert idents == [b"topic"]
    got = client.deserialize(rest)  # checks the signature
    assert got["content"] == msg["content"]
    assert got["metadata"] == {"started": "2026-12-03T00:00:00Z"}
    assert got["parent_header"]["msg_id"] == request["header"]["msg_id"]
    assert got["header"]["msg_type"] == "execute_result"
    assert got["header"]["version"] == "5.4"
    assert got["header"]["session"] == wire.session


def test_the_wire_reads_what_jupyter_client_writes() -> None:
    wire, client = Wire(KEY), _client()
    request = client.msg("comm_msg", content={"comm_id": "c", "data": {}})
    frames = client.serialize(request, [b"id1", b"id2"]) + [b"buffer"]
    idents, msg = wire.parse(frames)
    assert idents == [b"id1", b"id2"]
    assert msg["msg_type"] == "comm_msg" and msg["content"] == {"comm_id": "c", "data": {}}
    assert msg["msg_id"] == request["header"]["msg_id"]
    assert [bytes(b) for b in msg["buffers"]] == [b"buffer"]


def test_each_message_gets_its_own_id_and_the_parent_header_is_reused() -> None:
    wire, client = Wire(KEY), _client()
    _, first = wire.parse(client.serialize(client.msg("execute_request", content={})))
    _, second = wire.parse(client.serialize(client.msg("execute_request", content={})))
    ids = set()
    for parent in (first, second, first):
        msg = wire.new_message("status", {"execution_state": "busy"}, parent=parent)
        ids.add(msg["msg_id"])
        got = client.deserialize(client.feed_identities(wire.frames(msg))[1])
        assert got["parent_header"]["msg_id"] == parent["msg_id"]
    assert len(ids) == 3


@pytest.mark.parametrize(
    "damage, error",
    [
        (lambda f: [x for x in f if x != b"<IDS|MSG>"], "delimiter"),
        (lambda f: f[:-1], "at least 5 frames"),
        (lambda f: [*f[:1], b"", *f[2:]], "unsigned"),
        (lambda f: [*f[:1], b"0" * 64, *f[2:]], "invalid signature"),
    ],
)
def test_bad_frames_are_refused(damage: object, error: str) -> None:
    wire, client = Wire(KEY), _client()
    frames = client.serialize(client.msg("kernel_info_request", content={}))
    with pytest.raises(WireError, match=error):
        wire.parse(damage(frames))  # type: ignore[operator]


def test_a_replayed_message_is_refused() -> None:
    wire, client = Wire(KEY), _client()
    frames = client.serialize(client.msg("kernel_info_request", content={}))
    wire.parse(frames)
    with pytest.raises(WireError, match="duplicate signature"):
        wire.parse(frames)


def test_malformed_json_is_refused() -> None:
    wire = Wire(b"")  # no key: no signatures, as jupyter_client
    frames = [b"<IDS|MSG>", b"", b'{"msg_id": "1"', b"{}", b"{}", b"{}"]
    with pytest.raises(WireError, match="malformed"):
        wire.parse(frames)
    with pytest.raises(WireError, match="malformed"):
        wire.parse([b"<IDS|MSG>", b"", b"[]", b"{}", b"{}", b"{}"])


def test_an_unknown_signature_scheme_is_an_error() -> None:
    with pytest.raises(ValueError, match="signature scheme"):
        Wire(KEY, "rsa-sha256")
