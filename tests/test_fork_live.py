"""Forking a live kernel (issue 14, point 5): a new kernel whose worker is a
copy-on-write fork of a running kernel's worker, with the whole namespace,
independent afterwards. Native ``Session.fork()`` here; ``%fork`` through
Jupyter and the REST endpoint further down. See docs/fork.md.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
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


@asynccontextmanager
async def started(pids: list[int], **options: Any) -> AsyncIterator[Session]:
    """A started :class:`Session` (``options``: its arguments), its worker's
    pid added to ``pids``; shut down at the end."""
    session = Session(**options)
    try:
        await session.start()
        assert session.pid is not None
        pids.append(session.pid)
        yield session
    finally:
        await session.shutdown()


@asynccontextmanager
async def forked(parent: Session, pids: list[int]) -> AsyncIterator[ForkedSession]:
    """A fork of ``parent``, its worker's pid added to ``pids``; shut down
    at the end."""
    child = await parent.fork()
    try:
        assert child.pid is not None
        pids.append(child.pid)
        yield child
    finally:
        await child.shutdown()


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
        pids: list[int] = []
        async with started(pids, autosave=False) as parent:
            await ok(parent, STATE)
            async with forked(parent, pids) as child:
                assert isinstance(child, ForkedSession)
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
        return pids

    pids = run(main())
    assert_no_leftovers(pids)


TICKER = """\
import asyncio
ticks = 0

async def tick():
    global ticks
    while True:
        ticks += 1
        await asyncio.sleep(0.005)

ticker = asyncio.get_event_loop().create_task(tick())
"""


def test_asyncio_tasks_go_on_in_both_kernels() -> None:
    """The cells' event loop carries over with its tasks, each kernel with
    its own copy (and its own epoll and wake-up pipe: neither steals the
    other's events)."""

    async def main() -> list[int]:
        pids: list[int] = []
        async with started(pids, autosave=False) as parent:
            await ok(parent, TICKER)
            await ok(parent, "await asyncio.sleep(0.05)")
            async with forked(parent, pids) as child:
                for s in (child, parent, child):
                    before = int(await value(s, "ticks"))
                    await ok(s, "await asyncio.sleep(0.1)")
                    assert int(await value(s, "ticks")) > before
                # Each kernel's requests wake its own idle loop (a shared
                # wake-up pipe would let one kernel eat the other's wake-ups).
                await ok(
                    parent, "ticker.cancel()\nnapper = asyncio.ensure_future(asyncio.sleep(3600))"
                )
                await ok(child, "napper = asyncio.ensure_future(asyncio.sleep(3600))")
                for _ in range(20):
                    for s in (child, parent):
                        await asyncio.wait_for(value(s, "1"), 5)
                await ok(child, "ticker.cancel(); ticks = -1000")
                assert int(await value(parent, "ticks")) > 0
                assert await value(child, "ticker.cancelled()") == "True"
                assert await value(parent, "ticker.cancelled()") == "True"
        return pids

    assert_no_leftovers(run(main()))


def test_a_kernel_running_a_cell_refuses_to_fork() -> None:
    async def main() -> list[int]:
        pids: list[int] = []
        async with started(pids, autosave=False) as parent:
            cell = asyncio.ensure_future(collect(parent, "import time\ntime.sleep(30)"))
            await wait_until(lambda: parent.running is not None, what="the cell to start")
            with pytest.raises(ForkBusyError, match="running a cell"):
                await parent.fork()
            await parent.interrupt()
            msgs = await cell
            assert reply_of(msgs).status == "error"
            # Idle again: the fork is taken.
            async with forked(parent, pids) as child:
                assert await value(child, "1 + 1") == "2"
        return pids

    assert_no_leftovers(run(main()))


def test_a_fork_outlives_its_parent_and_keeps_its_own_limits() -> None:
    async def main() -> list[int]:
        pids: list[int] = []
        async with started(pids, autosave=False, memory_limit="400M", max_restarts=0) as parent:
            await ok(parent, "import numpy as np\nblock = np.ones(20_000_000)")  # 160 MB
            async with forked(parent, pids) as child:
                assert child.limits.memory_limit == parent.limits.memory_limit
                # The parent's worker dies (killed outright): the fork goes on.
                assert parent.pid is not None
                os.kill(parent.pid, 9)
                await wait_until(lambda: not parent.is_alive, what="the parent's worker to die")
                assert await value(child, "float(block.sum())") == "20000000.0"
                # The fork's memory limit holds: the fork is stopped, named why.
                # + 480 MB, held while the limit's monitor (every 0.25 s) looks
                msgs = await collect(
                    child, "more = np.ones(60_000_000)\n__import__('time').sleep(10)"
                )
                (error,) = of_type(msgs, MessageType.ERROR)
                assert "memory limit" in error.evalue, error.evalue
        return pids

    assert_no_leftovers(run(main()))


# -- %fork through Jupyter (both kernelspecs) -----------------------------------------------


@contextmanager
def connected(connection_file: str) -> Iterator[BlockingKernelClient]:
    """A client of the kernel of ``connection_file``; that kernel is shut
    down at the end."""
    kc = BlockingKernelClient(connection_file=connection_file)
    kc.load_connection_file()
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    try:
        yield kc
    finally:
        kc.shutdown()
        kc.stop_channels()


def fork_magic(kc: BlockingKernelClient) -> str:
    """``%fork`` run through ``kc``: the new kernel's connection file."""
    texts: list[str] = []

    def keep(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            texts.append(msg["content"]["text"])

    reply = kc.execute_interactive("%fork", timeout=60, output_hook=keep)
    assert reply["content"]["status"] == "ok", reply
    found = re.search(r"jupyter console --existing (\S+)", "".join(texts))
    assert found, texts
    return found.group(1)


def evaluate(kc: BlockingKernelClient, expression: str) -> str:
    reply = kc.execute_interactive(
        "", user_expressions={"v": expression}, silent=True, timeout=30, output_hook=lambda m: None
    )
    result = reply["content"]["user_expressions"]["v"]
    assert result["status"] == "ok", result
    return str(result["data"]["text/plain"])


def test_fork_magic_makes_a_kernel_one_can_connect_to(kernel: Any) -> None:
    assert kernel.execute("x = 'parent'\nitems = iter(range(5)); next(items)").status == "ok"
    # On both kernelspecs: a standalone kernel's fork is hosted by the daemon.
    run = kernel.execute("%fork")
    assert run.status == "ok", run.iopub
    text = run.stdout()
    kernel_id = re.search(r"new kernel ([0-9a-f-]{36})", text)
    found = re.search(r"jupyter console --existing (\S+)", text)
    assert kernel_id and found, text
    connection_file = found.group(1)
    assert kernel_id.group(1) in connection_file
    with connected(connection_file) as fork:
        assert evaluate(fork, "x") == "'parent'"
        assert evaluate(fork, "next(items)") == "1"
        fork.execute_interactive("x = 'fork'", timeout=30, output_hook=lambda m: None)
        assert evaluate(fork, "x") == "'fork'"
        assert kernel.value("x") == "'parent'"
        assert kernel.value("next(items)") == "1"
        fork_pid = int(evaluate(fork, "__import__('os').getpid()"))
        assert fork_pid != int(kernel.value("__import__('os').getpid()"))
    assert_no_leftovers([fork_pid], timeout=15)
    # The parent goes on as before.
    assert kernel.value("x") == "'parent'"


def test_fork_magic_of_a_standalone_kernel_outlives_it_in_the_daemon(
    pyrepl3_kernelspec: Path, runtime_dir: Path
) -> None:
    """A --no-pool kernel's %fork, with no daemon running: one is started
    and hosts the fork, which keeps the parent's state and memory limit and
    answers after the parent kernel was shut down. The test stops the daemon
    it caused to start; nothing is left."""
    from jupyter_client.manager import KernelManager
    from jupyter_helpers import stop_daemon

    from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths

    client = DaemonClient(DaemonPaths.default(str(runtime_dir)))
    assert client.ping() is None, "a daemon already runs in the test's runtime dir"
    km = KernelManager(kernel_name="pyrepl3-cold")
    km.start_kernel(env={**os.environ, "PYREPL3_MEMORY_LIMIT": "400M"})
    pids: list[int] = []
    try:
        pids.append(km.provisioner.pid)  # type: ignore[union-attr]
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        kc.execute_interactive(
            "import os, numpy as np\nx = 'standalone parent'\nblock = np.ones(20_000_000)",
            timeout=60,
            output_hook=lambda m: None,
        )
        pids.append(int(evaluate(kc, "os.getpid()")))
        connection_file = fork_magic(kc)
        kc.stop_channels()
        hello = client.ping()
        assert hello is not None, "no daemon hosts the fork"
        pids.append(int(client.call("hello")["pid"]))
        with connected(connection_file) as fork:
            fork_pid = int(evaluate(fork, "os.getpid()"))
            pids.append(fork_pid)
            assert fork_pid not in pids[:2]
            # The parent kernel (its gateway process and worker) goes.
            km.shutdown_kernel(now=True)
            assert_no_leftovers(pids[:2], timeout=15)
            time.sleep(2.5)  # a reap pass of the daemon has run since
            assert evaluate(fork, "x") == "'standalone parent'"
            assert evaluate(fork, "float(block.sum())") == "20000000.0"
            # The parent's memory limit holds for the fork: it is stopped, named why.
            texts: list[str] = []
            fork.execute_interactive(
                # + 480 MB, held while the limit's monitor (every 0.25 s) looks
                "import time\nmore = np.ones(60_000_000)\ntime.sleep(10)",
                timeout=60,
                output_hook=lambda m: texts.append(str(m["content"])),
            )
            assert "memory limit" in "".join(texts), texts
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        stop_daemon(runtime_dir)
    assert client.ping() is None
    assert_no_leftovers(pids, timeout=15)


def test_fork_magic_inside_a_longer_cell_is_refused(kernel: Any) -> None:
    run = kernel.execute("y = 1\n%fork")
    assert run.status == "error"
    assert "a cell of its own" in run.reply["content"]["evalue"] + run.stderr()


# -- REST: POST /api/pyrepl3/kernels/{kernel_id}/fork ---------------------------------------


@pytest.fixture(scope="module")
def server(pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``pyrepl3-kernel gateway`` (jupyter_server with the extension)."""
    from test_rest_api import running_server

    with running_server("gateway", tmp_path_factory.mktemp("fork-gateway")) as jupyter:
        yield jupyter


def rest_value(server: Any, kernel_id: str, code: str) -> str:
    r = server.api("POST", f"/api/pyrepl3/kernels/{kernel_id}/execute", {"code": code})
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["status"] == "ok", state
    results = [o for o in state["outputs"] if o["output_type"] == "execute_result"]
    return str(results[-1]["data"]["text/plain"]) if results else ""


def kernel_ids(server: Any) -> set[str]:
    r = server.api("GET", "/api/kernels")
    assert r.status_code == 200, r.text
    return {k["id"] for k in r.json()}


def test_rest_fork_is_a_kernel_jupyter_server_lists(server: Any) -> None:
    parent = server.start_kernel("pyrepl3")
    rest_value(
        server, parent, "import os\nx = 41\nsquares = (i * i for i in range(9)); next(squares)"
    )
    r = server.api("POST", f"/api/pyrepl3/kernels/{parent}/fork")
    assert r.status_code == 201, r.text
    body = r.json()
    child = body["id"]
    assert child != parent and body["forked_from"] == parent and body["name"] == "pyrepl3"
    assert r.headers["Location"] == f"/api/kernels/{child}"
    assert {"lost", "shared"} <= set(body["report"])
    assert {parent, child} <= kernel_ids(server)
    # The new kernel answers, with the parent's state, and is its own.
    assert rest_value(server, child, "x + 1") == "42"
    assert rest_value(server, child, "next(squares)") == "1"
    rest_value(server, child, "x = 0")
    assert rest_value(server, parent, "x") == "41"
    child_pid = int(rest_value(server, child, "os.getpid()"))
    assert child_pid != int(rest_value(server, parent, "os.getpid()"))
    # Shutting the parent down leaves the fork running.
    assert server.api("DELETE", f"/api/kernels/{parent}").status_code == 204
    assert rest_value(server, child, "x") == "0"
    assert server.api("DELETE", f"/api/kernels/{child}").status_code == 204
    assert_no_leftovers([child_pid], timeout=15)


def test_rest_fork_of_an_unknown_kernel_is_404(server: Any) -> None:
    r = server.api("POST", "/api/pyrepl3/kernels/00000000-0000-0000-0000-000000000000/fork")
    assert r.status_code == 404, r.text
    assert "no kernel" in r.json()["message"]


def test_rest_fork_while_a_cell_runs_is_409(server: Any) -> None:
    parent = server.start_kernel("pyrepl3")
    try:
        r = server.api(
            "POST",
            f"/api/pyrepl3/kernels/{parent}/execute",
            {"code": "import time\ntime.sleep(60)", "timeout": 0.5},
        )
        assert r.status_code == 202, r.text
        r = server.api("POST", f"/api/pyrepl3/kernels/{parent}/fork")
        assert r.status_code == 409, r.text
        assert "running a cell" in r.json()["message"]
        before = kernel_ids(server)
        assert server.api("POST", f"/api/kernels/{parent}/interrupt").status_code == 204
        # No kernel was left behind by the refused fork.
        assert kernel_ids(server) == before
    finally:
        server.api("DELETE", f"/api/kernels/{parent}")


def test_rest_fork_of_a_standalone_kernel(server: Any) -> None:
    """A --no-pool kernel (one gateway process with its own worker) forks
    over REST too: refused (409) while a cell runs; then 201, the fork hosted
    by the manager daemon and registered with the server under the parent's
    kernelspec name: listed, answering with the parent's state, its own
    process, going on after the parent is shut down; DELETE ends it."""
    parent = server.start_kernel("pyrepl3-cold")
    pids: list[int] = []
    try:
        rest_value(server, parent, "import os\nx = 41\nsquares = (i * i for i in range(9))")
        rest_value(server, parent, "next(squares)")
        pids.append(int(rest_value(server, parent, "os.getpid()")))
        r = server.api(
            "POST",
            f"/api/pyrepl3/kernels/{parent}/execute",
            {"code": "import time\ntime.sleep(3)", "timeout": 0.5},
        )
        assert r.status_code == 202, r.text
        r = server.api("POST", f"/api/pyrepl3/kernels/{parent}/fork")
        assert r.status_code == 409, r.text
        assert "running a cell" in r.json()["message"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the cell has finished
            r = server.api("POST", f"/api/pyrepl3/kernels/{parent}/fork")
            if r.status_code != 409:
                break
            time.sleep(0.2)
        assert r.status_code == 201, r.text
        body = r.json()
        child = body["id"]
        assert body["forked_from"] == parent and body["name"] == "pyrepl3-cold", body
        assert {"lost", "shared"} <= set(body["report"])
        assert {parent, child} <= kernel_ids(server)
        kernels = {k["id"]: k for k in server.api("GET", "/api/kernels").json()}
        assert kernels[child]["name"] == "pyrepl3-cold"
        assert rest_value(server, child, "x + 1") == "42"
        assert rest_value(server, child, "next(squares)") == "1"
        child_pid = int(rest_value(server, child, "os.getpid()"))
        pids.append(child_pid)
        assert child_pid not in pids[:1]
        rest_value(server, child, "x = 0")
        assert rest_value(server, parent, "x") == "41"
        # The parent kernel (its process and worker) goes; the fork stays.
        assert server.api("DELETE", f"/api/kernels/{parent}").status_code == 204
        assert_no_leftovers(pids[:1], timeout=15)
        assert rest_value(server, child, "x") == "0"
        assert server.api("DELETE", f"/api/kernels/{child}").status_code == 204
        assert child not in kernel_ids(server)
    finally:
        server.api("DELETE", f"/api/kernels/{parent}")
    assert_no_leftovers(pids, timeout=15)


def test_a_fork_that_cannot_reach_its_supervisor_leaves_nothing_behind() -> None:
    """A fork that cannot connect (no listener at the path) exits; the
    supervisor that waits for it hears of its death at once, not after the
    connect timeout; the parent goes on."""

    async def main() -> list[int]:
        from pyrepl3_kernel.protocol import ForkMessage
        from pyrepl3_kernel.session.fork import ForkError, _connection_of

        pids: list[int] = []
        async with started(pids, autosave=False) as parent:
            reply = await parent.worker.request(ForkMessage(path="/nonexistent/s", token="t"))
            assert reply.ok and reply.pid not in (0, parent.pid), reply
            pids.append(reply.pid)
            never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            with pytest.raises(ForkError, match="exited before it connected"):
                await _connection_of(never, reply.pid, timeout=300)
            assert await value(parent, "1 + 1") == "2"
            # A fork request without a place to connect to: an error reply.
            bad = await parent.worker.request(ForkMessage())
            assert not bad.ok and "needs the path of a Unix socket" in bad.evalue, bad
        return pids

    assert_no_leftovers(run(main()))


@pytest.mark.parametrize("kernel_name", ["pyrepl3", "pyrepl3-cold"])
def test_fork_magic_in_a_server_kernel_is_listed_by_the_server(
    server: Any, kernel_name: str
) -> None:
    """A kernel %fork made from a kernel of jupyter_server (daemon-hosted or
    standalone) joins the server's kernels: /api/kernels lists it under the
    parent's kernelspec name, it answers, DELETE shuts it down."""
    parent = server.start_kernel(kernel_name)
    try:
        rest_value(server, parent, "import os\nx = 'from the parent'")
        r = server.api("POST", f"/api/pyrepl3/kernels/{parent}/execute", {"code": "%fork"})
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        text = "".join(o.get("text", "") for o in r.json()["outputs"])
        found = re.search(r"new kernel ([0-9a-f-]{36})", text)
        assert found, text
        child = found.group(1)
        assert child in kernel_ids(server)
        kernels = {k["id"]: k for k in server.api("GET", "/api/kernels").json()}
        assert kernels[child]["name"] == kernel_name
        assert rest_value(server, child, "x") == "'from the parent'"
        child_pid = int(rest_value(server, child, "os.getpid()"))
        assert server.api("DELETE", f"/api/kernels/{child}").status_code == 204
        assert child not in kernel_ids(server)
        assert_no_leftovers([child_pid], timeout=15)
    finally:
        server.api("DELETE", f"/api/kernels/{parent}")


def test_fork_magic_on_the_argv_path_outlives_the_parent_process(
    pyrepl3_kernelspec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that runs the kernelspec's argv itself (no provisioner: the
    kernel is handed to the daemon) can %fork too; killing the parent
    kernel's process does not end the fork."""
    import json

    from jupyter_client.manager import KernelManager

    from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths

    spec = json.loads((pyrepl3_kernelspec / "kernel.json").read_text())
    spec.get("metadata", {}).pop("kernel_provisioner", None)
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "pyrepl3-argv"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv(
        "JUPYTER_PATH",
        os.pathsep.join([str(tmp_path / "share" / "jupyter"), os.environ["JUPYTER_PATH"]]),
    )
    km = KernelManager(kernel_name="pyrepl3-argv")
    km.start_kernel()
    fork_pid = None
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        kc.execute_interactive("x = 'argv parent'", timeout=30, output_hook=lambda m: None)
        connection_file = fork_magic(kc)
        kc.stop_channels()
        with connected(connection_file) as fork:
            fork_pid = int(evaluate(fork, "__import__('os').getpid()"))
            # The parent kernel's process is killed: its lease ends with it,
            # and the daemon's reaper (every 2 s) leaves the fork alone.
            parent_id = km.kernel_id
            km.shutdown_kernel(now=True)
            client = DaemonClient(DaemonPaths.default(os.environ["JUPYTER_RUNTIME_DIR"]))

            def leases() -> set[str]:
                return {lease["kernel_id"] for lease in client.call("status")["leases"]}

            deadline = time.monotonic() + 30
            while parent_id in leases() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert parent_id not in leases()
            time.sleep(2.5)  # a reap pass has run since
            assert evaluate(fork, "x") == "'argv parent'"
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert fork_pid is not None
    assert_no_leftovers([fork_pid], timeout=15)


def test_a_fork_recovers_from_a_crash_with_its_own_state_and_can_fork_again() -> None:
    """The fork saves automatically to a store of its own: after its worker
    dies, the new worker has the fork's state, not the parent's. A fork
    forks again."""

    async def main() -> list[int]:
        pids: list[int] = []
        async with started(pids) as parent:
            assert parent.autosave_dir is not None
            await ok(parent, "x = 'parent'")
            async with forked(parent, pids) as child:
                assert child.autosave_dir not in (None, parent.autosave_dir)
                await ok(child, "x = 'fork'")
                async with forked(child, pids) as grandchild:
                    assert await value(grandchild, "x") == "'fork'"
                msgs = await collect(child, "import os\nos._exit(3)")
                assert reply_of(msgs).ename == "WorkerDied"
                assert child.pid not in pids and child.pid is not None
                pids.append(child.pid)
                assert await value(child, "x") == "'fork'"
                assert await value(parent, "x") == "'parent'"
        return pids

    assert_no_leftovers(run(main()))


def test_the_fork_of_an_encrypted_kernel_is_encrypted(pyrepl3_kernelspec: Path) -> None:
    """With CurveZMQ (transport_encryption=required), %fork's kernel serves
    with the parent's keys: its connection file has them, a client with them
    works."""
    import json

    import zmq
    from jupyter_client.manager import KernelManager

    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CurveZMQ support")
    km = KernelManager(kernel_name="pyrepl3", transport_encryption="required")
    km.start_kernel()
    fork_pid = None
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        kc.execute_interactive("x = 'secret'", timeout=30, output_hook=lambda m: None)
        try:
            connection_file = fork_magic(kc)
        finally:
            kc.stop_channels()
        info = json.loads(Path(connection_file).read_text())
        assert info["curve_publickey"] == km.get_connection_info()["curve_publickey"]
        with connected(connection_file) as fork:
            fork_pid = int(evaluate(fork, "__import__('os').getpid()"))
            assert evaluate(fork, "x") == "'secret'"
    finally:
        km.shutdown_kernel(now=True)
    assert fork_pid is not None
    assert_no_leftovers([fork_pid], timeout=15)
