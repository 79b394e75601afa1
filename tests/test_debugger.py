"""The JupyterLab debugger (Debug Adapter Protocol over debug_request /
debug_reply on control and debug_event on iopub), driven through
jupyter_client as JupyterLab's debugger panel drives it, on both kernelspecs.

One kernel per kernelspec for the module; each test leaves the debugger
detached and no thread stopped.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_helpers import COLD_KERNEL_NAME, KERNEL_NAME, TIMEOUT

pytest.importorskip("debugpy")

INITIALIZE = {
    "clientID": "test-client",
    "clientName": "testClient",
    "adapterID": "python",
    "pathFormat": "path",
    "linesStartAt1": True,
    "columnsStartAt1": True,
    "supportsVariableType": True,
    "supportsVariablePaging": True,
    "supportsRunInTerminalRequest": True,
    "locale": "en",
}

CELL = """def f(a, b):
    c = a + b
    return c

f(2, 3)"""


class Debug:
    """A debugger client on a :class:`frontend.Frontend`: requests on the
    control channel, events from iopub (the iopub messages read on the way
    are kept for :meth:`finish`)."""

    def __init__(self, fe: Any) -> None:
        self.fe = fe
        self.kc = fe.kc
        self._seq = itertools.count(1)
        self.iopub: list[dict[str, Any]] = []

    def request(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.request_full(command, arguments)["content"]  # type: ignore[no-any-return]

    def request_full(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        msg = self.kc.session.msg(
            "debug_request",
            {"type": "request", "seq": next(self._seq), "command": command,
             "arguments": arguments or {}},
        )  # fmt: skip
        self.kc.control_channel.send(msg)
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self.kc.control_channel.get_msg(timeout=max(0.01, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                assert reply["msg_type"] == "debug_reply"
                return reply  # type: ignore[no-any-return]

    def event(self, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next debug_event ``name`` (the content)."""
        for i, msg in enumerate(self.iopub):
            if msg["msg_type"] == "debug_event" and msg["content"].get("event") == name:
                del self.iopub[: i + 1]
                return msg["content"]  # type: ignore[no-any-return]
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["msg_type"] == "debug_event" and msg["content"].get("event") == name:
                return msg["content"]  # type: ignore[no-any-return]
            self.iopub.append(msg)

    def stopped_again(self, msg_id: str) -> bool:
        """After a continue: True at the next stopped event, False when the
        cell ``msg_id`` went idle instead (its messages are kept)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["msg_type"] == "debug_event" and msg["content"].get("event") == "stopped":
                return True
            self.iopub.append(msg)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                return False

    def finish(self, msg_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The execute_reply of ``msg_id`` and its iopub messages up to idle."""
        reply = self.fe.reply_to(msg_id)
        mine = [m for m in self.iopub if m["parent_header"].get("msg_id") == msg_id]
        self.iopub = [m for m in self.iopub if m["parent_header"].get("msg_id") != msg_id]
        deadline = time.monotonic() + TIMEOUT
        while not any(
            m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" for m in mine
        ):
            msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                mine.append(msg)
            else:
                self.iopub.append(msg)
        return reply, mine

    # -- the sequence JupyterLab runs ---------------------------------------------------

    def attach(self) -> dict[str, Any]:
        reply = self.request("initialize", INITIALIZE)
        assert reply["success"], reply.get("message")
        reply = self.request("attach")
        assert reply["success"], reply.get("message")
        info = self.request("debugInfo")
        assert info["body"]["isStarted"] is True
        return info  # type: ignore[no-any-return]

    def breakpoint_in(self, code: str, *lines: int) -> str:
        """Dump ``code`` as a cell and set breakpoints on ``lines``; its path."""
        source = self.request("dumpCell", {"code": code})["body"]["sourcePath"]
        reply = self.request(
            "setBreakpoints",
            {"breakpoints": [{"line": n} for n in lines], "source": {"path": source},
             "sourceModified": False},
        )  # fmt: skip
        assert reply["success"], reply
        assert [bp["verified"] for bp in reply["body"]["breakpoints"]] == [True] * len(lines)
        assert self.request("configurationDone")["success"]
        return str(source)

    def top_frame(self, thread_id: int) -> dict[str, Any]:
        frames = self.request("stackTrace", {"threadId": thread_id})["body"]["stackFrames"]
        return frames[0]  # type: ignore[no-any-return]

    def scope(self, frame_id: int, name: str) -> list[dict[str, Any]]:
        scopes = self.request("scopes", {"frameId": frame_id})["body"]["scopes"]
        ref = next(s for s in scopes if s["name"] == name)["variablesReference"]
        variables = self.request("variables", {"variablesReference": ref})
        assert variables["success"], variables
        return variables["body"]["variables"]  # type: ignore[no-any-return]

    def detach(self) -> None:
        self.request("disconnect", {"restart": False, "terminateDebuggee": True})


@pytest.fixture
def debug(kernel: Any) -> Iterator[Debug]:
    """The module's kernel with the debugger attached (detached afterwards)."""
    client = Debug(kernel)
    client.attach()
    try:
        yield client
    finally:
        client.detach()
        kernel.flush()


@pytest.fixture
def pooled(kernel: Any) -> Any:
    """The module's kernel, for what the worker does alike whichever way it
    was started: run on the pooled kernelspec only (keeps the module short)."""
    if not kernel.pooled:
        pytest.skip("the same worker code on both kernelspecs: checked on the pooled one")
    return kernel


@pytest.fixture
def debug_pooled(pooled: Any) -> Iterator[Debug]:
    """:func:`debug` on the pooled kernelspec only (see :func:`pooled`)."""
    client = Debug(pooled)
    client.attach()
    try:
        yield client
    finally:
        client.detach()
        pooled.flush()


def values(variables: list[dict[str, Any]]) -> dict[str, str]:
    return {v["name"]: v["value"] for v in variables}


# -- kernel_info and the kernelspec -------------------------------------------------------


def test_kernel_info_advertises_the_debugger(kernel: Any) -> None:
    reply = kernel.reply_to(kernel.kc.kernel_info())
    content = reply["content"]
    assert content["debugger"] is True
    assert "debugger" in content["supported_features"]


def test_kernelspec_metadata_says_debugger(pyrepl3_kernelspec: Path) -> None:
    import json

    for name in (KERNEL_NAME, COLD_KERNEL_NAME):
        spec = json.loads((pyrepl3_kernelspec.parent / name / "kernel.json").read_text())
        assert spec["metadata"]["debugger"] is True, name


def test_the_debugger_is_advertised_only_where_debugpy_imports(tmp_path: Path) -> None:
    import sys

    from pyrepl3_kernel.gateway.debugger import debugpy_importable
    from pyrepl3_kernel.gateway.translate import kernel_info_content
    from pyrepl3_kernel.protocol import ReadyMessage

    # kernel_info follows what the worker says in its READY.
    without = kernel_info_content(ReadyMessage(capabilities=["stdin", "interrupt"]))
    assert without["debugger"] is False and "debugger" not in without["supported_features"]
    with_it = kernel_info_content(ReadyMessage(capabilities=["stdin", "debugger"]))
    assert with_it["debugger"] is True and "debugger" in with_it["supported_features"]
    # The kernelspec's metadata.debugger: asked of the kernelspec's Python.
    assert debugpy_importable(None) and debugpy_importable(sys.executable)
    no_site = tmp_path / "python"  # this Python without site-packages: no debugpy
    no_site.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    no_site.chmod(0o755)
    assert debugpy_importable(str(no_site)) is False


# -- the DAP sequence ---------------------------------------------------------------------


def test_debug_info_before_attach_gives_the_cell_file_names(kernel: Any) -> None:
    client = Debug(kernel)
    info = client.request("debugInfo")
    body = info["body"]
    assert info["success"] and body["isStarted"] is False
    assert body["hashMethod"] == "Murmur2" and body["tmpFileSuffix"] == ".py"
    assert {"breakpoints", "stoppedThreads", "richRendering", "exceptionPaths"} <= set(body)
    # The file name JupyterLab computes for a cell is the one its code runs under.
    from ipykernel.compiler import murmur2_x86

    code = "import sys\nsys._getframe().f_code.co_filename"
    expected = f"{body['tmpFilePrefix']}{murmur2_x86(code, body['hashSeed'])}.py"
    reply, iopub = client.finish(kernel.kc.execute(code))
    result = next(m for m in iopub if m["msg_type"] == "execute_result")
    assert result["content"]["data"]["text/plain"] == repr(expected)
    # The variables panel before the debugger starts (debugpy not imported yet).
    reply, _ = client.finish(kernel.kc.execute("early = 'before any attach'"))
    variables = values(client.request("inspectVariables")["body"]["variables"])
    assert variables["early"] == "'before any attach'"
    # As ipykernel: IPYKERNEL_CELL_NAME names the cells instead (VS Code).
    named = "import os\nos.environ['IPYKERNEL_CELL_NAME'] = '/tmp/vscode-cell.py'"
    assert client.finish(kernel.kc.execute(named))[0]["content"]["status"] == "ok"
    try:
        _, iopub = client.finish(kernel.kc.execute("sys._getframe().f_code.co_filename"))
        result = next(m for m in iopub if m["msg_type"] == "execute_result")
        assert result["content"]["data"]["text/plain"] == "'/tmp/vscode-cell.py'"
    finally:
        kernel.execute("del os.environ['IPYKERNEL_CELL_NAME']")


def test_stop_at_breakpoint_inspect_and_continue(debug: Debug) -> None:
    source = debug.breakpoint_in(CELL, 2)
    assert debug.request("source", {"source": {"path": source}})["body"]["content"] == CELL
    modules = debug.request("modules", {"startModule": 0, "moduleCount": 50})["body"]
    assert modules["modules"] and modules["totalModules"] >= len(modules["modules"])
    info = debug.request("debugInfo")
    assert {"source": source, "breakpoints": [{"line": 2}]} in info["body"]["breakpoints"]
    msg_id = debug.kc.execute(CELL)
    stopped = debug.event("stopped")
    assert stopped["body"]["reason"] == "breakpoint"
    thread = stopped["body"]["threadId"]
    assert thread in debug.request("debugInfo")["body"]["stoppedThreads"]
    frames = debug.request("stackTrace", {"threadId": thread})["body"]["stackFrames"]
    frame = frames[0]
    assert frame["source"]["path"] == source and frame["line"] == 2
    # The stack ends at the cell: the worker's own frames are not shown.
    assert [f["name"] for f in frames] == ["f", "<module>"]
    assert values(debug.scope(frame["id"], "Locals")) == {"a": "2", "b": "3"}
    # evaluate in the stopped frame
    evaluated = debug.request(
        "evaluate", {"expression": "a * 10 + b", "frameId": frame["id"], "context": "watch"}
    )
    assert evaluated["body"]["result"] == "23"
    # richInspectVariables at a breakpoint, with frameId
    rich = debug.request("richInspectVariables", {"variableName": "a", "frameId": frame["id"]})
    assert rich["success"] and rich["body"]["data"] == {"text/plain": "2"}
    # The kernel's control channel answers while the main thread is stopped.
    request = debug.kc.session.msg("kernel_info_request", {})
    debug.kc.control_channel.send(request)
    kernel_info = debug.kc.control_channel.get_msg(timeout=10)
    assert kernel_info["parent_header"]["msg_id"] == request["header"]["msg_id"]
    assert kernel_info["content"]["debugger"] is True
    # step over: line 3, c computed
    debug.request("next", {"threadId": thread})
    debug.event("stopped")
    frame = debug.top_frame(thread)
    assert frame["line"] == 3
    assert values(debug.scope(frame["id"], "Locals"))["c"] == "5"
    assert debug.request("continue", {"threadId": thread})["success"]
    reply, iopub = debug.finish(msg_id)
    assert reply["content"]["status"] == "ok"
    result = next(m for m in iopub if m["msg_type"] == "execute_result")
    assert result["content"]["data"]["text/plain"] == "5"
    assert debug.request("debugInfo")["body"]["stoppedThreads"] == []


def test_breakpoint_in_a_function_of_an_earlier_cell_and_stepping(debug: Debug) -> None:
    earlier = "def g(x):\n    y = x + 1\n    return y * 2\n"
    debug.breakpoint_in(earlier, 2)
    reply, _ = debug.finish(debug.kc.execute(earlier))
    assert reply["content"]["status"] == "ok"
    # Source tracking keeps working while the debugger is attached.
    reply, iopub = debug.finish(debug.kc.execute("import inspect\nprint(inspect.getsource(g))"))
    out = "".join(m["content"]["text"] for m in iopub if m["msg_type"] == "stream")
    assert out == earlier + "\n"
    later = "def h():\n    return g(20)\n\nh()"
    debug.breakpoint_in(later)  # JupyterLab dumps every cell it runs
    msg_id = debug.kc.execute(later)
    stopped = debug.event("stopped")
    thread = stopped["body"]["threadId"]
    frame = debug.top_frame(thread)
    assert (frame["name"], frame["line"]) == ("g", 2)
    assert values(debug.scope(frame["id"], "Locals")) == {"x": "20"}
    # step out to h, then step in again from a fresh breakpoint-free call
    debug.request("stepOut", {"threadId": thread})
    debug.event("stopped")
    assert debug.top_frame(thread)["name"] == "h"
    debug.request("continue", {"threadId": thread})
    reply, iopub = debug.finish(msg_id)
    assert reply["content"]["status"] == "ok"
    # stepIn: stop in h, step into g
    debug.breakpoint_in(later, 2)
    msg_id = debug.kc.execute(later)
    thread = debug.event("stopped")["body"]["threadId"]
    assert debug.top_frame(thread)["name"] == "h"
    debug.request("stepIn", {"threadId": thread})
    debug.event("stopped")
    assert debug.top_frame(thread)["name"] == "g"
    debug.request("continue", {"threadId": thread})
    assert debug.finish(msg_id)[0]["content"]["status"] == "ok"
    # clear the earlier cell's breakpoint for the next tests
    debug.breakpoint_in(earlier)


def test_inspect_variables_and_rich_inspect_while_running_freely(debug_pooled: Debug) -> None:
    debug = debug_pooled
    reply, _ = debug.finish(debug.kc.execute("text = 'Hello the world'\nnumber = 42"))
    assert reply["content"]["status"] == "ok"
    variables = values(debug.request("inspectVariables")["body"]["variables"])
    assert variables["text"] == "'Hello the world'" and variables["number"] == "42"
    assert not {"In", "Out", "get_ipython", "exit"} & set(variables)
    rich = debug.request("richInspectVariables", {"variableName": "text"})
    assert rich["body"]["data"] == {"text/plain": "'Hello the world'"}
    bad = debug.request("richInspectVariables", {"variableName": "not a name"})
    assert bad["success"] is False


def test_copy_to_globals(debug: Debug) -> None:
    code = "def keep():\n    secret = [1, 2, 3]\n    pass\n\nkeep()"
    debug.breakpoint_in(code, 3)
    msg_id = debug.kc.execute(code)
    thread = debug.event("stopped")["body"]["threadId"]
    frame = debug.top_frame(thread)
    reply = debug.request(
        "copyToGlobals",
        {"srcVariableName": "secret", "dstVariableName": "secret_copy", "srcFrameId": frame["id"]},
    )
    assert reply["success"], reply
    assert values(debug.scope(frame["id"], "Globals"))["secret_copy"] == "[1, 2, 3]"
    rejected = debug.request(
        "copyToGlobals",
        {"srcVariableName": "secret", "dstVariableName": "x'] or 1 or globals()['y",
         "srcFrameId": frame["id"]},
    )  # fmt: skip
    assert rejected["success"] is False and rejected["command"] == "copyToGlobals"
    debug.request("continue", {"threadId": thread})
    assert debug.finish(msg_id)[0]["content"]["status"] == "ok"
    assert debug.fe.value("secret_copy") == "[1, 2, 3]"


def test_exception_breakpoint_and_exception_info(debug: Debug) -> None:
    code = "def boom():\n    raise ValueError('bad value')\n\nboom()"
    debug.breakpoint_in(code)
    assert debug.request("setExceptionBreakpoints", {"filters": ["userUnhandled"]})["success"]
    try:
        msg_id = debug.kc.execute(code)
        stopped = debug.event("stopped")
        assert stopped["body"]["reason"] == "exception"
        thread = stopped["body"]["threadId"]
        info = debug.request("exceptionInfo", {"threadId": thread})
        assert info["success"] and "ValueError" in info["body"]["exceptionId"]
        assert "bad value" in info["body"]["description"]
        # It may stop again as the exception leaves each user frame.
        for _ in range(10):
            debug.request("continue", {"threadId": thread})
            if not debug.stopped_again(msg_id):
                break
        reply, _ = debug.finish(msg_id)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "ValueError"
    finally:
        debug.request("setExceptionBreakpoints", {"filters": []})


def test_debug_requests_are_answered_one_at_a_time(debug_pooled: Debug) -> None:
    debug = debug_pooled
    debug.breakpoint_in(CELL, 2)
    msg_id = debug.kc.execute(CELL)
    thread = debug.event("stopped")["body"]["threadId"]
    frame = debug.top_frame(thread)
    scopes = debug.request("scopes", {"frameId": frame["id"]})["body"]["scopes"]
    sent = []
    for scope in scopes[:2]:
        msg = debug.kc.session.msg(
            "debug_request",
            {"type": "request", "seq": 1000 + len(sent), "command": "variables",
             "arguments": {"variablesReference": scope["variablesReference"]}},
        )  # fmt: skip
        debug.kc.control_channel.send(msg)
        sent.append(msg["header"]["msg_id"])
    states = []
    deadline = time.monotonic() + TIMEOUT
    while len(states) < 4:
        msg = debug.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") in sent and msg["msg_type"] == "status":
            states.append(msg["content"]["execution_state"])
        elif msg["parent_header"].get("msg_id") not in sent:
            debug.iopub.append(msg)
    assert states == ["busy", "idle", "busy", "idle"]
    for _ in sent:
        reply = debug.fe.kc.control_channel.get_msg(timeout=TIMEOUT)
        assert reply["content"]["success"], reply
    debug.request("continue", {"threadId": thread})
    assert debug.finish(msg_id)[0]["content"]["status"] == "ok"


def test_bad_debug_requests_get_a_clear_error(pooled: Any) -> None:
    kernel = pooled
    client = Debug(kernel)
    msg = kernel.kc.session.msg("debug_request", {"type": "request", "seq": 1})
    kernel.kc.control_channel.send(msg)
    reply = kernel.kc.control_channel.get_msg(timeout=TIMEOUT)
    assert reply["msg_type"] == "debug_reply"
    assert reply["content"]["success"] is False and "command" in reply["content"]["message"]
    # Requests that need a started debugger say so, before initialize.
    reply = client.request("stackTrace", {"threadId": 1})
    assert reply["success"] is False and "not started" in reply["message"]
    # A disconnect with nothing attached is as good as done.
    assert client.request("disconnect", {"restart": False})["success"] is True


FORK_CELL = """import os, time
def probe():
    x = 1
    return x
pid = os.fork()
if pid == 0:
    try:
        probe()
    finally:
        os._exit(0)
for _ in range(200):
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print('child finished' if done else 'child stuck')
"""


def test_a_process_forked_while_attached_never_stops_at_a_breakpoint(debug_pooled: Debug) -> None:
    debug = debug_pooled
    # The automatic checkpoint saves from a forked worker: a breakpoint in
    # code it runs (a __getstate__) must not stop it, or talk to the adapter
    # over the sockets it inherited. (ipykernel's forked child stops.)
    debug.breakpoint_in(FORK_CELL, 3)
    reply, iopub = debug.finish(debug.kc.execute(FORK_CELL))
    assert reply["content"]["status"] == "ok"
    out = "".join(m["content"]["text"] for m in iopub if m["msg_type"] == "stream")
    assert out == "child finished\n"
    debug.breakpoint_in(FORK_CELL)


def test_checkpoints_and_transactions_while_attached(debug_pooled: Debug) -> None:
    debug = debug_pooled

    def run(code: str) -> dict[str, Any]:
        return debug.finish(debug.kc.execute(code))[0]["content"]  # type: ignore[no-any-return]

    # A breakpoint in a function the cells below do not call: nothing stops.
    debug.breakpoint_in("def untouched():\n    return 1\n", 2)
    assert run("ck_value = [1, 2]")["status"] == "ok"
    assert run("%checkpoint save dbg_ck --force")["status"] == "ok"
    assert run("ck_value = 'changed'")["status"] == "ok"
    assert run("%checkpoint restore dbg_ck")["status"] == "ok"
    assert debug.fe.value("ck_value") == "[1, 2]"
    failed = run("%%transaction bindings\ntx_value = 1\nraise ValueError('no')")
    assert failed["status"] == "error" and failed["ename"] == "ValueError"
    assert debug.fe.value("'tx_value' in globals()") == "False"
    assert run("%checkpoint delete dbg_ck")["status"] == "ok"
    debug.breakpoint_in("def untouched():\n    return 1\n")


CHILD_DEBUGGER_CELL = """import json, os
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        dbg = get_ipython().kernel._outlet.debugger  # the worker's
        reply = dbg.handle({"type": "request", "seq": 1, "command": "initialize"})
        os.write(w, json.dumps([dbg.is_started, reply["success"], reply.get("message")]).encode())
    finally:
        os._exit(0)
os.close(w)
seen = os.read(r, 65536).decode()
os.waitpid(pid, 0)
print(seen)
"""


def test_a_forked_worker_does_not_inherit_the_debug_session(debug_pooled: Debug) -> None:
    debug = debug_pooled
    # A kernel forked from this one (%fork) must not talk to this one's
    # adapter: its debugger starts from nothing and says why it cannot start.
    reply, iopub = debug.finish(debug.kc.execute(CHILD_DEBUGGER_CELL))
    assert reply["content"]["status"] == "ok", reply["content"]
    out = "".join(m["content"]["text"] for m in iopub if m["msg_type"] == "stream")
    started, success, message = json.loads(out)
    assert started is False and success is False
    assert "forked" in message and "restart the kernel" in message
    # This kernel's session goes on.
    assert debug.request("debugInfo")["body"]["isStarted"] is True


# -- isolation: the worker dies or is interrupted while stopped -----------------------------


def test_crash_while_stopped_ends_the_debug_session_and_reattach_works(debug: Debug) -> None:
    reply, _ = debug.finish(debug.kc.execute("kept = 41"))
    assert reply["content"]["status"] == "ok"
    debug.breakpoint_in(CELL, 2)
    msg_id = debug.kc.execute(CELL)
    thread = debug.event("stopped")["body"]["threadId"]
    frame = debug.top_frame(thread)
    pid = debug.request(
        "evaluate",
        {"expression": "__import__('os').getpid()", "frameId": frame["id"], "context": "repl"},
    )["body"]["result"]
    cell_dir = Path(debug.request("debugInfo")["body"]["tmpFilePrefix"])
    assert cell_dir.is_dir()
    os.kill(int(pid), signal.SIGKILL)
    # The frontend's debugger is told the session ended, so its panel resets.
    assert debug.event("continued")["body"]["allThreadsContinued"] is True
    assert debug.event("terminated")["event"] == "terminated"
    assert debug.event("exited")["event"] == "exited"
    reply, iopub = debug.finish(msg_id)
    content = reply["content"]
    assert content["status"] == "error" and content["ename"] == "WorkerDied"
    assert "SIGKILL" in content["evalue"], content
    stderr = "".join(
        m["content"]["text"]
        for m in iopub
        if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
    )
    assert "restored" in stderr and "kept" in stderr, stderr
    assert debug.fe.value("kept") == "41"
    # The new worker has no debug session until the frontend attaches again.
    assert debug.request("debugInfo")["body"]["isStarted"] is False
    debug.attach()
    # The dead worker's cell files are cleaned up when a debugger starts.
    assert not cell_dir.exists()
    debug.breakpoint_in(CELL, 2)
    msg_id = debug.kc.execute(CELL)
    thread = debug.event("stopped")["body"]["threadId"]
    frame = debug.top_frame(thread)
    assert values(debug.scope(frame["id"], "Locals")) == {"a": "2", "b": "3"}
    new_pid = debug.request(
        "evaluate",
        {"expression": "__import__('os').getpid()", "frameId": frame["id"], "context": "repl"},
    )["body"]["result"]
    assert new_pid != pid
    debug.request("continue", {"threadId": thread})
    reply, iopub = debug.finish(msg_id)
    assert reply["content"]["status"] == "ok"
    # pydevd's warning about frozen modules never reaches a cell's output.
    streams = [m["content"]["text"] for m in iopub + debug.iopub if m["msg_type"] == "stream"]
    assert not any("frozen modules" in text for text in streams), streams
    debug.breakpoint_in(CELL)


def test_a_death_while_idle_with_the_debugger_on_resets_the_frontend(debug_pooled: Debug) -> None:
    debug = debug_pooled
    code = "import os, threading\nthreading.Timer(0.3, os._exit, (3,)).start()"
    reply, _ = debug.finish(debug.kc.execute(code))
    assert reply["content"]["status"] == "ok"
    assert debug.event("terminated")["event"] == "terminated"
    assert debug.event("exited")["event"] == "exited"
    assert debug.request("debugInfo")["body"]["isStarted"] is False
    debug.attach()  # the fixture detaches


def test_interrupt_while_stopped_ends_the_cell_as_in_ipykernel(debug: Debug) -> None:
    debug.breakpoint_in(CELL, 2)
    msg_id = debug.kc.execute(CELL)
    debug.event("stopped")
    debug.fe.km.interrupt_kernel()
    # As ipykernel: debugpy resumes the thread and the cell ends with the
    # KeyboardInterrupt.
    assert debug.event("continued")["body"]["allThreadsContinued"] is True
    reply, _ = debug.finish(msg_id)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert debug.request("debugInfo")["body"]["stoppedThreads"] == []
    reply, _ = debug.finish(debug.kc.execute("1 + 1"))
    assert reply["content"]["status"] == "ok"
    debug.breakpoint_in(CELL)
