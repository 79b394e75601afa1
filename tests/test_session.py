"""Behaviour of :class:`WorkerProcess`: one real worker process per test.

Every test drives its session inside ``async with WorkerProcess()``, so the worker
is shut down even when an assertion fails; the tests that kill or crash a
worker also check by pid that no process is left behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid

import msgpack
import pytest
from session_helpers import (
    assert_no_leftovers,
    collect,
    of_type,
    pid_gone,
    reply_of,
    result_text,
    run,
    stream_text,
    wait_until,
)

from pyrepl3_kernel.protocol import (
    CommInfoMessage,
    CommMsgMessage,
    CommOpenMessage,
    CompleteMessage,
    HealthMessage,
    HistoryMessage,
    InspectMessage,
    IsCompleteMessage,
    Message,
    MessageType,
    frame,
)
from pyrepl3_kernel.session import WorkerDeadError, WorkerProcess


@pytest.fixture(autouse=True)
def _isolated_ipython_dir(tmp_path, monkeypatch):
    # Workers inherit the environment: keep their history database private.
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


def index_of(msgs: list[Message], kind: MessageType, text: str | None = None) -> int:
    """Index of the first message of ``kind`` (an OUTPUT containing ``text``)."""
    for i, m in enumerate(msgs):
        if m.type == kind and (text is None or text in getattr(m, "data", "")):
            return i
    raise AssertionError(f"no {kind.value} {text or ''!r} in {msgs}")


# -- execute -----------------------------------------------------------------


def test_stdout_and_stderr_are_streamed():
    async def body():
        async with WorkerProcess() as s:
            msgs = await collect(s, "import sys\nprint('out')\nprint('err', file=sys.stderr)")
            assert stream_text(msgs, "stdout") == "out\n"
            assert stream_text(msgs, "stderr") == "err\n"
            assert reply_of(msgs).status == "ok"

    run(body())


def test_print_precedes_display_result_and_error():
    async def body():
        async with WorkerProcess() as s:
            msgs = await collect(s, "print('p1')\ndisplay('D')\nprint('p2')\n42")
            p1 = index_of(msgs, MessageType.OUTPUT, "p1")
            shown = index_of(msgs, MessageType.DISPLAY)
            p2 = index_of(msgs, MessageType.OUTPUT, "p2")
            result = index_of(msgs, MessageType.RESULT)
            assert p1 < shown < p2 < result < len(msgs) - 1

            msgs = await collect(s, "print('p3')\n1/0")
            assert index_of(msgs, MessageType.OUTPUT, "p3") < index_of(msgs, MessageType.ERROR)

    run(body())


def test_c_level_output_arrives():
    async def body():
        async with WorkerProcess() as s:
            msgs = await collect(s, "import os\nos.system('echo hi')\nos.write(2, b'raw\\n')")
            assert "hi\n" in stream_text(msgs, "stdout")
            assert "raw\n" in stream_text(msgs, "stderr")

    run(body())


def test_display_update_and_clear_output():
    code = textwrap.dedent(
        """
        from IPython.display import clear_output, display, update_display
        display('v1', display_id='d1')
        update_display('v2', display_id='d1')
        clear_output(wait=True)
        """
    )

    async def body():
        async with WorkerProcess() as s:
            msgs = await collect(s, code)
            first, update = of_type(msgs, MessageType.DISPLAY)
            assert first.data["text/plain"] == "'v1'"
            assert first.display_id == "d1" and first.update is False
            assert update.data["text/plain"] == "'v2'"
            assert update.transient == {"display_id": "d1"} and update.update is True
            (clear,) = of_type(msgs, MessageType.CLEAR_OUTPUT)
            assert clear.wait is True
            assert msgs.index(first) < msgs.index(update) < msgs.index(clear)

    run(body())


def test_result_carries_execution_count():
    async def body():
        async with WorkerProcess() as s:
            first = await collect(s, "1 + 1")
            (result,) = of_type(first, MessageType.RESULT)
            assert result.data["text/plain"] == "2"
            assert result.execution_count == reply_of(first).execution_count
            second = await collect(s, "'x' * 3")
            assert result_text(second) == "'xxx'"
            assert reply_of(second).execution_count == result.execution_count + 1

    run(body())


def test_error_message_and_reply():
    async def body():
        async with WorkerProcess() as s:
            msgs = await collect(s, "1/0")
            (error,) = of_type(msgs, MessageType.ERROR)
            assert error.ename == "ZeroDivisionError"
            assert error.evalue == "division by zero"
            assert error.traceback and any("ZeroDivisionError" in line for line in error.traceback)
            reply = reply_of(msgs)
            assert reply.status == "error"
            assert (reply.ename, reply.evalue) == ("ZeroDivisionError", "division by zero")
            assert reply.traceback

    run(body())


def test_user_expressions():
    async def body():
        async with WorkerProcess() as s:
            msgs = await collect(s, "a = 20", user_expressions={"ok": "a + 1", "bad": "1/0"})
            exprs = reply_of(msgs).user_expressions
            assert exprs["ok"]["status"] == "ok"
            assert exprs["ok"]["data"]["text/plain"] == "21"
            assert exprs["bad"]["status"] == "error"
            assert exprs["bad"]["ename"] == "ZeroDivisionError"

    run(body())


def test_silent_execution_has_no_result_and_keeps_the_count():
    async def body():
        async with WorkerProcess() as s:
            before = reply_of(await collect(s, "1")).execution_count
            silent = await collect(s, "2 + 2", silent=True)
            assert not of_type(silent, MessageType.RESULT)
            assert reply_of(silent).status == "ok"
            after = await collect(s, "3")
            assert reply_of(after).execution_count == before + 1
            assert of_type(after, MessageType.RESULT)[0].execution_count == before + 1

    run(body())


def test_top_level_await():
    async def body():
        async with WorkerProcess() as s:
            msgs = await collect(s, "import asyncio\nawait asyncio.sleep(0.01)\n'slept'")
            assert reply_of(msgs).status == "ok"
            assert result_text(msgs) == "'slept'"

    run(body())


def test_ipython_magics():
    async def body():
        async with WorkerProcess() as s:
            timed = await collect(s, "%time 1")
            assert "Wall time" in stream_text(timed)
            assert result_text(timed) == "1"
            shell = await collect(s, "!echo x")
            assert reply_of(shell).status == "ok"
            assert stream_text(shell).strip() == "x"

    run(body())


# -- input -------------------------------------------------------------------


def test_input_request_and_response():
    async def body():
        async with WorkerProcess() as s:
            seen = []

            async def answer(msg):
                if msg.type == MessageType.INPUT:
                    seen.append(msg)
                    await s.input_response(msg.id, "Alice")

            msgs = await collect(s, "name = input('Name? ')\nname.upper()", on_message=answer)
            assert [(m.prompt, m.password) for m in seen] == [("Name? ", False)]
            assert result_text(msgs) == "'ALICE'"

    run(body())


def test_getpass_sets_password():
    async def body():
        async with WorkerProcess() as s:
            seen = []

            async def answer(msg):
                if msg.type == MessageType.INPUT:
                    seen.append(msg)
                    await s.input_response(msg.id, "s3cret")

            code = "import getpass\nlen(getpass.getpass('Password: '))"
            msgs = await collect(s, code, on_message=answer)
            assert [(m.prompt, m.password) for m in seen] == [("Password: ", True)]
            assert result_text(msgs) == "6"

    run(body())


def test_input_from_a_thread():
    code = textwrap.dedent(
        """
        import threading
        got = []
        t = threading.Thread(target=lambda: got.append(input('from thread: ')))
        t.start()
        t.join()
        got
        """
    )

    async def body():
        async with WorkerProcess() as s:

            async def answer(msg):
                if msg.type == MessageType.INPUT:
                    assert msg.prompt == "from thread: "
                    await s.input_response(msg.id, "threaded")

            msgs = await collect(s, code, on_message=answer)
            assert result_text(msgs) == "['threaded']"

    run(body())


def test_input_without_stdin_fails_at_once():
    async def body():
        async with WorkerProcess() as s:
            # No answer is ever sent: waiting for one would hit collect's timeout.
            msgs = await collect(s, "input('never: ')", allow_stdin=False, timeout=15)
            assert not of_type(msgs, MessageType.INPUT)
            reply = reply_of(msgs)
            assert reply.status == "error"
            assert reply.ename == "StdinNotImplementedError"

    run(body())


# -- interrupt ---------------------------------------------------------------


def test_interrupt_stops_a_sleeping_cell():
    async def body():
        async with WorkerProcess() as s:

            async def interrupt_once_started(msg):
                if msg.type == MessageType.OUTPUT and "started" in msg.data:
                    await s.interrupt()

            code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
            msgs = await collect(s, code, on_message=interrupt_once_started, timeout=10)
            (error,) = of_type(msgs, MessageType.ERROR)
            assert error.ename == "KeyboardInterrupt"
            assert reply_of(msgs).status == "error"
            assert reply_of(msgs).ename == "KeyboardInterrupt"
            # The traceback ends in the cell, as ipykernel's: the worker's
            # SIGINT handler (where KeyboardInterrupt is raised) is cut off,
            # also from sys.last_traceback, where %debug starts.
            shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.traceback))
            assert "time.sleep(60)" in shown
            assert "_on_sigint" not in shown and "pyrepl3_kernel" not in shown
            code = (
                "import sys, traceback\n[f.name for f in traceback.extract_tb(sys.last_traceback)]"
            )
            assert "_on_sigint" not in result_text(await collect(s, code))
            assert result_text(await collect(s, "'next'")) == "'next'"

    run(body())


def test_interrupt_during_print_shows_only_the_cell():
    """An interrupt that lands in the worker's own code run for the cell
    (print, its streams) shows the cell's frames only, as C's print would."""

    async def body():
        async with WorkerProcess() as s:
            sent = []

            async def interrupt_once_printing(msg):
                if msg.type == MessageType.OUTPUT and "tick" in msg.data and not sent:
                    sent.append(msg)
                    await s.interrupt()

            code = "import sys\nwhile True:\n    print('tick')\n    sys.stdout.write('tock\\n')"
            msgs = await collect(s, code, on_message=interrupt_once_printing, timeout=10)
            (error,) = of_type(msgs, MessageType.ERROR)
            assert error.ename == "KeyboardInterrupt"
            shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.traceback))
            assert "pyrepl3_kernel" not in shown and "_on_sigint" not in shown, shown
            assert result_text(await collect(s, "'next'")) == "'next'"

    run(body())


def test_interrupt_in_what_the_kernels_code_calls_shows_only_the_cell():
    """An interrupt that lands in library code the worker's own code calls
    (print -> the stream -> threading.current_thread) ends the traceback
    above the worker's first frame too, not at the library's frame."""
    code = textwrap.dedent(
        """\
        import os, threading
        from pyrepl3_kernel.worker import shell as _shell
        ns = {}
        exec(compile("def library():\\n    raise KeyboardInterrupt\\n", threading.__file__, "exec"), ns)
        exec(compile(
            "def kernel_side(f):\\n    return f()\\n",
            os.path.join(_shell._PACKAGE_DIR, "worker", "output.py"), "exec",
        ), ns)
        try:
            ns["kernel_side"](ns["library"])
        except KeyboardInterrupt as exc:
            _, _, tb = get_ipython()._get_exc_info((type(exc), exc, exc.__traceback__))
        names = []
        while tb is not None:
            names.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        names[-1]
        """
    )

    async def body():
        async with WorkerProcess() as s:
            assert result_text(await collect(s, code)) == "'<module>'"

    run(body())


def test_interrupt_cancels_a_pending_input():
    async def body():
        async with WorkerProcess() as s:

            async def interrupt_input(msg):
                if msg.type == MessageType.INPUT:
                    await s.interrupt()

            msgs = await collect(s, "input('wait: ')", on_message=interrupt_input, timeout=10)
            assert reply_of(msgs).status == "error"
            assert reply_of(msgs).ename == "KeyboardInterrupt"
            assert result_text(await collect(s, "'next'")) == "'next'"

    run(body())


def test_targeted_interrupt_hits_only_its_target():
    code = "import time\nprint('started', flush=True)\ntime.sleep(1)\n'finished'"

    async def body():
        async with WorkerProcess() as s:

            async def interrupt_other(msg):
                if msg.type == MessageType.OUTPUT and "started" in msg.data:
                    await s.interrupt(target="not-this-execution")

            msgs = await collect(s, code, on_message=interrupt_other)
            assert reply_of(msgs).status == "ok"
            assert result_text(msgs) == "'finished'"

            async def interrupt_this(msg):
                if msg.type == MessageType.OUTPUT and "started" in msg.data:
                    await s.interrupt(target=msg.parent_id)

            msgs = await collect(
                s, code.replace("sleep(1)", "sleep(60)"), on_message=interrupt_this, timeout=10
            )
            assert reply_of(msgs).ename == "KeyboardInterrupt"

    run(body())


def test_interrupt_while_idle_is_harmless():
    async def body():
        async with WorkerProcess() as s:
            pid = s.pid
            await collect(s, "x = 1")
            await s.interrupt()
            await s.interrupt(target="nothing-running")
            await asyncio.sleep(0.3)
            assert s.is_alive and s.pid == pid
            msgs = await collect(s, "x + 1")
            assert reply_of(msgs).status == "ok"
            assert result_text(msgs) == "2"

    run(body())


def test_output_after_the_reply_goes_to_on_unrouted():
    code = textwrap.dedent(
        """
        import threading, time
        def late():
            time.sleep(0.3)
            print('late line', flush=True)
        threading.Thread(target=late).start()
        """
    )

    async def body():
        unrouted: list[Message] = []
        async with WorkerProcess(on_unrouted=unrouted.append) as s:
            msgs = await collect(s, code)
            assert reply_of(msgs).status == "ok"
            await wait_until(lambda: "late line" in stream_text(unrouted), what="the late line")
            late = [m for m in unrouted if m.type == MessageType.OUTPUT]
            assert all(m.parent_id == msgs[-1].parent_id for m in late)

    run(body())


# -- introspection, history, comms, health -----------------------------------


def test_complete_and_inspect():
    async def body():
        async with WorkerProcess() as s:
            code = "import os; os.pa"
            reply = await s.request(CompleteMessage(code=code, cursor_pos=len(code)))
            assert reply.type == MessageType.COMPLETE_REPLY
            assert "path" in reply.matches
            assert code[: reply.cursor_start] + "path" == "import os; os.path"
            assert reply.cursor_end == len(code)

            reply = await s.request(InspectMessage(code="print", cursor_pos=5))
            assert reply.type == MessageType.INSPECT_REPLY
            assert reply.found is True
            assert "print" in reply.data["text/plain"]

            reply = await s.request(InspectMessage(code="no_such_name_here", cursor_pos=3))
            assert reply.found is False

    run(body())


def test_history_tail_range_and_search():
    marker = uuid.uuid4().hex[:8]
    cells = [f"a_{marker} = 1", f"b_{marker} = 2", f"c_{marker} = 3"]

    async def body():
        async with WorkerProcess() as s:
            for cell in cells:
                await collect(s, cell)

            tail = await s.request(HistoryMessage(hist_access_type="tail", n=2))
            assert [entry[2] for entry in tail.history] == cells[1:]

            rng = await s.request(
                HistoryMessage(hist_access_type="range", session=0, start=1, stop=3)
            )
            assert [(entry[1], entry[2]) for entry in rng.history] == [(1, cells[0]), (2, cells[1])]

            found = await s.request(
                HistoryMessage(hist_access_type="search", pattern=f"b_{marker}*")
            )
            assert [entry[2] for entry in found.history] == [cells[1]]

            with_output = await collect(s, "6 * 7")
            assert result_text(with_output) == "42"
            # with output: [session, line, [input, output]] (the output is only
            # kept if IPython's HistoryManager.db_log_output is on)
            out = await s.request(HistoryMessage(hist_access_type="tail", n=1, output=True))
            assert out.history[-1][2][0] == "6 * 7"

    run(body())


@pytest.mark.parametrize(
    ("code", "status", "indent"),
    [
        ("x = 1", "complete", ""),
        ("for i in range(3):", "incomplete", "    "),
        ("if True:\n    x = (", "incomplete", "    "),
        ("1 +", "invalid", ""),
    ],
)
def test_is_complete(code, status, indent):
    async def body():
        async with WorkerProcess() as s:
            reply = await s.request(IsCompleteMessage(code=code))
            assert (reply.status, reply.indent) == (status, indent)

    run(body())


COMM_TARGET = textwrap.dedent(
    """
    import comm
    opened = []
    def on_open(c, msg):
        print('opened with', msg['content']['data'])
        opened.append(c)
        @c.on_msg
        def _echo(m):
            print('got', m['content']['data'])
            c.send({'echo': m['content']['data']}, buffers=m['buffers'])
    comm.get_comm_manager().register_target('echo_target', on_open)
    """
)


def test_comm_open_and_msg_from_the_client():
    async def body():
        async with WorkerProcess() as s:
            assert reply_of(await collect(s, COMM_TARGET)).status == "ok"

            request = CommOpenMessage(comm_id="c1", target_name="echo_target", data={"x": 1})
            msgs = [m async for m in s.stream(request)]
            assert stream_text(msgs) == "opened with {'x': 1}\n"
            assert all(m.parent_id == request.id for m in msgs)
            assert msgs[-1].type == MessageType.ACK and msgs[-1].status == "ok"

            info = await s.request(CommInfoMessage())
            assert info.comms == {"c1": {"target_name": "echo_target"}}
            info = await s.request(CommInfoMessage(target_name="other"))
            assert info.comms == {}

            payload = [b"\x00\x01\xff", bytes(range(256))]
            request = CommMsgMessage(comm_id="c1", data={"y": 2}, buffers=payload)
            msgs = [m async for m in s.stream(request)]
            (echo,) = of_type(msgs, MessageType.COMM_MSG)
            assert echo.comm_id == "c1"
            assert echo.data == {"echo": {"y": 2}}
            assert echo.buffers == payload
            assert echo.parent_id == request.id
            assert "got {'y': 2}" in stream_text(msgs)
            assert msgs[-1].type == MessageType.ACK

    run(body())


def test_comm_created_by_the_kernel():
    async def body():
        async with WorkerProcess() as s:
            msgs = await collect(
                s, "import comm\nc = comm.create_comm(target_name='t', data={'a': 1})"
            )
            (opened,) = of_type(msgs, MessageType.COMM_OPEN)
            assert opened.target_name == "t"
            assert opened.data == {"a": 1}
            assert opened.comm_id

            msgs = await collect(s, "c.send({'b': 2}, buffers=[b'\\x00bin'])\nc.close()")
            (sent,) = of_type(msgs, MessageType.COMM_MSG)
            assert (sent.comm_id, sent.data, sent.buffers) == (
                opened.comm_id,
                {"b": 2},
                [b"\x00bin"],
            )
            (closed,) = of_type(msgs, MessageType.COMM_CLOSE)
            assert closed.comm_id == opened.comm_id

    run(body())


def test_health():
    async def body():
        async with WorkerProcess() as s:
            reply = await s.request(HealthMessage())
            assert reply.type == MessageType.HEALTH_REPLY
            assert reply.pid == s.pid
            assert reply.rss_bytes > 0
            assert reply.executing is None

    run(body())


# -- crashes -----------------------------------------------------------------


def test_exit_during_a_cell():
    async def body():
        unrouted: list[Message] = []
        async with WorkerProcess(on_unrouted=unrouted.append) as s:
            pid = s.pid
            msgs = await collect(s, "print('last words')\nimport os\nos._exit(3)", timeout=15)
            assert "last words\n" in stream_text(msgs)
            (error,) = of_type(msgs, MessageType.ERROR)
            assert "exit code 3" in error.evalue
            assert msgs.index(error) > index_of(msgs, MessageType.OUTPUT, "last words")
            reply = reply_of(msgs)
            assert reply.status == "error"
            assert "exit code 3" in reply.evalue
            assert not s.is_alive
            assert s.death_cause == "exit code 3"
            await wait_until(lambda: any(m.type == MessageType.STATUS for m in unrouted))
            (status,) = of_type(unrouted, MessageType.STATUS)
            assert (status.state, status.detail) == ("dead", "exit code 3")
            with pytest.raises(WorkerDeadError, match="exit code 3"):
                await collect(s, "1")
            with pytest.raises(WorkerDeadError):
                await s.request(HealthMessage())
        return pid

    assert_no_leftovers([run(body())])


def test_segfault_is_named():
    async def body():
        async with WorkerProcess() as s:
            pid = s.pid
            msgs = await collect(s, "import ctypes\nctypes.string_at(0)", timeout=15)
            (error,) = of_type(msgs, MessageType.ERROR)
            assert "SIGSEGV" in error.evalue
            assert reply_of(msgs).status == "error"
            assert not s.is_alive
        return pid

    assert_no_leftovers([run(body())])


def test_sigkill_from_outside_is_named():
    async def body():
        async with WorkerProcess() as s:
            pid = s.pid

            async def kill_once_started(msg):
                if msg.type == MessageType.OUTPUT and "sleeping" in msg.data:
                    os.kill(pid, signal.SIGKILL)

            code = "import time\nprint('sleeping', flush=True)\ntime.sleep(60)"
            msgs = await collect(s, code, on_message=kill_once_started, timeout=15)
            (error,) = of_type(msgs, MessageType.ERROR)
            assert "SIGKILL" in error.evalue
            assert reply_of(msgs).status == "error"
            assert not s.is_alive
        return pid

    assert_no_leftovers([run(body())])


def test_restart_gives_a_fresh_worker():
    async def body():
        async with WorkerProcess() as s:
            old = s.pid
            await collect(s, "kept = 42")
            await collect(s, "import os\nos._exit(1)", timeout=15)
            assert not s.is_alive
            await s.restart()
            assert s.is_alive and s.pid != old
            msgs = await collect(s, "kept")
            assert of_type(msgs, MessageType.ERROR)[0].ename == "NameError"
            assert result_text(await collect(s, "1 + 1")) == "2"

            # restart of a live session replaces it too
            middle = s.pid
            await s.restart()
            assert s.pid not in (old, middle)
            assert result_text(await collect(s, "2 + 2")) == "4"
            return [old, middle, s.pid]

    assert_no_leftovers(run(body()))


def test_shutdown_ends_a_running_cell():
    async def body():
        async with WorkerProcess() as s:
            pid = s.pid
            started = asyncio.Event()

            async def note_start(msg):
                if msg.type == MessageType.OUTPUT and "busy" in msg.data:
                    started.set()

            code = "import time\nprint('busy', flush=True)\ntime.sleep(60)"
            cell = asyncio.ensure_future(collect(s, code, on_message=note_start, timeout=20))
            await asyncio.wait_for(started.wait(), 10)
            await s.shutdown(timeout=0.5)
            msgs = await cell  # the stream ends instead of hanging
            assert reply_of(msgs).status == "error"
            assert not s.is_alive
        return pid

    assert_no_leftovers([run(body())])


# -- no orphans --------------------------------------------------------------

HELPER = textwrap.dedent(
    """
    import asyncio, sys, time
    from pyrepl3_kernel.session import WorkerProcess

    async def main():
        session = WorkerProcess()
        await session.start()
        print(session.pid, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_worker_dies_with_its_parent():
    helper = subprocess.Popen(
        [sys.executable, "-c", HELPER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    worker_pid = None
    try:
        assert helper.stdout is not None
        line = helper.stdout.readline()
        worker_pid = int(line)
        assert not pid_gone(worker_pid)
        helper.kill()
        helper.wait(10)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait(10)
    assert_no_leftovers([worker_pid])


def test_shutdown_kills_the_process_group():
    async def body():
        async with WorkerProcess() as s:
            pid = s.pid
            msgs = await collect(
                s, "import subprocess\np = subprocess.Popen(['sleep', '1000'])\np.pid"
            )
            child = int(result_text(msgs))
        return [pid, child]

    assert_no_leftovers(run(body()))


# -- bad input on the control transport --------------------------------------


def test_garbage_on_the_control_transport():
    async def body():
        unrouted: list[Message] = []
        async with WorkerProcess(on_unrouted=unrouted.append) as s:
            assert s._control is not None
            s._control.write(frame(b"garbage"))
            s._control.write(frame(msgpack.packb({"v": 1, "type": "no_such_type", "id": "u1"})))
            s._control.write(
                frame(msgpack.packb({"v": 99, "type": "execute", "id": "v99", "code": "1"}))
            )
            s._control.write(
                frame(msgpack.packb({"v": 1, "type": "execute", "id": "bf", "code": 5}))
            )

            def errors():
                return [m for m in unrouted if m.type == MessageType.PROTOCOL_ERROR]

            await wait_until(lambda: len(errors()) >= 4, what="four protocol errors")
            assert [(m.code, m.parent_id) for m in errors()] == [
                ("malformed", None),
                ("unknown_type", "u1"),
                ("unsupported_version", "v99"),
                ("bad_field", "bf"),
            ]
            assert s.is_alive
            assert result_text(await collect(s, "40 + 2")) == "42"

    run(body())
