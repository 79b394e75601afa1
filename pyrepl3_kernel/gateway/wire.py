"""Jupyter messages to and from ZMQ frames: JSON, HMAC signing, replay check.

The wire format of Jupyter messaging (``[identities..., b"<IDS|MSG>",
signature, header, parent_header, metadata, content, buffers...]``), as
``jupyter_client.Session`` writes and reads it, without what a kernel's hot
path does not need: a received header keeps its date as the string it came
with (echoed verbatim as the parent of every reply and output), and the
parent header of a request is encoded once for all the messages it causes.
A kernel sends five to seven messages per cell; this halves the gateway's
cost of each.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import uuid
from datetime import datetime, timezone
from typing import Any

from jupyter_client.session import json_packer

from ..errors import Pyrepl3Error

JupyterMsg = dict[str, Any]

DELIMITER = b"<IDS|MSG>"
#: The version of Jupyter messaging in the headers this kernel sends.
PROTOCOL_VERSION = "5.4"
#: How many signatures of received messages are remembered to refuse a
#: replayed one (as jupyter_client's ``Session.digest_history_size``).
DIGEST_HISTORY_SIZE = 2**16
#: Encoded parent headers kept (one per request that is still answered).
PARENT_CACHE_SIZE = 64


class WireError(Pyrepl3Error, ValueError):
    """A received message that is malformed, unsigned, wrongly signed or
    replayed."""


def _loads(frame: bytes) -> Any:
    return json.loads(frame)


def _header_of(parent: JupyterMsg | None) -> Any:
    """The header of ``parent`` (a message or a header), as jupyter_client's
    ``extract_header``."""
    if not parent:
        return {}
    if "header" in parent:
        return parent["header"]
    return parent if "msg_id" in parent else {}


class Wire:
    """Encode and decode the messages of one kernel, signed with ``key``
    under ``signature_scheme`` (``hmac-sha256`` and the like; no key: no
    signatures, as jupyter_client)."""

    def __init__(
        self, key: bytes, signature_scheme: str = "hmac-sha256", username: str = "kernel"
    ) -> None:
        self.key = key
        self.username = username
        self.session = str(uuid.uuid4())
        scheme, _, digest = signature_scheme.partition("-")
        if scheme != "hmac" or not digest:
            raise ValueError(f"unsupported signature scheme {signature_scheme!r}")
        try:
            digestmod = getattr(hashlib, digest)
        except AttributeError:
            raise ValueError(f"unsupported signature scheme {signature_scheme!r}") from None
        self._auth = hmac.HMAC(key, digestmod=digestmod) if key else None
        self._id_prefix = f"{self.session}_{os.getpid()}_"
        self._count = 0
        self._digests: set[bytes] = set()
        self._parents: dict[int, tuple[Any, bytes]] = {}

    # -- sending --------------------------------------------------------------

    def new_message(
        self,
        msg_type: str,
        content: dict[str, Any],
        parent: JupyterMsg | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> JupyterMsg:
        """A message as ``jupyter_client.Session.msg`` makes it."""
        msg_id = f"{self._id_prefix}{self._count}"
        self._count += 1
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session,
            "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "version": PROTOCOL_VERSION,
        }
        return {
            "header": header,
            "msg_id": msg_id,
            "msg_type": msg_type,
            "parent_header": _header_of(parent),
            "content": content,
            "metadata": metadata if metadata is not None else {},
        }

    def frames(self, msg: JupyterMsg, ident: bytes | list[bytes] | None = None) -> list[bytes]:
        """The signed frames of ``msg`` (without its buffers), behind ``ident``."""
        header = json.dumps(msg["header"], ensure_ascii=False).encode("utf8", "surrogateescape")
        parent = self._parent_frame(msg["parent_header"])
        metadata = json_packer(msg["metadata"]) if msg["metadata"] else b"{}"
        content = json_packer(msg["content"])
        signature = b""
        if self._auth is not None:
            auth = self._auth.copy()
            for part in (header, parent, metadata, content):
                auth.update(part)
            signature = auth.hexdigest().encode()
        out: list[bytes] = []
        if ident is not None:
            out.extend(ident if isinstance(ident, list) else [ident])
        out += [DELIMITER, signature, header, parent, metadata, content]
        return out

    def _parent_frame(self, parent_header: Any) -> bytes:
        if not parent_header:
            return b"{}"
        cached = self._parents.get(id(parent_header))
        if cached is not None and cached[0] is parent_header:
            return cached[1]
        encoded = json_packer(parent_header)
        if len(self._parents) >= PARENT_CACHE_SIZE:
            self._parents.pop(next(iter(self._parents)))
        # The header object itself is kept with its bytes: its id cannot be
        # reused while it is cached. Headers are never changed once received.
        self._parents[id(parent_header)] = (parent_header, encoded)
        return encoded

    # -- receiving ------------------------------------------------------------

    def parse(self, frames: list[bytes]) -> tuple[list[bytes], JupyterMsg]:
        """(routing identities, the message) of received frames; raises
        :class:`WireError` if they are not a valid, signed, new message."""
        try:
            split = frames.index(DELIMITER)
        except ValueError:
            raise WireError("no <IDS|MSG> delimiter") from None
        idents, rest = frames[:split], frames[split + 1 :]
        if len(rest) < 5:
            raise WireError(f"a message has at least 5 frames after the delimiter, not {len(rest)}")
        signature, header, parent, metadata, content = (bytes(f) for f in rest[:5])
        if self._auth is not None:
            if not signature:
                raise WireError("unsigned message")
            if signature in self._digests:
                raise WireError(f"duplicate signature {signature!r}")
            auth = self._auth.copy()
            for part in (header, parent, metadata, content):
                auth.update(part)
            if not hmac.compare_digest(signature, auth.hexdigest().encode()):
                raise WireError("invalid signature")
            self._remember(signature)
        try:
            h = _loads(header)
            msg = {
                "header": h,
                "msg_id": h["msg_id"],
                "msg_type": h["msg_type"],
                "parent_header": _loads(parent),
                "metadata": _loads(metadata),
                "content": _loads(content),
                "buffers": [memoryview(b) for b in rest[5:]],
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise WireError(f"malformed message: {exc}") from None
        if not isinstance(h, dict) or not isinstance(msg["content"], dict):
            raise WireError("malformed message: header and content must be objects")
        return idents, msg

    def _remember(self, signature: bytes) -> None:
        self._digests.add(signature)
        if len(self._digests) > DIGEST_HISTORY_SIZE:
            # As jupyter_client: forget a random tenth.
            self._digests.difference_update(
                random.sample(tuple(self._digests), len(self._digests) // 10)
            )
