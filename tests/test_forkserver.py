"""The fork server: workers forked from a warm process, as their own
processes (pid, process group, cwd, env, random numbers, IPython session),
dying with their supervisor, and a fallback to a new interpreter whenever
the server cannot fork safely.

Every test stops its fork server and workers in ``finally`` and checks by
pid that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from session_helpers import (
    assert_no_leftovers,
    collect,
    pid_gone,
    reply_of,
    result_text,
    run,
    stream_text,
    wait_until,
)

from pyrepl3_kernel.session import WorkerProcess, WorkerStartError
from pyrepl3_kernel.session.forkserver import ForkServer


@pytest.fixture(autouse=True)
def _isolated_ipython_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


async def _started(server: ForkServer, **kwargs) -> WorkerProcess:
    worker = WorkerProcess(spawner=server, **kwargs)
    await worker.start()
    return worker


async def _stop_all(server: ForkServer, workers: list[WorkerProcess]) -> list[int]:
    pids = [w.pid for w in workers if w.pid] + ([server.pid] if server.pid else [])
    await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
    await server.stop()
    return pids


def _forked_by(worker: WorkerProcess, server: ForkServer) -> bool:
    with open(f"/proc/{worker.pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    return ppid == server.pid


def test_forked_workers_are_their_own_processes(tmp_path):
    """pid, process group, cwd, env and IPython's session are each worker's
    own, and they are the launch's (not the server's)."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()

    async def main() -> list[int]:
        server = ForkServer(warmup_code="import json")
        workers: list[WorkerProcess] = []
        try:
            assert await server.start(), server.reason
            for d, tag in ((a_dir, "a"), (b_dir, "b")):
                env = dict(os.environ, KERNEL_TAG=tag)
                workers.append(await _started(server, cwd=str(d), env=env))
            probe = (
                "import os, sys, json as j\n"
                "print(os.getpid(), os.getpgrp(), os.getcwd(), os.environ.get('KERNEL_TAG', '-'),"
                " get_ipython().history_manager.session_number, get_ipython().execution_count,"
                " 'json' in dir())"
            )
            cold = WorkerProcess(cwd=str(a_dir))
            workers.append(cold)
            await cold.start()
            cold_count = stream_text(await collect(cold, probe)).split()[5]
            seen = []
            for w, d, tag in zip(workers[:2], (a_dir, b_dir), ("a", "b"), strict=True):
                assert _forked_by(w, server), "the worker was not forked by the server"
                msgs = await collect(w, probe)
                assert reply_of(msgs).status == "ok", msgs
                pid, pgrp, cwd, got_tag, hist_session, count, has_json = stream_text(msgs).split()
                assert int(pid) == w.pid and int(pgrp) == w.pid
                assert cwd == str(d) and got_tag == tag
                assert count == cold_count  # a fresh shell: no cell ran before
                # the warm-up ran in the shell the server built, as a pool runs it
                assert has_json == "True"
                seen.append(hist_session)
            assert seen[0] != seen[1], "two forked workers share an IPython history session"
            # no environment leaks from one launch into the next
            msgs = await collect(workers[1], "import os; os.environ.get('KERNEL_TAG')")
            assert result_text(msgs) == "'b'"
            return await _stop_all(server, workers)
        except BaseException:
            await _stop_all(server, workers)
            raise

    assert_no_leftovers(run(main()))


def test_a_forked_workers_first_cell_is_its_first():
    """The server runs a cell silently once to prime the shell it forks
    from: a fork's first cell still finds no input, output, ``_`` or
    history before it, and is counted 1."""

    async def main() -> list[int]:
        server = ForkServer()
        workers: list[WorkerProcess] = []
        try:
            assert await server.start(), server.reason
            workers = [await _started(server)]
            code = (
                "ip = get_ipython()\n"
                "print(len(In), Out, repr(_), len(list(ip.history_manager.get_range(raw=True))))"
            )
            msgs = await collect(workers[0], code)
            assert reply_of(msgs).status == "ok", msgs
            assert reply_of(msgs).execution_count == 1
            assert stream_text(msgs).split() == ["2", "{}", "''", "1"], stream_text(msgs)
            return await _stop_all(server, workers)
        except BaseException:
            await _stop_all(server, workers)
            raise

    assert_no_leftovers(run(main()))


def test_workers_forked_at_once_each_save_history_in_a_session_of_their_own(tmp_path):
    """A burst of forks: the server makes their history sessions in one go
    (so they do not queue for the database one by one); each worker's
    session is its own and its inputs are saved under it."""
    import sqlite3

    async def main() -> list[int]:
        server = ForkServer()
        workers: list[WorkerProcess] = []
        try:
            assert await server.start(), server.reason
            workers = list(await asyncio.gather(*(_started(server) for _ in range(6))))
            sessions = []
            for i, w in enumerate(workers):
                code = f"tag_{i} = {i}\nprint(get_ipython().history_manager.session_number)"
                msgs = await collect(w, code)
                assert reply_of(msgs).status == "ok", msgs
                sessions.append(int(stream_text(msgs)))
            assert len(set(sessions)) == len(workers), sessions
            pids = await _stop_all(server, workers)  # a worker writes its history as it ends
            db = tmp_path / "ipython" / "profile_default" / "history.sqlite"
            with contextlib.closing(sqlite3.connect(db)) as conn:
                rows = conn.execute("SELECT session, source FROM history").fetchall()
                known = {r[0] for r in conn.execute("SELECT session FROM sessions")}
            saved = {session: source for session, source in rows}
            for i, session in enumerate(sessions):
                assert session in known
                assert saved.get(session, "").startswith(f"tag_{i} = {i}"), (session, rows)
            return pids
        except BaseException:
            await _stop_all(server, workers)
            raise

    assert_no_leftovers(run(main()))


def test_random_numbers_differ_between_forked_workers():
    pytest.importorskip("numpy")

    async def main() -> list[int]:
        server = ForkServer(warmup_code="import numpy, random")
        workers: list[WorkerProcess] = []
        try:
            assert await server.start(), server.reason
            workers = [await _started(server) for _ in range(2)]
            code = (
                "import random, numpy\n"
                "print(random.random(), numpy.random.random(), numpy.random.randint(1 << 30))"
            )
            outs = [stream_text(await collect(w, code)).split() for w in workers]
            for i in range(3):
                assert outs[0][i] != outs[1][i], outs
            return await _stop_all(server, workers)
        except BaseException:
            await _stop_all(server, workers)
            raise

    assert_no_leftovers(run(main()))


def test_forked_worker_dies_with_its_supervisor():
    """The worker is the fork server's child, not its supervisor's, so
    PR_SET_PDEATHSIG cannot watch the supervisor: the protocol socket does.
    A supervisor process holding the only other end is killed with SIGKILL;
    the worker (and the process its cell started) end, the server lives on."""

    async def main() -> list[int]:
        server = ForkServer()
        workers: list[WorkerProcess] = []
        holder = None
        try:
            assert await server.start(), server.reason
            worker = await _started(server)
            workers.append(worker)
            msgs = await collect(
                worker,
                "import subprocess, sys\n"
                "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                "print(p.pid)",
            )
            grandchild = int(stream_text(msgs))
            # Hand our end of the protocol socket to another process, then
            # close ours: that process is now the worker's only supervisor.
            sock = worker._control.get_extra_info("socket")
            fd = os.dup(sock.fileno())
            holder = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(300)"], pass_fds=(fd,)
            )
            os.close(fd)
            worker._generation += 1  # what the worker does now is not news to us
            worker._control.close()
            await asyncio.sleep(0.2)
            assert not pid_gone(worker.pid), "the worker ended while its supervisor lived"
            holder.kill()
            holder.wait()
            await wait_until(lambda: pid_gone(worker.pid), 10, "the worker to end")
            await wait_until(lambda: pid_gone(grandchild), 10, "its cell's process to end")
            assert server.state == "ready" and not pid_gone(server.pid)
            return await _stop_all(server, workers) + [grandchild]
        except BaseException:
            if holder is not None:
                holder.kill()
            await _stop_all(server, workers)
            raise

    assert_no_leftovers(run(main()))


def test_a_dead_fork_server_is_replaced_and_its_workers_live_on():
    async def main() -> list[int]:
        server = ForkServer()
        workers: list[WorkerProcess] = []
        try:
            assert await server.start(), server.reason
            workers.append(await _started(server))
            first_server = server.pid
            os.kill(first_server, signal.SIGKILL)
            await wait_until(lambda: server.restarts == 1, 10, "the server to be restarted")
            assert await server.start(), server.reason
            assert server.pid != first_server and server.state == "ready"
            workers.append(await _started(server))
            assert _forked_by(workers[1], server)
            # the worker forked by the dead server still answers
            assert result_text(await collect(workers[0], "1+1")) == "2"
            assert result_text(await collect(workers[1], "1+1")) == "2"
            return await _stop_all(server, workers) + [first_server]
        except BaseException:
            await _stop_all(server, workers)
            raise

    assert_no_leftovers(run(main()))


def test_server_dying_mid_burst_falls_back_and_hands_out_no_worker_twice():
    async def main() -> list[int]:
        server = ForkServer()
        workers: list[WorkerProcess] = []
        try:
            assert await server.start(), server.reason
            first_server = server.pid
            starts = [asyncio.ensure_future(_started(server)) for _ in range(12)]
            await asyncio.sleep(0.01)
            os.kill(first_server, signal.SIGKILL)
            workers = list(await asyncio.gather(*starts))
            pids = [w.pid for w in workers]
            assert len(set(pids)) == len(pids), pids
            outs = [stream_text(await collect(w, "import os; print(os.getpid())")) for w in workers]
            assert [int(o) for o in outs] == pids, "a worker answered for another"
            await wait_until(lambda: server.state == "ready", 30, "the server to be restarted")
            return await _stop_all(server, workers) + [first_server]
        except BaseException:
            await _stop_all(server, workers)
            raise

    assert_no_leftovers(run(main()))


def test_warmup_that_starts_a_thread_falls_back_to_new_interpreters():
    warmup = textwrap.dedent(
        """
        import threading, time
        threading.Thread(target=time.sleep, args=(300,), name="warmup-sleeper", daemon=True).start()
        """
    )

    async def main() -> list[int]:
        server = ForkServer(warmup_code=warmup)
        workers: list[WorkerProcess] = []
        try:
            assert not await server.start()
            assert server.state == "unsafe"
            assert "warmup-sleeper" in (server.reason or ""), server.reason
            assert server.pid is not None and pid_gone(server.pid)
            worker = await _started(server)
            workers.append(worker)
            assert not _forked_by(worker, server)
            assert server.fallbacks == 1 and server.forked == 0
            assert result_text(await collect(worker, "1+1")) == "2"
            return await _stop_all(server, workers)
        except BaseException:
            await _stop_all(server, workers)
            raise

    assert_no_leftovers(run(main()))


def test_launch_into_a_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "gone"

    async def main() -> list[int]:
        server = ForkServer()
        try:
            assert await server.start(), server.reason
            with pytest.raises(WorkerStartError, match="gone"):
                await _started(server, cwd=str(missing))
            # the server is unharmed
            worker = await _started(server)
            assert result_text(await collect(worker, "1+1")) == "2"
            return await _stop_all(server, [worker])
        except BaseException:
            await server.stop()
            raise

    assert_no_leftovers(run(main()))
