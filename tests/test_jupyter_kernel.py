"""The ``pyrepl3`` kernel through jupyter_client, as a frontend sees it.

Every test runs against both kernelspecs (see conftest): ``pyrepl3``, leased
from the manager daemon by the pool provisioner, and ``pyrepl3-cold``, a
standalone kernel process. One kernel per kernelspec serves the whole module
(``kernel``); tests that must end a kernel start their own. Every kernel is
shut down in a ``finally``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from queue import Empty
from typing import Any

import psutil
import pytest
import zmq
from frontend import Frontend
from jupyter_client.session import Session as JupyterSession
from jupyter_helpers import KERNEL_NAMES, TIMEOUT, Msg, Run

from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")

PROMPT = 5.0


@pytest.fixture(params=KERNEL_NAMES)
def own_kernel(request: pytest.FixtureRequest) -> Iterator[Frontend]:
    fe = Frontend(request.param)
    try:
        yield fe
    finally:
        fe.close()


def error_of(run: Run) -> Msg:
    errors = [m for m in run.iopub if m["msg_type"] == "error"]
    assert len(errors) == 1, run.types
    return errors[0]


# -- stdin ---------------------------------------------------------------------------


def answer_input(kernel: Frontend, code: str, answer: str) -> tuple[Msg, Run]:
    started = time.monotonic()
    msg_id = kernel.kc.execute(code, allow_stdin=True)
    request = kernel.kc.get_stdin_msg(timeout=TIMEOUT)
    assert request["msg_type"] == "input_request"
    assert request["parent_header"]["msg_id"] == msg_id
    kernel.kc.input(answer)
    return request, kernel.finish(msg_id, started)


def test_input_is_answered_through_stdin_channel(kernel: Frontend) -> None:
    request, run = answer_input(kernel, "name = input('Name? ')", "Ada Lovelace")
    assert request["content"] == {"prompt": "Name? ", "password": False}
    assert run.status == "ok"
    assert kernel.value("name") == "'Ada Lovelace'"


def test_getpass_asks_for_a_password(kernel: Frontend) -> None:
    request, run = answer_input(
        kernel, "import getpass\npw = getpass.getpass('Secret: ')", "s3cr3t"
    )
    assert request["content"] == {"prompt": "Secret: ", "password": True}
    assert run.status == "ok"
    assert kernel.value("pw") == "'s3cr3t'"


def test_input_without_stdin_fails_at_once(kernel: Frontend) -> None:
    run = kernel.execute("input('never answered')", allow_stdin=False, timeout=TIMEOUT)
    assert run.elapsed < PROMPT
    assert run.status == "error"
    assert run.reply["content"]["ename"] == "StdinNotImplementedError"
    assert error_of(run)["content"]["ename"] == "StdinNotImplementedError"
    with pytest.raises(Empty):
        kernel.kc.get_stdin_msg(timeout=0.2)


# -- interrupts ----------------------------------------------------------------------


def assert_interrupted(kernel: Frontend, msg_id: str, interrupted_at: float) -> None:
    run = kernel.finish(msg_id, interrupted_at)
    assert run.elapsed < PROMPT, f"the interrupt took {run.elapsed:.1f} s"
    assert run.status == "error"
    assert run.reply["content"]["ename"] == "KeyboardInterrupt"
    assert error_of(run)["content"]["ename"] == "KeyboardInterrupt"
    assert kernel.execute("print('next')").stdout() == "next\n"


def test_interrupt_request_stops_a_sleep(kernel: Frontend) -> None:
    msg_id = kernel.start_cell("import time\ntime.sleep(60)")
    interrupted_at = time.monotonic()
    kernel.km.interrupt_kernel()  # interrupt_mode "message": an interrupt_request on control
    assert_interrupted(kernel, msg_id, interrupted_at)


def test_interrupt_reply_on_control(kernel: Frontend) -> None:
    msg_id = kernel.start_cell("import time\ntime.sleep(60)")
    interrupted_at = time.monotonic()
    msg = kernel.kc.session.msg("interrupt_request", {})
    kernel.kc.control_channel.send(msg)
    reply = kernel.kc.get_control_msg(timeout=PROMPT)
    assert reply["msg_type"] == "interrupt_reply"
    assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
    assert reply["content"]["status"] == "ok"
    assert_interrupted(kernel, msg_id, interrupted_at)


def test_interrupt_a_pending_input(kernel: Frontend) -> None:
    msg_id = kernel.kc.execute("answer = input('wait: ')", allow_stdin=True)
    request = kernel.kc.get_stdin_msg(timeout=TIMEOUT)
    assert request["content"]["prompt"] == "wait: "
    interrupted_at = time.monotonic()
    kernel.km.interrupt_kernel()
    assert_interrupted(kernel, msg_id, interrupted_at)
    assert kernel.value("'answer' in globals()") == "False"


def test_sigint_via_kernel_manager_interrupts(kernel: Frontend) -> None:
    msg_id = kernel.start_cell("import time\ntime.sleep(60)")
    interrupted_at = time.monotonic()
    # Cold: SIGINT to the kernel's process group; pooled: the provisioner
    # asks the daemon to interrupt the lease.
    kernel.km.signal_kernel(signal.SIGINT)
    assert_interrupted(kernel, msg_id, interrupted_at)


def test_sigint_to_gateway_process_interrupts(kernel: Frontend) -> None:
    if kernel.gateway_pid is None:
        pytest.skip(
            "a pooled kernel's gateway lives in the shared daemon, not in a process of its own"
        )
    msg_id = kernel.start_cell("import time\ntime.sleep(60)")
    interrupted_at = time.monotonic()
    os.kill(kernel.gateway_pid, signal.SIGINT)
    assert_interrupted(kernel, msg_id, interrupted_at)
    assert psutil.pid_exists(kernel.gateway_pid)


# -- queued cells and stop_on_error --------------------------------------------------


def send_three(kernel: Frontend, first: str, stop_on_error: bool) -> list[Run]:
    started = time.monotonic()
    ids = [kernel.kc.execute(first, stop_on_error=stop_on_error)]
    ids.append(kernel.kc.execute("ran_second = True"))
    ids.append(kernel.kc.execute("ran_third = True"))
    replies = [kernel.reply_to(msg_id) for msg_id in ids]
    iopub = kernel.iopub_of_all(ids)
    elapsed = time.monotonic() - started
    return [Run(reply, iopub[msg_id], elapsed) for reply, msg_id in zip(replies, ids, strict=True)]


def test_stop_on_error_aborts_queued_cells(kernel: Frontend) -> None:
    kernel.execute("ran_second = ran_third = False")
    runs = send_three(kernel, "import time\ntime.sleep(0.5)\n1/0", stop_on_error=True)
    assert [r.status for r in runs] == ["error", "aborted", "aborted"]
    for run in runs[1:]:
        # An aborted request still gets busy ... idle, and nothing runs.
        assert [m["content"].get("execution_state") for m in run.iopub] == ["busy", "idle"]
    assert kernel.value("(ran_second, ran_third)") == "(False, False)"


def test_without_stop_on_error_queued_cells_run(kernel: Frontend) -> None:
    kernel.execute("ran_second = ran_third = False")
    runs = send_three(kernel, "import time\ntime.sleep(0.5)\n1/0", stop_on_error=False)
    assert [r.status for r in runs] == ["error", "ok", "ok"]
    assert kernel.value("(ran_second, ran_third)") == "(True, True)"


# -- message order -------------------------------------------------------------------


def test_execute_message_order(kernel: Frontend) -> None:
    code = (
        "from IPython.display import display, HTML\n"
        "print('one')\n"
        "display(HTML('<i>two</i>'))\n"
        "print('three', end='')\n"
        "4"
    )
    run = kernel.execute(code)
    assert run.status == "ok"
    merged = run.merged()
    types = [t for t, _ in merged]
    assert types == [
        "status",
        "execute_input",
        "stream",
        "display_data",
        "stream",
        "execute_result",
        "status",
    ]
    assert [merged[0][1], merged[-1][1]] == [
        {"execution_state": "busy"},
        {"execution_state": "idle"},
    ]
    assert merged[2][1] == {"name": "stdout", "text": "one\n"}
    assert merged[3][1]["data"]["text/html"] == "<i>two</i>"
    assert merged[4][1] == {"name": "stdout", "text": "three"}
    assert merged[5][1]["data"]["text/plain"] == "4"
    count = run.reply["content"]["execution_count"]
    assert merged[1][1]["execution_count"] == count
    assert merged[5][1]["execution_count"] == count
    # The reply goes out after the last output and before idle.
    assert (
        run.iopub[-2]["header"]["date"]
        <= run.reply["header"]["date"]
        <= run.iopub[-1]["header"]["date"]
    )


def test_stream_output_precedes_the_error(kernel: Frontend) -> None:
    run = kernel.execute(
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\nraise RuntimeError('boom')"
    )
    merged = run.merged()
    assert [t for t, _ in merged] == [
        "status",
        "execute_input",
        "stream",
        "stream",
        "error",
        "status",
    ]
    assert [merged[2][1], merged[3][1]] == [
        {"name": "stdout", "text": "out\n"},
        {"name": "stderr", "text": "err\n"},
    ]


def test_many_prints_all_arrive_before_the_result(kernel: Frontend) -> None:
    run = kernel.execute("for i in range(2000):\n    print(i)\n'done'")
    assert run.stdout() == "".join(f"{i}\n" for i in range(2000))
    assert run.types[-2:] == ["execute_result", "status"]


REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "kernel_info": ("kernel_info_request", {}),
    "execute": ("execute_request", {"code": "1+1", "silent": False}),
    "complete": ("complete_request", {"code": "pri", "cursor_pos": 3}),
    "inspect": ("inspect_request", {"code": "len", "cursor_pos": 3, "detail_level": 0}),
    "history": (
        "history_request",
        {"hist_access_type": "tail", "n": 3, "output": False, "raw": True},
    ),
    "is_complete": ("is_complete_request", {"code": "for i in x:"}),
    "comm_info": ("comm_info_request", {}),
    "unknown": ("no_such_request", {}),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_every_request_is_wrapped_in_busy_and_idle(kernel: Frontend, name: str) -> None:
    msg_type, content = REQUESTS[name]
    msg_id = kernel.send_shell(msg_type, content)
    reply = kernel.reply_to(msg_id)
    assert reply["msg_type"] == msg_type.replace("_request", "_reply")
    iopub = kernel.iopub_of(msg_id)
    states = [m["content"]["execution_state"] for m in iopub if m["msg_type"] == "status"]
    assert states == ["busy", "idle"]
    assert iopub[0]["msg_type"] == "status"
    assert all(m["parent_header"]["msg_id"] == msg_id for m in iopub)
    assert all(m["parent_header"]["msg_type"] == msg_type for m in iopub)


def test_kernel_info_advertises_subshells_and_the_debugger(kernel: Frontend) -> None:
    reply = kernel.kc.kernel_info(reply=True, timeout=TIMEOUT)
    content = reply["content"]
    assert content["status"] == "ok"
    assert content["protocol_version"].startswith("5.")
    # debugpy comes with ipykernel: the debugger is on (tests/test_debugger.py)
    assert content["debugger"] is True
    features = content.get("supported_features", [])
    assert "debugger" in features
    assert "kernel subshells" in features  # tests/test_subshells.py
    # The control channel answers kernel_info too.
    msg = kernel.kc.session.msg("kernel_info_request", {})
    kernel.kc.control_channel.send(msg)
    control = kernel.kc.get_control_msg(timeout=TIMEOUT)
    assert control["msg_type"] == "kernel_info_reply"
    assert control["content"]["debugger"] is True


# -- comms and widgets -----------------------------------------------------------------

ECHO_TARGET = """
echoed = []
def echo_target(comm, open_msg):
    echoed.append(open_msg['content']['data'])
    @comm.on_msg
    def _on_msg(msg):
        payload = [bytes(b) for b in msg['buffers']]
        echoed.append((msg['content']['data'], payload))
        comm.send({'echo': msg['content']['data']}, buffers=[b'pong:' + b''.join(payload)])
get_ipython().kernel.comm_manager.register_target('pyrepl3.test.echo', echo_target)
"""


def iopub_of_type(kernel: Frontend, msg_type: str, timeout: float = TIMEOUT) -> Msg:
    deadline = time.monotonic() + timeout
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["msg_type"] == msg_type:
            return msg


def test_comm_round_trip_with_buffers(kernel: Frontend) -> None:
    assert kernel.execute(ECHO_TARGET).status == "ok"
    comm_id = uuid.uuid4().hex
    open_id = kernel.send_shell(
        "comm_open", {"comm_id": comm_id, "target_name": "pyrepl3.test.echo", "data": {"hello": 1}}
    )
    kernel.iopub_of(open_id)

    info = kernel.kc.comm_info(target_name="pyrepl3.test.echo")
    comms = kernel.reply_to(info)["content"]["comms"]
    assert comms == {comm_id: {"target_name": "pyrepl3.test.echo"}}

    msg_id = kernel.send_shell(
        "comm_msg", {"comm_id": comm_id, "data": {"n": 42}}, buffers=[b"\x00\x01binary"]
    )
    echo = iopub_of_type(kernel, "comm_msg")
    assert echo["content"] == {"comm_id": comm_id, "data": {"echo": {"n": 42}}}
    assert echo["parent_header"]["msg_id"] == msg_id
    assert [bytes(b) for b in echo["buffers"]] == [b"pong:\x00\x01binary"]
    assert kernel.value("echoed") == "[{'hello': 1}, ({'n': 42}, [b'\\x00\\x01binary'])]"

    close_id = kernel.send_shell("comm_close", {"comm_id": comm_id, "data": {}})
    kernel.iopub_of(close_id)
    info = kernel.kc.comm_info()
    assert comm_id not in kernel.reply_to(info)["content"]["comms"]


def test_ipywidgets_slider_syncs_with_the_frontend(kernel: Frontend) -> None:
    run = kernel.execute(
        "import ipywidgets\nfrom IPython.display import display\nslider = ipywidgets.IntSlider()\ndisplay(slider)"
    )
    assert run.status == "ok"
    opens = [m for m in run.iopub if m["msg_type"] == "comm_open"]
    assert opens and all(m["content"]["target_name"] == "jupyter.widget" for m in opens)
    displays = [m for m in run.iopub if m["msg_type"] == "display_data"]
    assert len(displays) == 1
    view = displays[0]["content"]["data"]["application/vnd.jupyter.widget-view+json"]
    model_id = view["model_id"]
    slider_open = [m for m in opens if m["content"]["comm_id"] == model_id]
    assert len(slider_open) == 1
    assert slider_open[0]["content"]["data"]["state"]["_model_name"] == "IntSliderModel"
    assert kernel.value("slider.model_id") == repr(model_id)

    msg_id = kernel.send_shell(
        "comm_msg",
        {
            "comm_id": model_id,
            "data": {"method": "update", "state": {"value": 5}, "buffer_paths": []},
        },
    )
    kernel.iopub_of(msg_id)
    assert kernel.value("slider.value") == "5"

    # And kernel -> frontend: a change in the kernel is sent as an update.
    run = kernel.execute("slider.value = 7")
    updates = [
        m for m in run.iopub if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == model_id
    ]
    assert updates and updates[-1]["content"]["data"] == {
        "method": "update",
        "state": {"value": 7},
        "buffer_paths": [],
    }


# -- worker crashes --------------------------------------------------------------------

CRASHES = {
    "os._exit": ("import os\nos._exit(3)", "exit code 3"),
    "segfault": ("import ctypes\nctypes.string_at(0)", "SIGSEGV"),
    "sigkill": ("import os\nos.kill(os.getpid(), 9)", "SIGKILL"),
}


@pytest.mark.parametrize("case", list(CRASHES))
def test_worker_crash_is_reported_on_the_cell(kernel: Frontend, case: str) -> None:
    code, cause = CRASHES[case]
    kernel.execute("survivor = 1")
    run = kernel.execute(code)
    assert run.status == "error"
    error = error_of(run)["content"]
    assert cause in error["evalue"], error
    assert run.types[0] == "status" and run.types[-1] == "status"
    assert run.iopub[-1]["content"]["execution_state"] == "idle"

    after = kernel.execute("print('still here')")
    assert after.status == "ok" and after.stdout() == "still here\n"
    states = {
        m["content"]["execution_state"]
        for m in run.iopub + after.iopub
        if m["msg_type"] == "status"
    }
    assert states == {"busy", "idle"}  # never "restarting" nor "dead"
    # Nothing else arrived on iopub that says so either.
    try:
        while True:
            msg = kernel.kc.get_iopub_msg(timeout=0.2)
            assert msg["content"].get("execution_state") not in (
                "restarting",
                "dead",
                "starting",
            ), msg
    except Empty:
        pass
    assert kernel.km.is_alive()
    assert kernel.same_kernel()


def test_cell_queued_behind_a_crash_is_aborted(kernel: Frontend) -> None:
    kernel.execute("ran_second = False")
    runs = send_three(kernel, "import os, time\ntime.sleep(0.5)\nos._exit(3)", stop_on_error=False)
    # A crash aborts what was queued behind it even without stop_on_error:
    # those cells were written for a namespace that no longer exists.
    assert [r.status for r in runs] == ["error", "aborted", "aborted"]
    assert "exit code 3" in error_of(runs[0])["content"]["evalue"]
    assert kernel.execute("print('fine')").stdout() == "fine\n"
    assert kernel.value("'ran_second' in globals() and ran_second") == "False"


# -- malformed input ---------------------------------------------------------------------


def test_malformed_and_forged_messages_are_dropped(kernel: Frontend) -> None:
    info = kernel.km.get_connection_info()
    url = f"{info['transport']}://{info['ip']}:"
    ctx = zmq.Context.instance()
    forged = JupyterSession(key=b"not-the-key", signature_scheme="hmac-sha256")
    for channel in ("shell", "control"):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(url + str(info[f"{channel}_port"]))
        try:
            sock.send_multipart([b"garbage"])
            sock.send_multipart([b"<IDS|MSG>", b"no-signature", b"{", b"}", b"[", b"]"])
            sock.send_multipart([b"<IDS|MSG>", b"", b"{}", b"{}", b"{}", b"{}"])
            sock.send_multipart([b"<IDS|MSG>"])
            sock.send_multipart([b"\xff" * 100, b"<IDS|MSG>", b"\x00" * 64] + [b"\xfe\xff"] * 4)
            # Well formed, but signed with the wrong key: must never run.
            forged.send(
                sock, forged.msg("execute_request", {"code": "forged_ran = True", "silent": False})
            )
            assert sock.poll(500) == 0, "the kernel answered a malformed message"
        finally:
            sock.close()
    reply = kernel.kc.kernel_info(reply=True, timeout=TIMEOUT)
    assert reply["content"]["status"] == "ok"
    assert kernel.value("'forged_ran' in globals()") == "False"
    assert kernel.execute("print('ok')").stdout() == "ok\n"


# -- shutdown ---------------------------------------------------------------------------


def daemon_leases() -> list[dict[str, Any]]:
    status = DaemonClient(DaemonPaths.default(), timeout=10).call("status")
    return list(status["leases"])


def test_shutdown_request_leaves_no_processes(own_kernel: Frontend) -> None:
    fe = own_kernel
    assert fe.execute("import os\nworker_pid = os.getpid()").status == "ok"
    worker_pid = int(fe.value("worker_pid"))
    if fe.gateway_pid is not None:
        gateway = psutil.Process(fe.gateway_pid)
        procs = [gateway, *gateway.children(recursive=True)]
        assert worker_pid in {p.pid for p in procs}
    else:
        # The daemon (which stays, by design) hosts the gateway; the lease's
        # worker is the kernel's only process.
        procs = [psutil.Process(worker_pid)]
        assert fe.km.kernel_id in {lease["kernel_id"] for lease in daemon_leases()}

    msg_id = fe.kc.shutdown()
    reply = fe.kc.get_control_msg(timeout=TIMEOUT)
    assert reply["msg_type"] == "shutdown_reply"
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"] == {"status": "ok", "restart": False}
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert alive == [], f"still running after shutdown_request: {alive}"
    # A pooled kernel counts as running until the daemon has also closed its
    # ports, a moment after its worker is gone.
    deadline = time.monotonic() + 10
    while fe.km.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fe.km.is_alive()
    if fe.pooled:
        assert fe.km.kernel_id not in {lease["kernel_id"] for lease in daemon_leases()}


def test_module_kernel_is_the_installed_pyrepl3_spec(shared: Frontend) -> None:
    # Sanity check that the module's kernel really is the installed spec.
    spec = shared.km.kernel_spec
    assert spec is not None and spec.argv[1:3] == ["-m", "pyrepl3_kernel"]
    assert spec.interrupt_mode == "message"
    provisioner = spec.metadata.get("kernel_provisioner", {}).get("provisioner_name")
    assert provisioner == ("pyrepl3-pool" if shared.pooled else None)
    assert shared.km.get_connection_info()["signature_scheme"] == "hmac-sha256"
