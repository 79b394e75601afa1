"""Channel sets bound in advance: a process that hosts kernels (the manager
daemon) keeps a few kernels' worth of sockets bound, so that a new kernel
takes ready sockets instead of binding five at its start.

Only kernels without Curve keys, whose ports are left to the kernel, take
them (CurveZMQ options must be set before a socket is bound; a launcher that
chose its ports gets those); the others bind at their start as before. The
ports a kernel reports are the ones its taken sockets are bound on. A set is
refilled on the event loop once the leases of a burst are served
(:data:`REFILL_DELAY` after the last take), one set per turn of the loop;
:func:`close` closes the sets nobody took (with the daemon's pools).
"""

from __future__ import annotations

import asyncio
import logging

from . import channels

log = logging.getLogger(__name__)

#: Sets the daemon keeps ready, at least (more when a pool is larger).
DEFAULT_SETS = 4
#: Seconds after the last take before refilling starts.
REFILL_DELAY = 0.05


class ReadyChannels:
    """Up to ``size`` bound sets for kernels on ``transport://ip``."""

    def __init__(self, size: int, transport: str = "tcp", ip: str = "127.0.0.1") -> None:
        self.size = size
        self.transport = transport
        self.ip = ip
        self.closed = False
        self._sets: list[channels.BoundSockets] = []
        self._refill: asyncio.Handle | None = None

    def __len__(self) -> int:
        return len(self._sets)

    def take(self, transport: str, ip: str) -> channels.BoundSockets | None:
        """A bound set for a kernel on ``transport://ip``, or None (none
        ready, or another address); the set is replaced later."""
        if self.closed or (transport, ip) != (self.transport, self.ip):
            return None
        ready = self._sets.pop(0) if self._sets else None
        self.fill(REFILL_DELAY)
        return ready

    def fill(self, delay: float = 0.0) -> None:
        """Bind sets up to ``size`` on the running event loop, starting
        after ``delay`` seconds (nothing without a running loop)."""
        if self.closed or len(self._sets) >= self.size:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._refill is not None:
            self._refill.cancel()
        self._refill = (
            loop.call_later(delay, self._bind_one) if delay > 0 else loop.call_soon(self._bind_one)
        )

    def _bind_one(self) -> None:
        self._refill = None
        if self.closed or len(self._sets) >= self.size:
            return
        try:
            self._sets.append(channels.bind_sockets(self.transport, self.ip, {}, None))
        except Exception as exc:
            log.warning("could not bind a kernel's sockets in advance: %s", exc)
            return
        self.fill()

    def close(self) -> None:
        """Close the sets nobody took; take nothing from now on."""
        self.closed = True
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        sets, self._sets = self._sets, []
        for ready in sets:
            ready.close()


_ready: ReadyChannels | None = None


def keep_ready(size: int = DEFAULT_SETS) -> ReadyChannels:
    """From now on, keep at least ``size`` sets ready in this process
    (filled on the running event loop)."""
    global _ready
    if _ready is None or _ready.closed:
        _ready = ReadyChannels(size)
    _ready.size = max(_ready.size, size)
    _ready.fill()
    return _ready


def take(transport: str, ip: str) -> channels.BoundSockets | None:
    """A ready set for a kernel on ``transport://ip``, if this process keeps
    them and has one."""
    return _ready.take(transport, ip) if _ready is not None else None


def close() -> None:
    """Close this process's unused sets and stop keeping them."""
    global _ready
    if _ready is not None:
        _ready.close()
        _ready = None
