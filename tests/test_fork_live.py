"""Forking a live kernel (issue 14, point 5): a new kernel whose worker is a
copy-on-write fork of a running kernel's worker, with the whole namespace,
independent afterwards. Native ``Session.fork()`` here; ``%fork`` through
Jupyter and the REST endpoint further down. See docs/fork.md.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from session_helpers import (
    assert_no_leftovers,
    collect,
    of_type,
    reply_of,
    result_text,
    run,
    stream_text,
    wait_until,
)

from pyrepl3_kernel import Session
from pyrepl3_kernel.protocol import MessageType
from pyrepl3_kernel.session.fork import ForkBusyError, ForkedSession


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Automatic checkpoints go to a directory of the test's own."""
    runtime = tmp_path / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    return runtime


async def value(s: Session, expr: str) -> str:
    msgs = await collect(s, expr)
    assert reply_of(msgs).status == "ok", msgs
    return result_text(msgs)


async def ok(s: Session, code: str) -> list[object]:
    msgs = await collect(s, code)
    assert reply_of(msgs).status == "ok", msgs
    return msgs  # type: ignore[return-value]


STATE = """\
import hashlib, os, random, socket, threading, time
import numpy as np
x = 1
squares = (i * i for i in range(10))
first = next(squares)
left, right = socket.socketpair()
digest = hashlib.sha256(b"abc")
held = threading.Lock()
held.acquire()
sleeper = threading.Thread(target=time.sleep, args=(60,), name="sleeper", daemon=True)
sleeper.start()
"""


def test_a_fork_has_the_whole_namespace_and_is_independent_afterwards() -> None:
    async def main() -> list[int]:
        parent = Session(autosave=False)
        pids: list[int] = []
        await parent.start()
        try:
            assert parent.pid is not None
            pids.append(parent.pid)
            await ok(parent, STATE)
            child = await parent.fork()
            assert isinstance(child, ForkedSession)
            assert child.pid is not None
            pids.append(child.pid)
            try:
                assert child.forked_from == parent.id and child.id != parent.id
                # What a checkpoint cannot pickle came along: a generator
                # where it stood, a connected socket pair, hashlib's C state.
                assert await value(child, "next(squares)") == "1"
                assert await value(child, "left.send(b'hi'); right.recv(2)") == "b'hi'"
                assert await value(child, "digest.hexdigest()[:8]") == "'ba7816bf'"
                # Independent afterwards: each has its own generator position
                # and its own variables.
                assert await value(parent, "next(squares)") == "1"
                await ok(child, "x = 2\ny = 'fork only'")
                assert await value(parent, "x") == "1"
                assert await value(parent, "'y' in dir()") == "False"
                await ok(parent, "x = 3")
                assert await value(child, "x") == "2"
                # Its own process, session and process group.
                assert child.pid != parent.pid
                assert await value(child, "os.getpid()") == str(child.pid)
                assert await value(child, "os.getpgrp() == os.getpid() == os.getsid(0)") == "True"
                # Random numbers of its own (random and numpy's global generator).
                draw = "(random.random(), float(np.random.random()))"
                assert await value(child, draw) != await value(parent, draw)
                # Output goes to the fork's supervisor, not the parent's.
                printed = await collect(child, "print('from the fork')")
                assert stream_text(printed) == "from the fork\n"
                # What did not carry over, by name, as a checkpoint reports.
                report = child.fork_report
                assert "thread 'sleeper'" in report["lost"]
                assert "sleeper" in report["lost"] and "held" in report["lost"]
                assert "left" in report["shared"] and "right" in report["shared"]
                assert "squares" not in report["lost"] and "digest" not in report["lost"]
                assert await value(child, "sleeper.is_alive()") == "False"
                assert await value(parent, "sleeper.is_alive()") == "True"
                # The count goes on from the parent's; history is a session of its own.
                assert child.execution_count >= parent.execution_count - 3
                sessions = "get_ipython().history_manager.session_number"
                assert await value(child, sessions) != await value(parent, sessions)
            finally:
                await child.shutdown()
        finally:
            await parent.shutdown()
        return pids

    pids = run(main())
    assert_no_leftovers(pids)


def test_a_kernel_running_a_cell_refuses_to_fork() -> None:
    async def main() -> list[int]:
        parent = Session(autosave=False)
        await parent.start()
        assert parent.pid is not None
        pids = [parent.pid]
        try:
            cell = asyncio.ensure_future(collect(parent, "import time\ntime.sleep(30)"))
            await wait_until(lambda: parent.running is not None, what="the cell to start")
            with pytest.raises(ForkBusyError, match="running a cell"):
                await parent.fork()
            await parent.interrupt()
            msgs = await cell
            assert reply_of(msgs).status == "error"
            # Idle again: the fork is taken.
            child = await parent.fork()
            assert child.pid is not None
            pids.append(child.pid)
            assert await value(child, "1 + 1") == "2"
            await child.shutdown()
        finally:
            await parent.shutdown()
        return pids

    assert_no_leftovers(run(main()))


def test_a_fork_outlives_its_parent_and_keeps_its_own_limits() -> None:
    async def main() -> list[int]:
        parent = Session(autosave=False, memory_limit="400M", max_restarts=0)
        await parent.start()
        assert parent.pid is not None
        pids = [parent.pid]
        await ok(parent, "import numpy as np\nblock = np.ones(20_000_000)")  # 160 MB
        child = await parent.fork()
        assert child.pid is not None
        pids.append(child.pid)
        try:
            assert child.limits.memory_limit == parent.limits.memory_limit
            # The parent's worker dies (killed outright): the fork goes on.
            os.kill(parent.pid, 9)
            await wait_until(lambda: not parent.is_alive, what="the parent's worker to die")
            assert await value(child, "float(block.sum())") == "20000000.0"
            # The fork's memory limit holds: the fork is stopped, named why.
            msgs = await collect(child, "more = np.ones(60_000_000)")  # + 480 MB
            (error,) = of_type(msgs, MessageType.ERROR)
            assert "memory limit" in error.evalue, error.evalue
        finally:
            await child.shutdown()
            await parent.shutdown()
        return pids

    assert_no_leftovers(run(main()))
