"""Behaviour of :class:`SessionPool` with real workers.

Each test builds its pool with a ``session_factory`` that records every
session the pool creates, stops the pool in ``finally`` and then checks by pid
that no worker process is left.
"""

from __future__ import annotations

import os
import signal

import pytest
from session_helpers import assert_no_leftovers, collect, reply_of, result_text, run, wait_until

from pyrepl3_kernel.session import (
    PoolConfig,
    PoolExhausted,
    SessionPool,
    WarmupError,
    WorkerProcess,
    WorkerStartError,
)


@pytest.fixture(autouse=True)
def _isolated_ipython_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


class Recorder:
    """A session factory that remembers what it made."""

    def __init__(self) -> None:
        self.sessions: list[WorkerProcess] = []

    def __call__(self) -> WorkerProcess:
        session = WorkerProcess()
        self.sessions.append(session)
        return session

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.sessions if s.pid is not None]


def make_pool(**config) -> tuple[SessionPool, Recorder]:
    recorder = Recorder()
    return SessionPool(PoolConfig(session_factory=recorder, **config)), recorder


def test_warm_sessions_ran_the_warmup_code():
    pool, made = make_pool(min_idle=2, max_sessions=4, warmup_code="import numpy as np")

    async def body():
        try:
            await pool.start()
            assert pool.stats["idle"] == 2
            first = await pool.acquire()
            second = await pool.acquire()
            assert first is not second and first.pid != second.pid
            for session in (first, second):
                msgs = await collect(session, "np.__name__")
                assert result_text(msgs) == "'numpy'"
                # the warm-up ran silently: the user's first cell is number 1
                assert reply_of(msgs).execution_count == 1
        finally:
            await pool.stop()

    run(body())
    assert_no_leftovers(made.pids)


def test_release_discards_the_session_and_the_pool_refills():
    pool, made = make_pool(min_idle=1, max_sessions=3)

    async def body():
        try:
            await pool.start()
            session = await pool.acquire()
            old_pid = session.pid
            await collect(session, "secret = 'mine'")
            await pool.release(session)
            assert not session.is_alive
            assert_no_leftovers([old_pid])
            with pytest.raises(ValueError):
                await pool.release(session)

            await wait_until(lambda: pool.stats["idle"] == 1, what="the pool to refill")
            again = await pool.acquire()
            assert again is not session and again.pid != old_pid
            msgs = await collect(again, "'secret' in dir()")
            assert result_text(msgs) == "False"
            await pool.release(again)
            await wait_until(lambda: pool.stats["idle"] == 1, what="the pool to refill")
        finally:
            await pool.stop()

    run(body())
    assert_no_leftovers(made.pids)


def test_max_sessions_is_enforced():
    pool, made = make_pool(min_idle=1, max_sessions=1)

    async def body():
        try:
            await pool.start()
            session = await pool.acquire()
            with pytest.raises(PoolExhausted, match="max_sessions=1") as info:
                await pool.acquire(timeout=0.5)
            assert "1 of max_sessions=1 are in use" in str(info.value)
            assert len(made.sessions) == 1
            await pool.release(session)
            other = await pool.acquire(timeout=30)
            assert other is not session and other.is_alive
        finally:
            await pool.stop()

    run(body())
    assert_no_leftovers(made.pids)


def test_dead_idle_session_is_replaced():
    pool, made = make_pool(min_idle=1, max_sessions=2)

    async def body():
        try:
            await pool.start()
            (victim,) = made.sessions
            os.kill(victim.pid, signal.SIGKILL)
            await wait_until(lambda: not victim.is_alive, what="the death to be noticed")
            session = await pool.acquire()
            assert session is not victim and session.is_alive
            assert result_text(await collect(session, "1 + 1")) == "2"
            await wait_until(lambda: pool.stats["idle"] == 1, what="the pool to refill")
        finally:
            await pool.stop()

    run(body())
    assert_no_leftovers(made.pids)


def test_failing_warmup_fails_start():
    pool, made = make_pool(min_idle=1, max_sessions=2, warmup_code="raise RuntimeError('boom')")

    async def body():
        try:
            with pytest.raises(WorkerStartError, match="boom"):
                await pool.start()
            assert isinstance(pool.last_error, WarmupError)
            assert pool.stats["idle"] == 0
        finally:
            await pool.stop()

    run(body())
    assert made.sessions
    assert_no_leftovers(made.pids)


def test_worker_that_cannot_start_fails_start():
    pool = SessionPool(PoolConfig(min_idle=1, python="/nonexistent/python"))

    async def body():
        try:
            with pytest.raises(WorkerStartError, match="could not start the worker"):
                await pool.start()
        finally:
            await pool.stop()

    run(body())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_idle": -1}, "min_idle must be >= 0"),
        ({"max_sessions": 0}, "max_sessions must be >= 1"),
        ({"min_idle": 3, "max_sessions": 2}, r"min_idle \(3\) exceeds max_sessions \(2\)"),
        ({"max_concurrent_starts": 0}, "max_concurrent_starts must be >= 1"),
    ],
)
def test_pool_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoolConfig(**kwargs)


def test_stop_leaves_no_workers():
    pool, made = make_pool(min_idle=2, max_sessions=4)

    async def body():
        try:
            await pool.start()
            leased = await pool.acquire()
            assert leased.is_alive
        finally:
            await pool.stop()
        assert all(not s.is_alive for s in made.sessions)
        with pytest.raises(RuntimeError, match="not started"):
            await pool.acquire()

    run(body())
    assert len(made.pids) >= 2
    assert_no_leftovers(made.pids)
