"""The native API survives what kills a worker, as a Jupyter kernel does
(issue 12): ``Session`` and the sessions of ``SessionPool`` name the cause of
a death on the running cell, restore the state of the last successful cell
into a new worker, and go on; limits, interrupt escalation and the restart
budget hold; no worker process is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
from session_helpers import collect, of_type, reply_of, result_text, run

from pyrepl3_kernel import PoolConfig, Session, SessionPool
from pyrepl3_kernel.protocol import ExecuteMessage, MessageType
from pyrepl3_kernel.session.timetravel import TimeTravelError

#: cause -> (the cell's crashing code, words the error must contain)
CRASHES: dict[str, tuple[str, str]] = {
    "os._exit": ("import os\nos._exit(3)", "exit code 3"),
    "sigsegv": ("import ctypes\nctypes.string_at(0)", "SIGSEGV"),
    "sigkill": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
}


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The automatic checkpoints go to a directory of the test's own."""
    runtime = tmp_path / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    return runtime


async def define_state(s: Session) -> None:
    assert reply_of(await collect(s, "x = 41")).status == "ok"
    assert reply_of(await collect(s, "def f():\n    return x + 1")).status == "ok"


async def crash(s: Session, code: str, *, timeout: float = 30) -> list[Any]:
    msgs = await collect(s, code, timeout=timeout)
    reply = reply_of(msgs)
    assert reply.status == "error" and reply.ename == "WorkerDied", reply
    return msgs


def death_of(msgs: list[Any]) -> tuple[str, str]:
    """(the error's evalue, the note on what came back)."""
    (error,) = of_type(msgs, MessageType.ERROR)
    assert error.ename == "WorkerDied"
    notes = "".join(m.data for m in of_type(msgs, MessageType.OUTPUT) if m.stream == "stderr")
    return error.evalue, notes


async def autosaved(s: Session, cell: int) -> None:
    """Wait until the automatic checkpoint holds the state after ``cell``
    (it is written in the background after the cell's reply)."""
    assert s.autosave_dir is not None
    manifest = Path(s.autosave_dir) / "auto.json"
    for _ in range(600):
        try:
            if json.loads(manifest.read_text()).get("execution_count", 0) > cell:
                return
        except (OSError, ValueError):
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"no automatic checkpoint of cell {cell}")


async def assert_restored(s: Session) -> None:
    assert result_text(await collect(s, "f()")) == "42"


def gone(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("cause", list(CRASHES))
def test_session_survives_a_crash(cause: str) -> None:
    code, words = CRASHES[cause]

    async def body() -> None:
        async with Session() as s:
            await define_state(s)
            first = s.pid
            evalue, note = death_of(await crash(s, code))
            assert words in evalue and "while running this cell" in evalue, evalue
            assert "restored 2 variables as of cell 2: f, x" in note, note
            assert s.pid != first and gone(first)
            await assert_restored(s)
            assert s.restarts == 1 and words in (s.last_crash or "")
            last = s.pid
        assert gone(last)

    run(body())


def test_the_count_goes_on_and_queued_cells_are_aborted() -> None:
    async def body() -> None:
        async with Session() as s:
            await define_state(s)
            crashing = ExecuteMessage(code="import os, time\ntime.sleep(0.2)\nos._exit(1)")
            queued = ExecuteMessage(code="print('never')")

            async def drain(msg: ExecuteMessage) -> list[Any]:
                return [m async for m in s.execute(msg)]

            first, second = await asyncio.gather(drain(crashing), drain(queued))
            assert reply_of(first).ename == "WorkerDied"
            assert reply_of(second).status == "aborted"
            msgs = await collect(s, "f()")
            assert reply_of(msgs).execution_count == 4  # after cells 1, 2 and the crashed 3
            assert result_text(msgs) == "42"

    run(body())


def test_crash_while_idle_is_told_through_on_unrouted() -> None:
    async def body() -> None:
        told: list[Any] = []
        async with Session(on_unrouted=told.append) as s:
            await define_state(s)
            await autosaved(s, 2)
            pid = s.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):
                text = "".join(getattr(m, "data", "") for m in told)
                if "restored" in text:
                    break
                await asyncio.sleep(0.05)
            assert "died (killed by signal SIGKILL" in text and "while idle" in text, text
            assert "restored 2 variables" in text, text
            await assert_restored(s)

    run(body())


def test_memory_limit() -> None:
    async def body() -> None:
        async with Session(memory_limit="300M", cell_timeout=60) as s:
            await define_state(s)
            grow = "chunks = []\nwhile True:\n    chunks.append(b'x' * (64 << 20))"
            evalue, note = death_of(await crash(s, grow))
            assert "memory limit 300.0 MiB exceeded" in evalue, evalue
            assert "restored" in note
            await assert_restored(s)

    run(body())


def test_wall_time_limit() -> None:
    async def body() -> None:
        async with Session(cell_timeout=2) as s:
            await define_state(s)
            evalue, _ = death_of(await crash(s, "import time\ntime.sleep(60)"))
            assert "wall-time limit of 2 s" in evalue, evalue
            await assert_restored(s)

    run(body())


def test_cpu_time_limit() -> None:
    # No wall-time limit here: on a loaded machine a busy loop gets less CPU
    # time than wall time, and the wall limit would be met first.
    async def body() -> None:
        async with Session(cell_cpu_limit=1) as s:
            await define_state(s)
            evalue, _ = death_of(await crash(s, "while True:\n    pass"))
            assert "CPU-time limit of 1 s" in evalue, evalue
            await assert_restored(s)

    run(body())


def test_an_interrupt_that_cannot_land_is_escalated() -> None:
    async def body() -> None:
        async with Session(interrupt_grace=1) as s:
            await define_state(s)
            blocked = (
                "import signal, time\n"
                "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
                "print('blocked', flush=True)\n"
                "time.sleep(60)"
            )

            async def interrupt_when_blocked(msg: Any) -> None:
                if msg.type == MessageType.OUTPUT and "blocked" in msg.data:
                    assert await s.interrupt()

            msgs = await collect(s, blocked, on_message=interrupt_when_blocked)
            evalue, _ = death_of(msgs)
            assert "the interrupt did not land within 1 s" in evalue, evalue
            await assert_restored(s)

    run(body())


#: Its saves (``__reduce__`` runs in the saving child) last while ``flag`` exists.
BLOCKED_SAVE = (
    "class Blocked:\n"
    "    def __reduce__(self):\n"
    "        import os, time\n"
    "        deadline = time.monotonic() + 30\n"
    "        while os.path.exists({flag!r}) and time.monotonic() < deadline:\n"
    "            time.sleep(0.01)\n"
    "        return (Blocked, ())\n"
)


def test_a_cell_never_waits_for_a_save_and_a_burst_is_coalesced(tmp_path: Path) -> None:
    """While every save slot is busy (three saves blocked), the next cells
    run at once (they waited for a slot, and a 5 s wall-time limit killed
    them before they ran); the states of the cells in between are coalesced
    into one save, which the history records; a checkout of one of them is
    refused, naming the kept states; the newest state is what a crash brings
    back."""
    flag = tmp_path / "saves-blocked"
    flag.touch()

    async def body() -> None:
        async with Session(cell_timeout=5, autosave=str(tmp_path / "auto")) as s:
            # Three saves, each blocked: every slot is busy.
            first = await collect(s, BLOCKED_SAVE.format(flag=str(flag)) + "b = Blocked()\nn = 0")
            assert reply_of(first).status == "ok"
            for i in (1, 2):
                assert reply_of(await collect(s, f"b = Blocked()\nn = {i}")).status == "ok"
            # The saving children are still there, blocked: this cell ran beside them.
            busy = await collect(s, "import psutil\nlen(psutil.Process().children())")
            assert int(result_text(busy)) >= 3, busy
            burst = await asyncio.gather(*(collect(s, "n = n + 1") for _ in range(8)))
            counts = [reply_of(m).execution_count for m in burst]
            assert all(reply_of(m).status == "ok" for m in burst), burst
            assert result_text(await collect(s, "n")) == "10"
            flag.unlink()  # the saves land
            # Idle after the burst, the worker saves the waiting state by itself.
            await autosaved(s, max(counts) - 1)
            states = (await s.states())["states"]
            newest = states[-1]
            assert newest["cell_number"] == max(counts)
            first_held, last = newest["covers"]
            assert first_held < max(counts) == last, newest
            coalesced = counts[0]
            with pytest.raises(TimeTravelError, match="coalesced") as refused:
                await s.checkout(coalesced)
            message = str(refused.value)
            assert f"the state after cell {coalesced} is not kept" in message
            assert f"after cell {last}" in message and "namespace was not changed" in message
            assert result_text(await collect(s, "n")) == "10"
            listing = "".join(
                m.data for m in of_type(await collect(s, "%states"), MessageType.OUTPUT)
            )
            assert f"In [{first_held}]..In [{last - 1}] (ran back to back: coalesced" in listing
            # The newest state is what crash recovery restores.
            evalue, note = death_of(await crash(s, "import os\nos._exit(3)"))
            assert "restored" in note, note
            assert result_text(await collect(s, "n")) == "10"

    try:
        run(body())
    finally:
        flag.unlink(missing_ok=True)


def test_an_interrupt_of_a_queued_cell_answers_it() -> None:
    """An interrupt of a cell still queued behind another answers it with
    KeyboardInterrupt when it comes up (it was dropped, and the escalation
    stopped the worker as if the cell were stuck); the running cell goes on."""

    async def body() -> None:
        async with Session(interrupt_grace=10) as s:
            await define_state(s)
            slow = ExecuteMessage(code="import time\ntime.sleep(1)\n'slept'")
            queued = ExecuteMessage(code="'ran'")

            async def consume(cell: ExecuteMessage) -> list[Any]:
                return [m async for m in s.execute(cell)]

            async def until_running(cell: ExecuteMessage) -> None:
                for _ in range(500):
                    if s.running == cell.id:
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"{cell.code!r} never counted as running")

            running = asyncio.ensure_future(consume(slow))
            await until_running(slow)
            waiting = asyncio.ensure_future(consume(queued))  # sent behind it
            await until_running(queued)
            assert await s.interrupt()
            msgs = await asyncio.wait_for(waiting, 30)
            assert reply_of(msgs).ename == "KeyboardInterrupt", reply_of(msgs)
            assert result_text(await running) == "'slept'"
            assert s.restarts == 0, s.last_crash
            assert result_text(await collect(s, "f()")) == "42"

    run(body())


def test_the_wall_time_limit_counts_from_when_the_cell_runs() -> None:
    """Cells sent together run one after the other: each one's wall time
    counts from when the worker starts it, so the second is not killed for
    the time it waited behind the first; one that runs past the limit itself
    still is (it went unwatched once the first cell ended)."""

    async def body() -> None:
        async with Session(cell_timeout=2.5) as s:
            await define_state(s)
            nap = "import time\ntime.sleep(1.5)\n'{}'"  # 3 s after it was sent, for b
            msgs = await asyncio.gather(
                collect(s, nap.format("a")),
                collect(s, nap.format("b")),
                collect(s, "import time\ntime.sleep(60)", timeout=30),
            )
            assert [result_text(m) for m in msgs[:2]] == ["'a'", "'b'"], msgs[:2]
            evalue, _ = death_of(msgs[2])
            assert "wall-time limit of 2.5 s" in evalue, evalue
            await assert_restored(s)

    run(body())


def test_a_crash_loop_spends_the_restart_budget() -> None:
    async def body() -> None:
        async with Session(max_restarts=1, restart_window=600) as s:
            await define_state(s)
            await crash(s, "import os\nos._exit(1)")
            evalue, note = death_of(await crash(s, "import os\nos._exit(2)"))
            assert "exit code 2" in evalue
            assert "2 worker crashes within 600 s" in note, note
            msgs = await collect(s, "1 + 1")
            assert reply_of(msgs).ename == "WorkerDied"
            assert "crash loop" in reply_of(msgs).evalue
            await s.restart()  # a restart asked for starts afresh, budget reset
            assert result_text(await collect(s, "1 + 1")) == "2"
            assert reply_of(await collect(s, "x")).ename == "NameError"

    run(body())


def test_without_autosave_a_new_worker_starts_empty() -> None:
    async def body() -> None:
        async with Session(autosave=False) as s:
            await define_state(s)
            _, note = death_of(await crash(s, "import os\nos._exit(1)"))
            assert "the state is lost" in note, note
            assert reply_of(await collect(s, "x")).ename == "NameError"

    run(body())


def test_pool_sessions_recover_with_a_warm_worker() -> None:
    async def body() -> None:
        config = PoolConfig(min_idle=1, max_sessions=3, warmup_code="import json")
        async with SessionPool(config) as pool:
            s = await pool.acquire()
            await define_state(s)
            first = s.pid
            evalue, note = death_of(await crash(s, "import os\nos._exit(5)"))
            assert "exit code 5" in evalue
            # What the warm-up imported is part of the state, and comes back.
            assert "restored 3 variables as of cell 2: f, json, x" in note, note
            await assert_restored(s)
            assert result_text(await collect(s, "json.dumps(1)")) == "'1'"
            assert s.pid != first and gone(first)
            last = s.pid
            await pool.release(s)
            assert gone(last)
            with pytest.raises(ValueError, match="not acquired from this pool"):
                await pool.release(s)

    run(body())


def test_seed_import_path_gives_the_supervised_session() -> None:
    from pyrepl3_kernel.session.manager import Session as SeedSession

    assert SeedSession is Session
