"""A worker's stdout and stderr pipes, made into OUTPUT messages.

What the worker's process writes outside the protocol (C extensions,
subprocesses, ``os.write(1, ...)``) arrives on its pipes in pieces. Each
piece is decoded (UTF-8, a character split between pieces kept for the
next), attributed to the request that owns the output at that moment, and
batched: a completed line goes out at once unless output is streaming fast,
a partial line waits briefly for its end.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Callable

from ..protocol import OutputMessage

#: Stream output arriving within this many seconds of the previous send is
#: batched into one OUTPUT message; a line completed after a pause is not held.
OUTPUT_COALESCE_S = 0.002
#: How long the start of a line waits for its end before it is sent anyway.
#: The worker's print() writes a line in one piece; this is for code that
#: writes a line in parts (``write(text)``, then ``write('\n')``), which a
#: loaded machine can deschedule in between for a few milliseconds. Output
#: that never ends a line (a progress counter) waits this long; ipykernel
#: holds all output for up to 200 ms.
PARTIAL_LINE_WAIT_S = 0.01


class PipeOutput:
    """Pending pipe output of one worker; ``send`` takes each OUTPUT message
    when it is due (:meth:`flush` sends what is pending now)."""

    def __init__(self, send: Callable[[OutputMessage], None]) -> None:
        self._send = send
        self._decoders: dict[int, codecs.IncrementalDecoder] = {}
        self._pending: list[tuple[int, str, str | None]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_flush = 0.0

    def __bool__(self) -> bool:
        """Whether output is waiting to be sent."""
        return bool(self._pending)

    def feed(self, fd: int, data: bytes, parent: str | None) -> None:
        """``data`` read from the pipe ``fd`` (1 or 2), owned by ``parent``."""
        decoder = self._decoders.get(fd)
        if decoder is None:
            decoder = self._decoders[fd] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(data)
        if not text:
            return
        self._pending.append((fd, text, parent))
        # A completed line goes out at once, unless output is streaming fast
        # (then it joins the batch due OUTPUT_COALESCE_S after the last send).
        # A partial line waits PARTIAL_LINE_WAIT_S for the rest of the line.
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = self._last_flush + OUTPUT_COALESCE_S
        if text.endswith("\n"):
            if now >= due:
                self.flush()
                return
            when = due
        else:
            when = max(due, now + PARTIAL_LINE_WAIT_S)
        handle = self._flush_handle
        if handle is None or handle.when() > when:
            # A line ended: what waited for its end goes with the batch.
            if handle is not None:
                handle.cancel()
            self._flush_handle = loop.call_at(when, self.flush)

    def flush(self) -> None:
        """Send pending output; called before any worker message is routed,
        so output always precedes what the worker sent after it."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._last_flush = asyncio.get_running_loop().time()
        pending, self._pending = self._pending, []
        i = 0
        while i < len(pending):
            fd, text, parent = pending[i]
            j = i + 1
            while j < len(pending) and pending[j][0] == fd and pending[j][2] == parent:
                j += 1
            if j > i + 1:
                text = "".join(chunk for _, chunk, _ in pending[i:j])
            self._send(
                OutputMessage(stream="stdout" if fd == 1 else "stderr", data=text, parent_id=parent)
            )
            i = j

    def clear(self) -> None:
        """Forget everything (a new worker starts)."""
        self._decoders.clear()
        self._pending = []
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
