"""Kernel subshells (JEP 91) through jupyter_client, on both kernelspecs.

One kernel per kernelspec for the module (the ``shared``/``kernel``
fixtures). Concurrency is shown by the order of replies and by cells that
wait for each other (a threading.Event set by the other shell), never by
timings. The crash test is last: it replaces the worker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from frontend import Frontend
from jupyter_helpers import TIMEOUT, Msg

pytestmark = pytest.mark.timeout(180)


# -- helpers -------------------------------------------------------------------------


def control(kernel: Frontend, msg_type: str, content: dict[str, Any] | None = None) -> Msg:
    """Send a control request; its reply."""
    msg = kernel.kc.session.msg(msg_type, content or {})
    kernel.kc.control_channel.send(msg)
    msg_id = msg["header"]["msg_id"]
    while True:
        reply = kernel.kc.get_control_msg(timeout=TIMEOUT)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def create(kernel: Frontend) -> str:
    reply = control(kernel, "create_subshell_request")
    assert reply["content"]["status"] == "ok", reply["content"]
    return str(reply["content"]["subshell_id"])


def delete(kernel: Frontend, subshell_id: str) -> Msg:
    return control(kernel, "delete_subshell_request", {"subshell_id": subshell_id})


def listed(kernel: Frontend) -> list[str]:
    return list(control(kernel, "list_subshell_request")["content"]["subshell_id"])


def send(kernel: Frontend, code: str, subshell_id: str | None, **content: Any) -> str:
    """An execute_request on a subshell (None: the main shell); its msg_id."""
    msg = kernel.kc.session.msg(
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            **content,
        },
    )
    msg["header"]["subshell_id"] = subshell_id
    kernel.kc.shell_channel.send(msg)
    return str(msg["header"]["msg_id"])


def replies(kernel: Frontend, msg_ids: list[str]) -> list[Msg]:
    """The shell replies of ``msg_ids``, in the order they arrived."""
    got: list[Msg] = []
    pending = set(msg_ids)
    while pending:
        reply = kernel.kc.get_shell_msg(timeout=TIMEOUT)
        parent = reply["parent_header"].get("msg_id")
        if parent in pending:
            pending.discard(parent)
            got.append(reply)
    return got


def stream_text(iopub: list[Msg]) -> str:
    return "".join(m["content"]["text"] for m in iopub if m["msg_type"] == "stream")


@pytest.fixture
def subshell(kernel: Frontend) -> Any:
    subshell_id = create(kernel)
    yield subshell_id
    if subshell_id in listed(kernel):
        delete(kernel, subshell_id)


# -- create, list, delete --------------------------------------------------------------


def test_kernel_info_announces_subshells(kernel: Frontend) -> None:
    msg_id = kernel.kc.kernel_info()
    assert "kernel subshells" in kernel.reply_to(msg_id)["content"]["supported_features"]


def test_create_list_delete(kernel: Frontend) -> None:
    before = listed(kernel)
    first, second = create(kernel), create(kernel)
    assert first != second
    assert listed(kernel) == [*before, first, second]
    assert delete(kernel, first)["content"] == {"status": "ok"}
    assert listed(kernel) == [*before, second]
    delete(kernel, second)
    assert listed(kernel) == before


def test_unknown_subshell_errors_like_ipykernel(kernel: Frontend) -> None:
    gone = create(kernel)
    delete(kernel, gone)
    content = delete(kernel, gone)["content"]
    assert content["status"] == "error"
    assert content["evalue"] == f"Unknown subshell_id {gone!r}"
    missing = control(kernel, "delete_subshell_request", {})["content"]
    assert missing["status"] == "error" and "subshell_id" in missing["evalue"]

    msg_id = send(kernel, "a = 1", gone)
    reply = kernel.reply_to(msg_id)["content"]
    assert reply["status"] == "error"
    assert reply["ename"] == "UnknownSubshellError"
    assert reply["evalue"] == f"Unknown subshell_id {gone!r}"
    states = [m["content"]["execution_state"] for m in kernel.iopub_of(msg_id)]
    assert states == ["busy", "idle"]


# -- concurrency -----------------------------------------------------------------------


def test_subshell_answers_while_the_main_shell_sleeps(kernel: Frontend, subshell: str) -> None:
    kernel.execute("shared_value = 41")
    main = send(kernel, "import time; time.sleep(5); 'main'", None)
    sub = send(kernel, "shared_value + 1", subshell)
    others = []  # other shell requests on the subshell do not wait either
    for msg_type, content in [
        ("complete_request", {"code": "shared_va", "cursor_pos": 9}),
        ("inspect_request", {"code": "shared_value", "cursor_pos": 3, "detail_level": 0}),
        ("comm_info_request", {}),
    ]:
        msg = kernel.kc.session.msg(msg_type, content)
        msg["header"]["subshell_id"] = subshell
        kernel.kc.shell_channel.send(msg)
        others.append(msg["header"]["msg_id"])
    got = replies(kernel, [main, sub, *others])
    assert got[-1]["parent_header"]["msg_id"] == main  # the subshell did not wait
    first = next(r for r in got if r["parent_header"]["msg_id"] == sub)
    assert first["content"]["status"] == got[-1]["content"]["status"] == "ok"
    assert first["parent_header"]["subshell_id"] == subshell
    assert all(r["content"]["status"] == "ok" for r in got)
    assert (
        "shared_value"
        in got[[r["msg_type"] for r in got].index("complete_reply")]["content"]["matches"]
    )
    runs = kernel.iopub_of_all([main, sub])
    result = [m for m in runs[sub] if m["msg_type"] == "execute_result"]
    assert result[0]["content"]["data"]["text/plain"] == "42"  # the same namespace
    for msg_id, msgs in runs.items():  # each request has its own busy ... idle
        states = [m["content"]["execution_state"] for m in msgs if m["msg_type"] == "status"]
        assert states == ["busy", "idle"], (msg_id, states)


def test_output_goes_to_the_right_parent(kernel: Frontend, subshell: str) -> None:
    kernel.execute("import threading; sub_done = threading.Event()")
    # The main cell waits for the subshell's cell, so both run at once.
    main = send(kernel, "sub_done.wait(60); print('from main')", None)
    sub = send(
        kernel,
        "print('from subshell'); display('shown'); sub_done.set(); 'result'",
        subshell,
    )
    replies(kernel, [main, sub])
    runs = kernel.iopub_of_all([main, sub])
    assert stream_text(runs[main]) == "from main\n"
    assert stream_text(runs[sub]) == "from subshell\n"
    sub_types = [m["msg_type"] for m in runs[sub]]
    assert "display_data" in sub_types and "execute_result" in sub_types
    assert "display_data" not in [m["msg_type"] for m in runs[main]]


def test_a_result_whose_repr_raises_fails_the_subshell_cell_alone(
    kernel: Frontend, subshell: str
) -> None:
    """As on the main shell (ipykernel's test_execute_reply_error_status): a
    subshell cell whose result cannot be shown replies an error; the main
    cell running at the same time replies ok."""
    kernel.execute(
        "import threading; sub_done = threading.Event()\n"
        "class BadRepr:\n    def __repr__(self):\n        1 / 0"
    )
    main = send(kernel, "sub_done.wait(60); 'main result'", None)
    sub = send(kernel, "try:\n    BadRepr()\nfinally:\n    sub_done.set()\nBadRepr()", subshell)
    got = {r["parent_header"]["msg_id"]: r["content"] for r in replies(kernel, [main, sub])}
    assert got[sub]["status"] == "error", got[sub]
    assert got[sub]["ename"] == "ZeroDivisionError"
    assert got[main]["status"] == "ok", got[main]
    after = send(kernel, "40 + 2", subshell)
    assert replies(kernel, [after])[0]["content"]["status"] == "ok"


def test_a_cell_awaiting_on_a_subshell_gets_its_comm_message(
    kernel: Frontend, subshell: str
) -> None:
    """A widget's answer sent on the subshell whose cell awaits it is
    delivered during the await (else the cell would wait for ever)."""
    setup = send(kernel, "import comm; widget = comm.create_comm(target_name='t')", subshell)
    assert kernel.reply_to(setup)["content"]["status"] == "ok"
    code = (
        "import asyncio\n"
        "answer = asyncio.get_running_loop().create_future()\n"
        "widget.on_msg(lambda m: answer.set_result(m['content']['data']['value']))\n"
        "widget.send({'question': 1})\n"
        "await asyncio.wait_for(answer, 20)"
    )
    cell = send(kernel, code, subshell)
    while True:  # the widget's question, from the cell
        msg = kernel.kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["msg_type"] == "comm_msg" and msg["parent_header"].get("msg_id") == cell:
            break
    answer = kernel.kc.session.msg(
        "comm_msg", {"comm_id": msg["content"]["comm_id"], "data": {"value": 42}}
    )
    answer["header"]["subshell_id"] = subshell
    kernel.kc.shell_channel.send(answer)
    assert kernel.reply_to(cell)["content"]["status"] == "ok"
    result = [m for m in kernel.iopub_of(cell) if m["msg_type"] == "execute_result"]
    assert result[0]["content"]["data"]["text/plain"] == "42"


def test_interrupt_one_subshell(kernel: Frontend) -> None:
    looping, other = create(kernel), create(kernel)
    kernel.execute("import threading, time; main_go_on = True; sub_started = threading.Event()")
    main = send(kernel, "while main_go_on: time.sleep(0.01)", None)
    loop = send(kernel, "sub_started.set()\nwhile True: time.sleep(0.01)", looping)
    started = send(kernel, "sub_started.wait(30)", other)  # the main shell is busy
    replies(kernel, [started])  # the subshell's loop runs
    msg = kernel.kc.session.msg("interrupt_request", {})
    msg["header"]["subshell_id"] = looping
    kernel.kc.control_channel.send(msg)
    (interrupted,) = replies(kernel, [loop])
    assert interrupted["content"]["status"] == "error"
    assert interrupted["content"]["ename"] == "KeyboardInterrupt"
    # The main shell's cell went on through the interrupt; another subshell ends it.
    stop = send(kernel, "main_go_on = False", other)
    assert {r["content"]["status"] for r in replies(kernel, [stop, main])} == {"ok"}
    delete(kernel, looping)
    delete(kernel, other)


def test_input_on_a_subshell(kernel: Frontend, subshell: str) -> None:
    msg_id = send(kernel, "print('got', input('name? '))", subshell, allow_stdin=True)
    request = kernel.kc.get_stdin_msg(timeout=TIMEOUT)
    assert request["msg_type"] == "input_request"
    assert request["parent_header"]["msg_id"] == msg_id
    assert request["content"]["prompt"] == "name? "
    kernel.kc.input("subshell user")
    assert kernel.reply_to(msg_id)["content"]["status"] == "ok"
    assert stream_text(kernel.iopub_of(msg_id)) == "got subshell user\n"


def test_a_main_shell_interrupt_leaves_a_subshell_input_pending(
    kernel: Frontend, subshell: str
) -> None:
    asking = send(kernel, "print('got', input('sub? '))", subshell, allow_stdin=True)
    assert kernel.kc.get_stdin_msg(timeout=TIMEOUT)["parent_header"]["msg_id"] == asking
    main = kernel.start_cell("import time; time.sleep(60)")
    kernel.km.interrupt_kernel()
    assert kernel.reply_to(main)["content"]["ename"] == "KeyboardInterrupt"
    kernel.kc.input("still here")  # the subshell's input() still gets it
    assert kernel.reply_to(asking)["content"]["status"] == "ok"
    assert stream_text(kernel.iopub_of(asking)) == "got still here\n"


def test_delete_while_running_ends_the_cell(kernel: Frontend) -> None:
    doomed = create(kernel)
    kernel.execute("import threading, time; doomed_started = threading.Event()")
    running = send(kernel, "doomed_started.set()\nwhile True: time.sleep(0.01)", doomed)
    kernel.execute("doomed_started.wait(30)")
    assert delete(kernel, doomed)["content"]["status"] == "ok"
    reply = kernel.reply_to(running)["content"]
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert kernel.iopub_of(running)[-1]["content"]["execution_state"] == "idle"
    assert doomed not in listed(kernel)
    assert kernel.execute("threading.active_count()").status == "ok"


def test_delete_answers_while_the_cell_is_stuck(kernel: Frontend) -> None:
    """A cell in a call that an interrupt cannot stop (a wait without a
    timeout) does not hold the delete up for long: the reply comes, the
    subshell is gone, and the cell ends when the call returns."""
    stuck = create(kernel)
    kernel.execute("import threading; release = threading.Event(); entered = threading.Event()")
    running = send(kernel, "entered.set(); release.wait()", stuck)
    kernel.execute("entered.wait(30)")
    assert delete(kernel, stuck)["content"]["status"] == "ok"  # within the grace
    assert stuck not in listed(kernel)
    kernel.execute("release.set()")
    reply = kernel.reply_to(running)["content"]
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"


# -- the native API -----------------------------------------------------------------------


def test_native_session_subshells(pyrepl3_kernelspec: Path) -> None:
    """The same subshells without Jupyter: ``session.subshells``."""
    from pyrepl3_kernel import ExecuteMessage, Session
    from pyrepl3_kernel.session.subshells import UnknownSubshellError

    async def replies_of(session: Session, message: ExecuteMessage) -> list[Any]:
        return [m async for m in session.execute(message)]

    async def main() -> None:
        async with Session(autosave=False) as session:
            subshell_id = await session.subshells.create()
            assert session.subshells.ids() == [subshell_id]
            order: list[str] = []

            async def run(code: str, on: str | None, name: str) -> Any:
                msgs = await replies_of(session, ExecuteMessage(code=code, subshell_id=on))
                order.append(name)
                return msgs[-1]

            await run("import threading, time; gate = threading.Event()", None, "setup")
            # The main cell can only end if the subshell's cell runs meanwhile.
            main_cell = asyncio.ensure_future(run("assert gate.wait(60)", None, "main"))
            sub_reply = await run("gate.set()", subshell_id, "subshell")
            assert (await main_cell).status == sub_reply.status == "ok"
            assert order[0] == "setup"

            looping = ExecuteMessage(code="while True: time.sleep(0.01)", subshell_id=subshell_id)
            loop_task = asyncio.ensure_future(replies_of(session, looping))
            while not await session.subshells.interrupt(subshell_id):
                await asyncio.sleep(0.01)  # until the loop has started
            assert (await loop_task)[-1].ename == "KeyboardInterrupt"

            unknown = await replies_of(session, ExecuteMessage(code="1", subshell_id="nope"))
            assert (unknown[-1].status, unknown[-1].ename) == ("error", "UnknownSubshellError")
            with pytest.raises(UnknownSubshellError, match="Unknown subshell_id 'nope'"):
                await session.subshells.delete("nope")
            await session.subshells.delete(subshell_id)
            assert session.subshells.ids() == []

            await session.subshells.create()
            await session.restart()  # as a new process: no subshells
            assert session.subshells.ids() == []

    asyncio.run(main())


# -- a crash (last: it replaces the worker) ------------------------------------------------


def test_crash_during_concurrent_cells_ends_both(kernel: Frontend, subshell: str) -> None:
    kernel.execute("import threading, time; survivor = 'kept'; crash_ready = threading.Event()")
    # Set on the subshell while the main shell is idle: saved all the same.
    assert kernel.reply_to(send(kernel, "sub_survivor = 'kept too'", subshell))
    main = send(kernel, "crash_ready.set(); time.sleep(60)", None)
    sub = send(kernel, "crash_ready.wait(30); import os; os._exit(7)", subshell)
    got = {r["parent_header"]["msg_id"]: r["content"] for r in replies(kernel, [main, sub])}
    runs = kernel.iopub_of_all([main, sub])
    for msg_id in (main, sub):
        assert got[msg_id]["status"] == "error"
        assert got[msg_id]["ename"] == "WorkerDied"
        assert "exit code 7" in got[msg_id]["evalue"]
        errors = [m for m in runs[msg_id] if m["msg_type"] == "error"]
        assert "exit code 7" in errors[0]["content"]["evalue"]
        assert "a new worker is running" in stream_text(runs[msg_id])
    # The same recovery for both: the state came back, the subshell is still there.
    assert subshell in listed(kernel)
    again = send(kernel, "survivor, sub_survivor", subshell)
    assert kernel.reply_to(again)["content"]["status"] == "ok"
    result = [m for m in kernel.iopub_of(again) if m["msg_type"] == "execute_result"]
    assert result[0]["content"]["data"]["text/plain"] == "('kept', 'kept too')"
    assert kernel.execute("1 + 1").status == "ok"
