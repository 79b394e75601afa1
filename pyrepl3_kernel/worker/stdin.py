"""``input()`` and ``getpass()`` in the worker: an INPUT request to the
frontend, with the request of the shell that asks (the main shell's or a
subshell's) as parent, and a wait for the INPUT_RESPONSE that the I/O thread
hands over by id (:attr:`Worker._inputs`)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..protocol import InputMessage

if TYPE_CHECKING:
    from .main import Worker


class InputSlot:
    """Where the answer to one input request lands (or its interrupt)."""

    __slots__ = ("event", "value", "interrupted")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value = ""
        self.interrupted = False


def request_input(
    worker: Worker,
    prompt: str,
    password: bool,
    parent: str | None,
    allow_stdin: bool,
    track: Callable[[InputSlot | None], None] | None = None,
) -> str:
    """Ask the frontend for a line on behalf of the request ``parent`` and
    wait for it. ``allow_stdin`` is the request's; without it (or without a
    request), StdinNotImplementedError as ipykernel. ``track`` is told the
    slot while the request waits (then None), for a caller that ends the wait
    on an interrupt (``interrupted``: KeyboardInterrupt). The answer ``^D``
    is EOFError."""
    if not allow_stdin or parent is None:
        from IPython.core.error import StdinNotImplementedError

        raise StdinNotImplementedError(
            "raw_input was called, but this frontend does not support input requests."
        )
    sys.stdout.flush()
    sys.stderr.flush()
    request = InputMessage(prompt=prompt, password=password, parent_id=parent)
    slot = InputSlot()
    worker._inputs[request.id] = slot  # answered by id
    if track is not None:
        track(slot)
    try:
        worker.emit(request)
        slot.event.wait()
    finally:
        if track is not None:
            track(None)
        worker._inputs.pop(request.id, None)
    if slot.interrupted:
        raise KeyboardInterrupt
    if slot.value == "\x04":
        raise EOFError("EOF when reading a line")
    return slot.value
