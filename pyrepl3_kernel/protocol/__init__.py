"""The native protocol: messages, codec, framing, handshake and the
request/reply conversation. No I/O."""

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
from .conversation import (
    DURING_AWAIT_REQUESTS,
    ORDERED_REQUESTS,
    REPLY_CLASSES,
    REPLY_TYPES,
    REQUESTS,
    TERMINAL_TYPES,
    UNKNOWN_SUBSHELL,
    WORKER_DIED,
    Conversation,
    RequestRule,
    ends_request,
    failure_reply,
    worker_died_text,
)
from .framing import FrameDecoder, frame
from .handshake import negotiate
from .messages import *  # noqa: F403
from .messages import (
    FAILED_STATUSES,
    MESSAGE_CLASSES,
    Message,
    MessageType,
    ProtocolErrorCode,
    Reply,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DURING_AWAIT_REQUESTS",
    "FAILED_STATUSES",
    "MESSAGE_CLASSES",
    "ORDERED_REQUESTS",
    "PROTOCOL_VERSION",
    "REPLY_CLASSES",
    "REPLY_TYPES",
    "REQUESTS",
    "SUPPORTED_VERSIONS",
    "TERMINAL_TYPES",
    "UNKNOWN_SUBSHELL",
    "WORKER_DIED",
    "Conversation",
    "FrameDecoder",
    "Message",
    "MessageType",
    "ProtocolError",
    "ProtocolErrorCode",
    "Reply",
    "RequestRule",
    "decode",
    "encode",
    "ends_request",
    "failure_reply",
    "frame",
    "from_dict",
    "negotiate",
    "to_dict",
    "worker_died_text",
] + [cls.__name__ for cls in MESSAGE_CLASSES.values()]
