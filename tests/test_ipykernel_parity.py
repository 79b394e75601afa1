"""What a Jupyter user sees the same as with ipykernel (issue 11): background
asyncio tasks, comms during ``await``, errors in a result's repr, interrupts
in pdb, the order of replies, busy/idle on control, ``sys.path``, whole lines.

Each test runs on both kernelspecs (pooled ``pyrepl3`` and ``pyrepl3-cold``);
most of them are ipykernel's own tests (``tests/test_kernel.py``,
``tests/test_message_spec.py`` of ipykernel 7.4) in this suite's terms.
"""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from frontend import Frontend
from jupyter_helpers import TIMEOUT, Msg

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")


def streams_of(kernel: Frontend, msg_id: str, count: int, timeout: float = TIMEOUT) -> list[Msg]:
    """The next ``count`` stream messages whose parent is ``msg_id``."""
    found: list[Msg] = []
    deadline = time.monotonic() + timeout
    while len(found) < count:
        msg = kernel.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
            found.append(msg)
    return found


# -- asyncio ---------------------------------------------------------------------------


def test_background_task_prints_into_the_cell_that_started_it(kernel: Frontend) -> None:
    """ipykernel's test_print_to_correct_cell_from_asyncio: a task started in
    one cell goes on between cells, and what it prints goes to its cell."""
    code = (
        "import asyncio\n"
        "async def ticker():\n"
        "    for i in range(5):\n"
        "        print(i, end='', flush=True)\n"
        "        await asyncio.sleep(0.1)\n"
        "asyncio.get_event_loop().create_task(ticker());\n"
    )
    started = kernel.kc.execute(code)
    later = kernel.kc.execute("pass")
    assert kernel.reply_to(later)["content"]["status"] == "ok"
    texts = [m["content"]["text"] for m in streams_of(kernel, started, 5)]
    assert texts == ["0", "1", "2", "3", "4"]


def test_background_task_runs_while_the_kernel_is_idle(kernel: Frontend) -> None:
    kernel.execute(
        "import asyncio\n"
        "ticks = []\n"
        "async def tick():\n"
        "    while len(ticks) < 3:\n"
        "        ticks.append(1)\n"
        "        await asyncio.sleep(0.05)\n"
        "task = asyncio.get_event_loop().create_task(tick())\n"
    )
    deadline = time.monotonic() + TIMEOUT
    while kernel.value("task.done()") != "True":
        assert time.monotonic() < deadline, "the task did not run between cells"
        time.sleep(0.1)
    assert kernel.value("len(ticks)") == "3"


def test_top_level_await_runs_on_the_loop_of_earlier_tasks(kernel: Frontend) -> None:
    """A task from an earlier cell and a top-level await share one loop."""
    kernel.execute(
        "import asyncio\n"
        "loop = asyncio.get_event_loop()\n"
        "gate = loop.create_future()\n"
        "async def opener():\n"
        "    await asyncio.sleep(0.05)\n"
        "    gate.set_result('open')\n"
        "loop.create_task(opener());\n"
    )
    run = kernel.execute("print(await asyncio.wait_for(gate, 10))")
    assert run.status == "ok", run.reply["content"]
    assert run.stdout() == "open\n"


# -- comms ----------------------------------------------------------------------------


def test_cell_awaiting_a_comm_reply_gets_it(kernel: Frontend) -> None:
    """ipykernel's test_async_cell_waiting_for_comm_reply: a comm_msg sent
    while a cell awaits reaches the cell, ahead of the cell queued behind it."""
    msg_id = kernel.kc.execute(
        "import asyncio, comm\n"
        "reply = asyncio.get_running_loop().create_future()\n"
        "widget = comm.create_comm(target_name='comm-reply-test')\n"
        "widget.on_msg(lambda msg: reply.set_result(msg['content']['data']['value']))\n"
        "result = await asyncio.wait_for(reply, 20)\n"
        "assert result == 42\n"
    )
    deadline = time.monotonic() + TIMEOUT
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        assert msg["msg_type"] != "error", msg["content"]
        if msg["msg_type"] == "comm_open":
            comm_id = msg["content"]["comm_id"]
            break
    next_id = kernel.kc.execute("assert result == 42")
    kernel.kc.shell_channel.send(
        kernel.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {"value": 42}})
    )
    assert kernel.reply_to(msg_id)["content"]["status"] == "ok"
    assert kernel.reply_to(next_id)["content"]["status"] == "ok"


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("1/0", "error"),
        ("class Test:\n    def __repr__(self):\n        1 / 0\nTest()", "error"),
        ("ip = get_ipython()\ntry:\n    1 / 0\nexcept:\n    ip.showtraceback()", "ok"),
    ],
    ids=["runtime-error", "display-formatting-error", "explicit-showtraceback-ok"],
)
def test_reply_status_follows_ipykernel(kernel: Frontend, code: str, status: str) -> None:
    """ipykernel's test_execute_reply_error_status: a result whose repr raises
    fails the cell (nbclient and papermill stop there); a traceback the code
    shows itself does not."""
    run = kernel.execute(code)
    assert run.status == status, run.reply["content"]
    if status == "error":
        assert run.reply["content"]["ename"] == "ZeroDivisionError"
        assert run.errors(), run.types
    # The failure is the cell's alone: the next result shows as usual.
    assert kernel.execute("40 + 2").reply["content"]["status"] == "ok"


# -- interrupts -----------------------------------------------------------------------


def test_interrupt_during_pdb_set_trace(kernel: Frontend) -> None:
    """ipykernel's test_interrupt_during_pdb_set_trace: the interrupt ends the
    debugger prompt; the cell and the one queued behind it are answered, by
    the same worker (no escalation, no restart)."""
    first = kernel.kc.execute("import pdb; pdb.set_trace()", allow_stdin=True)
    request = kernel.kc.get_stdin_msg(timeout=TIMEOUT)
    assert request["msg_type"] == "input_request"
    second = kernel.kc.execute("3 + 4")
    kernel.km.interrupt_kernel()
    assert kernel.reply_to(first)["content"]["status"] in ("ok", "error")
    reply = kernel.reply_to(second)
    assert reply["content"]["status"] in ("ok", "aborted")
    assert kernel.same_kernel()
    run = kernel.execute("print('after')")
    assert run.stdout() == "after\n"
    assert "WorkerDied" not in str(run.iopub)


# -- order and status -----------------------------------------------------------------


def test_shell_replies_come_in_request_order(kernel: Frontend) -> None:
    """ipykernel's test_non_execute_stop_on_error: requests sent behind a
    running cell are answered after it, in order, and not aborted."""
    kernel.kc.execute("import time\ntime.sleep(0.5)\nraise ValueError")
    kernel.kc.kernel_info()
    kernel.kc.comm_info()
    kernel.kc.inspect(code="print")
    replies = [kernel.kc.get_shell_msg(timeout=TIMEOUT) for _ in range(4)]
    assert [r["msg_type"] for r in replies] == [
        "execute_reply",
        "kernel_info_reply",
        "comm_info_reply",
        "inspect_reply",
    ]
    assert [r["content"]["status"] for r in replies] == ["error", "ok", "ok", "ok"]


@pytest.mark.parametrize("msg_type", ["kernel_info_request", "usage_request", "no_such_request"])
def test_control_requests_are_wrapped_in_busy_and_idle(kernel: Frontend, msg_type: str) -> None:
    """As ipykernel: busy and idle on iopub around every control request,
    with the request as parent (jupyter_server's execution-state tracking
    waits for that idle)."""
    msg = kernel.kc.session.msg(msg_type, {})
    kernel.kc.control_channel.send(msg)
    reply = kernel.kc.get_control_msg(timeout=TIMEOUT)
    assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
    iopub = kernel.iopub_of(msg["header"]["msg_id"])
    states = [m["content"]["execution_state"] for m in iopub if m["msg_type"] == "status"]
    assert states == ["busy", "idle"]


def test_control_answers_with_busy_and_idle_while_a_cell_runs(kernel: Frontend) -> None:
    cell = kernel.start_cell("import time\ntime.sleep(1)")
    msg = kernel.kc.session.msg("kernel_info_request", {})
    kernel.kc.control_channel.send(msg)
    assert kernel.kc.get_control_msg(timeout=5)["content"]["status"] == "ok"
    iopub = kernel.iopub_of(msg["header"]["msg_id"], timeout=5)
    assert [m["content"]["execution_state"] for m in iopub] == ["busy", "idle"]
    assert kernel.reply_to(cell)["content"]["status"] == "ok"


# -- the process ----------------------------------------------------------------------


def test_sys_path_is_ipykernels(kernel: Frontend, tmp_path: Any) -> None:
    """``''`` on sys.path before site-packages, not the directory the worker
    started in: after ``os.chdir(d)``, ``import mod`` finds ``d/mod.py``."""
    (tmp_path / "parity_probe_mod.py").write_text("VALUE = 'found'\n")
    run = kernel.execute(
        "import os, sys\n"
        "here = os.getcwd()\n"
        f"os.chdir({str(tmp_path)!r})\n"
        "try:\n"
        "    import parity_probe_mod\n"
        "    print(parity_probe_mod.VALUE)\n"
        "finally:\n"
        "    os.chdir(here)\n"
        "print(sys.path.index('') < min(i for i, p in enumerate(sys.path) if 'site-packages' in p))\n"
        "print(sys.path[0] != os.getcwd())\n"
    )
    assert run.status == "ok", run.reply["content"]
    # (The working directory may stand later in sys.path: an editable
    # install's .pth file puts the checkout there.)
    assert run.stdout() == "found\nTrue\nTrue\n"


def test_a_printed_line_is_one_stream_message(kernel: Frontend) -> None:
    """print() writes its text and its end as one piece: no cell's line is
    split across two stream messages, however busy the machine."""
    msg_ids = [kernel.kc.execute(f"print({i})") for i in range(60)]
    outputs = kernel.iopub_of_all(msg_ids)
    for i, msg_id in enumerate(msg_ids):
        texts = [m["content"]["text"] for m in outputs[msg_id] if m["msg_type"] == "stream"]
        assert texts == [f"{i}\n"], (i, texts)


def test_print_keeps_its_semantics(kernel: Frontend) -> None:
    run = kernel.execute(
        "import io, sys\n"
        "buf = io.StringIO()\n"
        "print('a', 'b', sep='-', end='!', file=buf)\n"
        "print(buf.getvalue())\n"
        "print(1, None, 2.5, sep=None, end=None)\n"
        "print(file=sys.stderr)\n"
        "print('x', end='', flush=True)\n"
        "print()\n"
        "try:\n"
        "    print('z', sep=3)\n"
        "except TypeError as exc:\n"
        "    print(exc)\n"
    )
    assert run.status == "ok", run.reply["content"]
    assert run.stdout() == "a-b!\n1 None 2.5\nx\nsep must be None or a string, not int\n"
    assert run.stderr() == "\n"


def test_cell_streams_behave_as_files() -> None:
    """The worker's stdout wrapper, in process: writes pass through, and a
    write from another cell's context is sent to that cell."""
    from pyrepl3_kernel.protocol import OutputMessage
    from pyrepl3_kernel.worker import output

    class Outlet:
        parent_id: str | None = "cell-2"

        def __init__(self) -> None:
            self.sent: list[Any] = []

        def emit(self, msg: Any) -> None:
            self.sent.append(msg)

    raw = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    outlet = Outlet()
    stream = output.CellStream(raw, "stdout", outlet)
    output.print("same", "line", file=stream)
    token = output.cell_parent.set("cell-1")
    try:
        output.print("from a task", file=stream)
    finally:
        output.cell_parent.reset(token)
    raw.flush()
    assert raw.buffer.getvalue() == b"same line\n"  # type: ignore[attr-defined]
    assert [(type(m), m.data, m.parent_id, m.stream) for m in outlet.sent] == [
        (OutputMessage, "from a task\n", "cell-1", "stdout")
    ]
    assert stream.encoding == "utf-8" and stream.writable() and not stream.isatty()


# -- threads ---------------------------------------------------------------------------

THREAD_CELL = """\
from threading import Event, Thread
from IPython.display import display

explicit_parent = {explicit!r}
parent = get_ipython().get_parent()
cell_start_event = Event()
cell_end_event = Event()
first_written = Event()

def thread_target():
    if explicit_parent == "global":
        get_ipython().set_parent(parent)
    elif explicit_parent == "thread-local":
        reset_parent_token = get_ipython().set_thread_parent(parent)
    print("before", flush=True)
    display(1)
    first_written.set()
    cell_start_event.wait(timeout=10)
    cell_start_event.clear()
    print("during", flush=True)
    display(2)
    if explicit_parent == "thread-local":
        get_ipython().reset_thread_parent(reset_parent_token)
    cell_end_event.set()
    cell_start_event.wait(timeout=10)
    cell_start_event.clear()
    print("after", flush=True)
    display(3)

thread = Thread(target=thread_target)
thread.start()
# Until the thread has written: with no parent of its own, what it writes
# after this cell ended and the next began is the next one's (in ipykernel
# too, whose fallback is the last parent), and a loaded machine may not run
# the thread that soon.
first_written.wait(timeout=10)
"""


@pytest.mark.parametrize("explicit", ["global", "thread-local", "none"])
def test_thread_output_goes_to_its_parent(kernel: Frontend, explicit: str) -> None:
    """ipykernel's test_print_to_correct_cell_from_thread: a thread prints to
    the running cell, unless it set a parent with ipykernel's shell API
    (``set_parent``, ``set_thread_parent``), which holds until reset."""
    cells = [
        THREAD_CELL.format(explicit=explicit),
        "cell_start_event.set()\ncell_end_event.wait(timeout=10)",
        "cell_start_event.set()\nthread.join()",
    ]
    outputs: dict[str, dict[str, Any]] = {}
    ids = []
    for code in cells:
        msg_id = kernel.kc.execute(code)
        ids.append(msg_id)
        outputs[msg_id] = {"stdout": "", "shown": []}
        deadline = time.monotonic() + TIMEOUT
        while True:
            msg = kernel.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            to = outputs.get(msg["parent_header"].get("msg_id"))
            if to is None:
                continue
            if msg["msg_type"] == "stream":
                to["stdout"] += msg["content"]["text"]
            elif msg["msg_type"] == "display_data":
                to["shown"].append(msg["content"]["data"]["text/plain"])
            elif (
                msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"]["msg_id"] == msg_id
            ):
                break
        assert kernel.reply_to(msg_id)["content"]["status"] == "ok"
    first, second, third = (outputs[i] for i in ids)
    if explicit == "global":
        assert first == {"stdout": "before\nduring\nafter\n", "shown": ["1", "2", "3"]}
        assert second == third == {"stdout": "", "shown": []}
    elif explicit == "thread-local":
        assert first == {"stdout": "before\nduring\n", "shown": ["1", "2"]}
        assert second == {"stdout": "", "shown": []}
        assert third == {"stdout": "after\n", "shown": ["3"]}
    else:
        assert first == {"stdout": "before\n", "shown": ["1"]}
        assert second == {"stdout": "during\n", "shown": ["2"]}
        assert third == {"stdout": "after\n", "shown": ["3"]}


def test_a_thread_writing_between_cells_writes_to_the_last_cell(
    kernel: Frontend, tmp_path: Any
) -> None:
    """A thread a cell started, with no parent of its own, that writes once
    that cell has ended and before the next starts: its line and display go
    to that cell (ipykernel's global parent), not nowhere."""
    go = tmp_path / "go"
    cell = (
        "import os, time, threading\n"
        "from IPython.display import display\n"
        "def late():\n"
        "    for _ in range(2000):\n"
        f"        if os.path.exists({str(go)!r}):\n"
        "            break\n"
        "        time.sleep(0.01)\n"
        "    print('late', flush=True)\n"
        "    display('shown late')\n"
        "late_thread = threading.Thread(target=late)\n"
        "late_thread.start()\n"
    )
    msg_id = kernel.kc.execute(cell)
    assert kernel.reply_to(msg_id)["content"]["status"] == "ok"
    go.write_text("")  # the cell has ended (its reply is in): now the thread writes
    got: dict[str, Any] = {"stdout": "", "shown": []}
    deadline = time.monotonic() + TIMEOUT
    while (got["stdout"], got["shown"]) != ("late\n", ["'shown late'"]):
        assert time.monotonic() < deadline, got
        try:
            msg = kernel.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        except Exception:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            got["stdout"] += msg["content"]["text"]
        elif msg["msg_type"] == "display_data":
            got["shown"].append(msg["content"]["data"]["text/plain"])
    kernel.execute("late_thread.join()")


def test_stdout_knows_the_master_process(kernel: Frontend) -> None:
    """ipykernel's _check_master: ``sys.stdout._is_master_process()`` is True
    in the kernel and False in a process forked from it."""
    run = kernel.execute(
        "import os, sys\n"
        "print(sys.stdout._is_master_process())\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.write(1, str(sys.stdout._is_master_process()).encode() + b'\\n')\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    assert run.status == "ok", run.reply["content"]
    assert sorted(run.stdout().split()) == ["False", "True"]


# -- the kernel's command line ----------------------------------------------------------


def test_cold_kernel_takes_ipykernels_command_line_options(tmp_path: Any) -> None:
    """nbclient passes ``--HistoryManager.hist_file=:memory:`` to any kernel
    named python3, ipykernel's tests ``--profile-dir DIR``: the standalone
    kernel takes them as ipykernel does, as IPython configuration."""
    from jupyter_client.manager import KernelManager
    from jupyter_helpers import COLD_KERNEL_NAME

    km = KernelManager(kernel_name=COLD_KERNEL_NAME)
    km.start_kernel(
        extra_arguments=["--HistoryManager.hist_file=:memory:", "--profile-dir", str(tmp_path)]
    )
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        printed: list[str] = []

        def hook(msg: Msg) -> None:
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])

        reply = kc.execute_interactive(
            "print(get_ipython().history_manager.hist_file)", timeout=TIMEOUT, output_hook=hook
        )
        assert reply["content"]["status"] == "ok"
        assert "".join(printed) == ":memory:\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_command_line_options_are_sorted_out() -> None:
    from pyrepl3_kernel.gateway.standalone import ipython_options

    options, unknown = ipython_options(
        ["--HistoryManager.hist_file=:memory:", "--profile-dir", "/p", "--bogus", "x"]
    )
    assert options == ["HistoryManager.hist_file=:memory:", "ProfileDir.location=/p"]
    assert unknown == ["--bogus", "x"]
