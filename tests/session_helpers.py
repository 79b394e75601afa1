"""Helpers shared by the Session, pool and example tests (not a test module).

Tests are plain sync functions that drive their coroutine with :func:`run`,
which bounds every test by a timeout so a regression shows up as a failure
rather than a hung run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import psutil

from pyrepl3_kernel.protocol import ExecuteMessage, Message, MessageType
from pyrepl3_kernel.session import Session

T = TypeVar("T")

#: Upper bound for one test's coroutine; generous for a loaded 2-core machine.
TEST_TIMEOUT = 60.0


def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run ``coro`` in a fresh event loop, failing it after ``timeout`` s."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(
    session: Session,
    code: str,
    *,
    on_message: Callable[[Message], Awaitable[None]] | None = None,
    timeout: float = 30.0,
    **fields: Any,
) -> list[Message]:
    """Execute ``code``; every message of the execution up to its reply.

    ``on_message`` is awaited for each message as it arrives (to answer
    input requests or interrupt). A stream that does not end within
    ``timeout`` fails the test.
    """
    request = ExecuteMessage(code=code, **fields)

    async def consume() -> list[Message]:
        out: list[Message] = []
        async for msg in session.execute(request):
            assert msg.parent_id == request.id, f"foreign message in the stream: {msg}"
            out.append(msg)
            if on_message is not None:
                await on_message(msg)
        return out

    return await asyncio.wait_for(consume(), timeout)


def of_type(msgs: list[Message], kind: MessageType) -> list[Any]:
    return [m for m in msgs if m.type == kind]


def reply_of(msgs: list[Message]) -> Any:
    assert msgs and msgs[-1].type == MessageType.EXECUTE_REPLY, msgs
    return msgs[-1]


def stream_text(msgs: list[Message], stream: str = "stdout") -> str:
    return "".join(
        m.data
        for m in msgs
        if m.type == MessageType.OUTPUT and m.stream == stream  # type: ignore[attr-defined]
    )


def result_text(msgs: list[Message]) -> str:
    results = of_type(msgs, MessageType.RESULT)
    assert len(results) == 1, msgs
    return results[0].data["text/plain"]  # type: ignore[no-any-return]


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` (letting the loop run) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def pid_gone(pid: int) -> bool:
    """The process no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_pid_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_gone(pid):
            return True
        time.sleep(0.02)
    return pid_gone(pid)


def assert_no_leftovers(pids: list[int], timeout: float = 5.0) -> None:
    """Every pid in ``pids`` is gone; kills survivors so a failure leaks nothing."""
    alive = [pid for pid in pids if not wait_pid_gone(pid, timeout)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not alive, f"processes left running: {alive}"
