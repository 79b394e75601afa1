"""The native protocol: messages, codec, framing and handshake. No I/O."""

from .codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    ProtocolError,
    decode,
    encode,
    from_dict,
    to_dict,
)
from .framing import FrameDecoder, frame
from .handshake import negotiate
from .messages import *  # noqa: F403
from .messages import MESSAGE_CLASSES, ORDERED_REQUESTS, REPLY_TYPES, Message, MessageType

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MESSAGE_CLASSES",
    "ORDERED_REQUESTS",
    "PROTOCOL_VERSION",
    "REPLY_TYPES",
    "SUPPORTED_VERSIONS",
    "FrameDecoder",
    "Message",
    "MessageType",
    "ProtocolError",
    "decode",
    "encode",
    "frame",
    "from_dict",
    "negotiate",
    "to_dict",
] + [cls.__name__ for cls in MESSAGE_CLASSES.values()]
