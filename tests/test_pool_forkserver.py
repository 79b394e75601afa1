"""The native SessionPool forks its workers from a fork server of its own:
a burst of acquires beyond the ready workers is warm, each session is its
own process (pid, random numbers), the pool stops its fork server when it
stops (also when it failed to start), and workers start as new interpreters,
with the reason, when the fork server cannot be used.

Every test checks by pid that nothing it started is left running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap

import pytest
from session_helpers import assert_no_leftovers, collect, result_text, run, wait_until

from pyrepl3_kernel.session import PoolConfig, Session, SessionPool, WorkerStartError

#: What a session says about itself: pid, parent pid, process group, random numbers.
PROBE = (
    "import os, random, numpy as np\n"
    "(os.getpid(), os.getppid(), os.getpgrp(), random.random(), float(np.random.random()))"
)


@pytest.fixture(autouse=True)
def _isolated_ipython_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


async def _probe(session: Session) -> tuple[int, int, int, float, float]:
    return eval(result_text(await collect(session, PROBE)))  # type: ignore[no-any-return]


def _pids(pool: SessionPool, sessions: list[Session]) -> list[int]:
    server = pool.fork_server
    return [s.pid for s in sessions if s.pid] + ([server.pid] if server and server.pid else [])


def test_a_burst_of_acquires_is_forked_from_the_pools_fork_server():
    """Six sessions at once from a pool with one ready worker: each is a
    fork of the pool's fork server (its parent), in its own process group,
    with its own pid and random numbers (``random`` and numpy's)."""

    async def main() -> list[int]:
        pool = SessionPool(PoolConfig(min_idle=1, max_sessions=8, warmup_code="import numpy"))
        sessions: list[Session] = []
        seen: list[int] = []
        try:
            await pool.start()
            server = pool.fork_server
            assert server is not None and server.state == "ready", pool.fork_server_state
            sessions = list(await asyncio.gather(*(pool.acquire() for _ in range(6))))
            probes = await asyncio.gather(*(_probe(s) for s in sessions))
            pids = [p[0] for p in probes]
            seen += pids
            assert pids == [s.pid for s in sessions]
            assert len(set(pids)) == 6, pids
            assert {p[1] for p in probes} == {server.pid}, "not all forked by the pool's server"
            assert [p[2] for p in probes] == pids, "each in a process group of its own"
            assert len({p[3] for p in probes}) == 6, "random was not reseeded"
            assert len({p[4] for p in probes}) == 6, "numpy's generator was not reseeded"
            state = pool.fork_server_state
            assert state["forked"] >= 6 and state["fallbacks"] == 0, state
            # A session's worker that dies is replaced by a forked one too.
            first = sessions[0]
            old = first.pid
            os.kill(old, signal.SIGKILL)
            await wait_until(
                lambda: first.pid != old and first.is_alive, 30, "the session's new worker"
            )
            assert result_text(await collect(first, "40 + 2")) == "42"
            assert (await _probe(first))[1] == server.pid
        finally:
            leftovers = _pids(pool, sessions) + seen
            await pool.stop()
        assert pool.fork_server is None
        return leftovers

    assert_no_leftovers(run(main()))


def test_the_pool_stops_its_fork_server_even_after_a_failure():
    """A pool whose warm-up fails cannot start: start() raises, having
    stopped its fork server; an error inside ``async with`` stops it too."""

    async def failed_start() -> list[int]:
        pool = SessionPool(PoolConfig(min_idle=1, warmup_code="raise ValueError('no warm-up')"))
        starting = asyncio.ensure_future(pool.start())
        await wait_until(
            lambda: starting.done() or bool(pool.fork_server and pool.fork_server.pid),
            30,
            "the fork server to start",
        )
        server = pool.fork_server
        assert server is not None and server.pid, pool.fork_server_state
        with pytest.raises(WorkerStartError, match="no warm-up"):
            await starting
        assert pool.fork_server is None and server.state == "stopped"
        return [server.pid]

    async def error_in_body() -> list[int]:
        pids: list[int] = []
        with pytest.raises(RuntimeError, match="the caller's own error"):
            async with SessionPool(PoolConfig(min_idle=1)) as pool:
                server = pool.fork_server
                assert server is not None and server.pid
                session = await pool.acquire()
                assert session.pid
                pids = [server.pid, session.pid]
                raise RuntimeError("the caller's own error")
        assert pool.fork_server is None and server.state == "stopped"
        return pids

    assert_no_leftovers(run(failed_start()))
    assert_no_leftovers(run(error_in_body()))


def test_workers_start_cold_when_the_fork_server_keeps_dying():
    """A fork server that dies too often is given up: the pool's sessions
    are new interpreters (children of this process), still answering, and
    the pool says why."""

    async def main() -> list[int]:
        pool = SessionPool(PoolConfig(min_idle=0, max_sessions=4))
        sessions: list[Session] = []
        killed: list[int] = []
        try:
            await pool.start()
            server = pool.fork_server
            assert server is not None
            assert await server.start(), server.reason
            for _ in range(6):  # more deaths than a minute allows (MAX_RESTARTS_IN_WINDOW)
                await wait_until(lambda: server.state in ("ready", "failed"), 30, "a restart")
                if server.state == "failed":
                    break
                assert server.pid is not None
                killed.append(server.pid)
                os.kill(server.pid, signal.SIGKILL)
                await wait_until(lambda: server.state != "ready", 10, "the death to be seen")
            await wait_until(lambda: server.state == "failed", 30, "the server to be given up")
            state = pool.fork_server_state
            assert "died" in (state["reason"] or ""), state
            sessions = list(await asyncio.gather(*(pool.acquire() for _ in range(2))))
            probes = await asyncio.gather(*(_probe(s) for s in sessions))
            assert {p[1] for p in probes} == {os.getpid()}, "not started as new interpreters"
            assert pool.fork_server_state["fallbacks"] >= 2
        finally:
            leftovers = _pids(pool, sessions) + killed
            await pool.stop()
        return leftovers

    assert_no_leftovers(run(main()))


def test_unsafe_warmup_and_sandbox_fall_back_with_the_reason():
    """A warm-up that leaves a thread running cannot be forked from: the
    sessions start cold and the pool names the thread. A sandboxed pool
    never starts a fork server."""
    warmup = textwrap.dedent(
        """
        import threading, time
        threading.Thread(target=time.sleep, args=(300,), name="pool-sleeper", daemon=True).start()
        """
    )

    async def main() -> list[int]:
        pool = SessionPool(PoolConfig(min_idle=0, max_sessions=2, warmup_code=warmup))
        sessions: list[Session] = []
        try:
            await pool.start()
            sessions.append(await pool.acquire())
            state = pool.fork_server_state
            assert state["state"] == "unsafe" and "pool-sleeper" in state["reason"], state
            assert (await _probe(sessions[0]))[1] == os.getpid()
        finally:
            leftovers = _pids(pool, sessions)
            await pool.stop()
        sandboxed = SessionPool(PoolConfig(min_idle=0, sandbox=True))
        await sandboxed.start(wait=False)
        try:
            assert sandboxed.fork_server is None
            assert "sandbox" in sandboxed.fork_server_state["reason"]
        finally:
            await sandboxed.stop()
        off = SessionPool(PoolConfig(min_idle=0, fork_server=False))
        await off.start(wait=False)
        assert off.fork_server is None and "fork_server=False" in off.fork_server_state["reason"]
        await off.stop()
        return leftovers

    assert_no_leftovers(run(main()))


def test_the_fork_server_dying_mid_burst_hands_out_no_worker_twice():
    """The pool's fork server is killed while eight sessions are being
    acquired: every session comes (forked, or cold for the requests the
    dying server did not answer), each its own, and the restarted server
    forks the next ones."""

    async def main() -> list[int]:
        pool = SessionPool(PoolConfig(min_idle=0, max_sessions=10))
        sessions: list[Session] = []
        killed: list[int] = []
        try:
            await pool.start()
            server = pool.fork_server
            assert server is not None and await server.start(), pool.fork_server_state
            assert server.pid is not None
            killed.append(server.pid)
            acquiring = [asyncio.ensure_future(pool.acquire()) for _ in range(8)]
            await asyncio.sleep(0.01)
            os.kill(server.pid, signal.SIGKILL)
            sessions = list(await asyncio.gather(*acquiring))
            probes = await asyncio.gather(*(_probe(s) for s in sessions))
            pids = [p[0] for p in probes]
            assert len(set(pids)) == 8 and pids == [s.pid for s in sessions], pids
            await wait_until(lambda: server.state == "ready", 30, "the server to be restarted")
            assert server.pid not in killed
            sessions.append(await pool.acquire())
            assert (await _probe(sessions[-1]))[1] == server.pid
        finally:
            leftovers = _pids(pool, sessions) + killed
            await pool.stop()
        return leftovers

    assert_no_leftovers(run(main()))


DEATH_WATCH = """
import asyncio, os, sys, time
from pyrepl3_kernel.session import PoolConfig, SessionPool

async def main():
    pool = SessionPool(PoolConfig(min_idle=0, max_sessions=4))
    await pool.start()
    sessions = [await pool.acquire() for _ in range(2)]
    print(pool.fork_server.pid, *[s.pid for s in sessions], flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


def test_a_killed_pool_owner_takes_its_forked_workers_and_fork_server_along(tmp_path):
    """The death watch: a process with a pool is killed outright (SIGKILL,
    no cleanup): its forked workers (not its children) and its fork server
    end with it."""
    import select
    import subprocess
    import sys

    script = tmp_path / "owner.py"
    script.write_text(DEATH_WATCH)
    owner = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    pids: list[int] = []
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 60)
        assert ready, "the pool's owner did not start its sessions within 60 s"
        line = owner.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 3, line
        server, *workers = pids
        for worker in workers:
            with open(f"/proc/{worker}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[1]) == server, "not forked"
    finally:
        owner.kill()
        owner.wait(30)
    assert_no_leftovers(pids, timeout=15)
