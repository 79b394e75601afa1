"""Encoding and decoding of native protocol messages (msgpack, JSON fallback).

Bytes in, messages out; no I/O. A payload whose first byte is ``{`` is JSON,
anything else is msgpack. Every decoding failure raises :class:`ProtocolError`
with a ``code`` from ``docs/protocol.md``; the caller answers it and goes on.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import types
import typing
from typing import Any

import msgpack

from ..errors import Pyrepl3Error
from .messages import FIELD_TYPES, MESSAGE_CLASSES, Message, MessageType, ProtocolErrorCode

#: The protocol version this implementation speaks (the ``v`` of every message).
PROTOCOL_VERSION = 1
#: All versions this implementation can speak, oldest first.
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
#: Largest encoded message accepted by default (bytes).
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024

_BINARY_KEY = "$binary"


class ProtocolError(Pyrepl3Error):
    """A message could not be decoded or accepted.

    ``code`` is a :class:`ProtocolErrorCode` (``malformed``, ``unknown_type``,
    ``unsupported_version``, ``too_large``, ``bad_field``, ``unsupported``);
    a plain string is taken if it is one of the codes. ``message_id`` is the
    offending message's id when it could be read.
    """

    def __init__(
        self, code: ProtocolErrorCode | str, detail: str, message_id: str | None = None
    ) -> None:
        try:
            code = ProtocolErrorCode(code)
        except ValueError:
            known = ", ".join(c.value for c in ProtocolErrorCode)
            raise ValueError(f"unknown protocol error code {code!r} (codes: {known})") from None
        super().__init__(f"{code}: {detail}")
        self.code: ProtocolErrorCode = code
        self.detail = detail
        self.message_id = message_id


def to_dict(msg: Message, version: int = PROTOCOL_VERSION) -> dict[str, Any]:
    """The wire form of ``msg`` as a plain dict (before msgpack or JSON)."""
    out: dict[str, Any] = {"v": version, "type": msg.type.value}
    for f in dataclasses.fields(msg):
        out[f.name] = getattr(msg, f.name)
    return out


def from_dict(obj: Any, *, versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> Message:
    """Validate a decoded wire dict and build its message.

    Unknown fields are ignored (forward compatibility); missing fields take
    their defaults; a field of the wrong type is a ``bad_field`` error.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(
            ProtocolErrorCode.MALFORMED, f"a message must be a map, got {type(obj).__name__}"
        )
    msg_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(
            ProtocolErrorCode.MALFORMED, "missing or non-integer protocol version 'v'", msg_id
        )
    if version not in versions:
        raise ProtocolError(
            ProtocolErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported (supported: {list(versions)})",
            msg_id,
        )
    type_name = obj.get("type")
    if not isinstance(type_name, str):
        raise ProtocolError(ProtocolErrorCode.MALFORMED, "missing message 'type'", msg_id)
    try:
        msg_type = MessageType(type_name)
    except ValueError:
        raise ProtocolError(
            ProtocolErrorCode.UNKNOWN_TYPE, f"unknown message type {type_name!r}", msg_id
        ) from None
    cls = MESSAGE_CLASSES.get(msg_type)
    if cls is None:  # a reserved type: known but not implemented
        raise ProtocolError(
            ProtocolErrorCode.UNSUPPORTED, f"message type {type_name!r} is not implemented", msg_id
        )
    kwargs: dict[str, Any] = {}
    for name, hint in FIELD_TYPES[cls].items():
        if name not in obj:
            continue
        value = obj[name]
        if not _conforms(value, hint):
            raise ProtocolError(
                ProtocolErrorCode.BAD_FIELD,
                f"field {name!r} of {type_name!r} must be {_describe(hint)}, "
                f"got {type(value).__name__}",
                msg_id,
            )
        kwargs[name] = value
    return cls(**kwargs)


def encode(msg: Message, codec: str = "msgpack", version: int = PROTOCOL_VERSION) -> bytes:
    """Encode ``msg`` as msgpack (default) or JSON."""
    wire = to_dict(msg, version)
    if codec == "msgpack":
        return msgpack.packb(wire, use_bin_type=True)  # type: ignore[no-any-return]
    if codec == "json":
        return json.dumps(wire, default=_json_default, separators=(",", ":")).encode()
    raise ValueError(f"unknown codec {codec!r} (use 'msgpack' or 'json')")


def decode(
    data: bytes,
    *,
    max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    versions: tuple[int, ...] = SUPPORTED_VERSIONS,
) -> Message:
    """Decode one message; the codec is recognized by the first byte."""
    if len(data) > max_size:
        raise ProtocolError(
            ProtocolErrorCode.TOO_LARGE, f"message of {len(data)} bytes exceeds {max_size}"
        )
    if not data:
        raise ProtocolError(ProtocolErrorCode.MALFORMED, "empty message")
    try:
        if data[:1] == b"{":
            obj = json.loads(data, object_hook=_json_object_hook)
        else:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack and json raise many exception types
        raise ProtocolError(ProtocolErrorCode.MALFORMED, f"undecodable payload: {exc}") from None
    return from_dict(obj, versions=versions)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_BINARY_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not serializable")


def _json_object_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _BINARY_KEY in obj:
        try:
            return base64.b64decode(obj[_BINARY_KEY], validate=True)
        except Exception as exc:
            raise ProtocolError(
                ProtocolErrorCode.MALFORMED, f"bad base64 in binary value: {exc}"
            ) from None
    return obj


def _conforms(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is list:
        if not isinstance(value, list):
            return False
        (item,) = typing.get_args(hint) or (Any,)
        return item is Any or all(_conforms(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bytes:
        return isinstance(value, bytes)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
