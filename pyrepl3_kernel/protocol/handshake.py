"""Version negotiation (sans-I/O).

The worker opens with READY listing the versions it speaks; the client picks
the highest version both speak and answers HELLO with it. No common version is
an ``unsupported_version`` error and the client must stop the worker.
"""

from __future__ import annotations

from collections.abc import Iterable

from .codec import SUPPORTED_VERSIONS, ProtocolError
from .messages import HelloMessage, ReadyMessage


def negotiate(ready: ReadyMessage, supported: Iterable[int] = SUPPORTED_VERSIONS) -> HelloMessage:
    """The HELLO answering ``ready``, or :class:`ProtocolError` if none fits."""
    supported = tuple(supported)  # may be a one-shot iterator; used twice
    common = set(ready.protocol_versions) & set(supported)
    if not common:
        raise ProtocolError(
            "unsupported_version",
            f"worker speaks protocol versions {sorted(ready.protocol_versions)}, "
            f"this client speaks {sorted(supported)}",
            ready.id,
        )
    return HelloMessage(version=max(common), parent_id=ready.id)
