"""The manager daemon's fork servers, end to end: bursts of kernels through
AsyncKernelManager all forked, the argv path (a kernelspec without a
provisioner) handed to the daemon, a fork server dying mid-burst, warm-up
code that makes forking unsafe, and the daemon prepared at start.

The module runs its own daemon (a runtime directory of its own), stopped at
the end; tests that start processes check by pid that none is left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import AsyncKernelManager, KernelManager
from jupyter_helpers import KERNEL_NAME, stop_daemon
from session_helpers import assert_no_leftovers, pid_gone

from pyrepl3_kernel.daemon.client import (
    DAEMON_PROTOCOL_VERSION,
    HEADER,
    DaemonClient,
    DaemonPaths,
    DaemonUnavailable,
    decode_payload,
    encode_frame,
)
from pyrepl3_kernel.handoff import ensure_daemon

ARGV_KERNEL = "pyrepl3-argv"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def runtime(pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A runtime directory (so a daemon) of this module's own, and a
    kernelspec that has only an argv (what VS Code runs)."""
    prefix = tmp_path_factory.mktemp("argv-spec")
    spec_dir = prefix / "share" / "jupyter" / "kernels" / ARGV_KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "pyrepl3_kernel", "-f", "{connection_file}"],
        "display_name": "argv only",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    runtime_dir = tmp_path_factory.mktemp("fork-runtime")
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "JUPYTER_RUNTIME_DIR")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(prefix / "share" / "jupyter"), os.environ["JUPYTER_PATH"]]
    )
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime_dir)
    try:
        yield runtime_dir
    finally:
        stop_daemon(runtime_dir)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _daemon(runtime: Path) -> DaemonClient:
    """A client of the module's daemon (started, as a launch would, if none runs)."""
    client = DaemonClient(DaemonPaths.default(runtime), timeout=TIMEOUT)
    ensure_daemon(client, starter=os.getpid())
    return client


def _status(runtime: Path) -> dict[str, Any]:
    return _daemon(runtime).call("status")


def _ready_fork_servers(runtime: Path) -> list[dict[str, Any]]:
    return [f for f in _status(runtime)["fork_servers"] if f["state"] == "ready"]


def _execute(km: KernelManager, code: str) -> dict[str, Any]:
    """Run ``code``; its execute_reply content and its result's text."""
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        result: dict[str, Any] = {}

        def output(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "execute_result":
                result["text"] = msg["content"]["data"]["text/plain"]

        reply = kc.execute_interactive(code, timeout=TIMEOUT, output_hook=output)
        return {**reply["content"], "text": result.get("text")}
    finally:
        kc.stop_channels()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


# -- the argv path --------------------------------------------------------------------


def _fork_server_ready(runtime: Path) -> None:
    """The module's daemon running and its fork server ready: an argv
    launch with no daemon, or while its fork server starts, runs standalone
    (docs/daemon.md, "The first launch"; tests/test_first_launch.py)."""
    _daemon(runtime)
    deadline = time.monotonic() + TIMEOUT
    while not _ready_fork_servers(runtime):
        assert time.monotonic() < deadline, _status(runtime)["fork_servers"]
        time.sleep(0.05)


def test_argv_kernelspec_without_provisioner_gets_a_forked_worker(runtime, tmp_path):
    _fork_server_ready(runtime)
    km = KernelManager(kernel_name=ARGV_KERNEL)
    km.start_kernel(cwd=str(tmp_path))
    worker = 0
    try:
        shim = km.provisioner.process
        out = _execute(
            km,
            "import os; (os.getpid(), os.getppid(), os.environ.get('JPY_PARENT_PID'), os.getcwd())",
        )
        assert out["status"] == "ok", out
        worker, parent, jpy_parent, cwd = eval(out["text"])
        servers = _ready_fork_servers(runtime)
        assert parent in [f["pid"] for f in servers], (parent, servers)
        assert jpy_parent == str(os.getpid())
        assert cwd == str(tmp_path)
        # The process the client launched stays and hosts nothing itself.
        assert shim.poll() is None and worker != shim.pid
        leases = _status(runtime)["leases"]
        assert [lease["owner_pid"] for lease in leases] == [shim.pid]
    finally:
        km.shutdown_kernel()
    assert shim.wait(10) == 0
    assert_no_leftovers([worker])


def test_argv_interrupt_reaches_the_forked_worker(runtime):
    _fork_server_ready(runtime)
    km = KernelManager(kernel_name=ARGV_KERNEL)  # interrupt_mode signal: SIGINT to the launcher
    km.start_kernel()
    try:
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=TIMEOUT)
            msg_id = kc.execute("import time; time.sleep(60)")
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:  # until the cell runs
                msg = kc.get_iopub_msg(timeout=TIMEOUT)
                if msg["msg_type"] == "execute_input":
                    break
            time.sleep(0.2)
            km.interrupt_kernel()
            reply = kc.get_shell_msg(timeout=20)
            assert reply["parent_header"]["msg_id"] == msg_id
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


def test_killing_the_argv_process_ends_its_forked_worker(runtime):
    _fork_server_ready(runtime)
    km = KernelManager(kernel_name=ARGV_KERNEL)
    km.start_kernel()
    worker = 0
    try:
        out = _execute(km, "import os; os.getpid()")
        worker = int(out["text"])
        shim = km.provisioner.process
        shim.kill()
        shim.wait(10)
        deadline = time.monotonic() + 10
        while not pid_gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_gone(worker), "the worker outlived the process the client launched"
        while _status(runtime)["leases"] and time.monotonic() < deadline:
            time.sleep(0.05)  # ending: its gateway's sockets are closing
        assert not _status(runtime)["leases"]
    finally:
        km.shutdown_kernel(now=True)
    assert_no_leftovers([worker])


def test_argv_path_falls_back_to_standalone_when_the_daemon_cannot_be_used(runtime, tmp_path):
    not_a_dir = tmp_path / "runtime-is-a-file"
    not_a_dir.write_text("")
    err = tmp_path / "kernel.err"
    km = KernelManager(kernel_name=ARGV_KERNEL)
    with open(err, "w") as stderr:
        km.start_kernel(env={**os.environ, "JUPYTER_RUNTIME_DIR": str(not_a_dir)}, stderr=stderr)
    worker = 0
    try:
        out = _execute(km, "import os; (os.getpid(), os.getppid())")
        assert out["status"] == "ok", out
        worker, parent = eval(out["text"])
        assert parent == km.provisioner.process.pid, "not the standalone kernel's own worker"
    finally:
        km.shutdown_kernel()
    text = err.read_text()
    assert "cannot be used" in text and "starting the kernel standalone" in text, text
    assert_no_leftovers([worker])


def test_argv_path_confined_by_its_launcher_starts_standalone(runtime, tmp_path):
    """A launcher that lowers a resource limit means it for the kernel: the
    kernel is not handed to the daemon, whose workers would escape it."""
    spec_dir = tmp_path / "kernels" / "pyrepl3-limited"
    spec_dir.mkdir(parents=True)
    launcher = f'ulimit -n 500 && exec {sys.executable} -m pyrepl3_kernel -f "$1"'
    spec = {
        "argv": ["/bin/sh", "-c", launcher, "sh", "{connection_file}"],
        "display_name": "limited",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    from jupyter_client.kernelspec import KernelSpecManager

    km = KernelManager(
        kernel_name="pyrepl3-limited",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]),
    )
    err = tmp_path / "kernel.err"
    with open(err, "w") as stderr:
        km.start_kernel(stderr=stderr)
    worker = 0
    try:
        out = _execute(
            km,
            "import os, resource; (os.getpid(), os.getppid(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])",
        )
        worker, parent, nofile = eval(out["text"])
        assert parent == km.provisioner.process.pid and nofile == 500
    finally:
        km.shutdown_kernel()
    assert "confined by its launcher (RLIMIT_NOFILE)" in err.read_text()
    assert_no_leftovers([worker])


# -- bursts ---------------------------------------------------------------------------


async def _burst(n: int, kernel_name: str) -> list[tuple[int, int]]:
    """``n`` kernels started at once through AsyncKernelManager; each
    answers 1+1 and says its worker's (pid, ppid). All are shut down."""
    kms = [AsyncKernelManager(kernel_name=kernel_name) for _ in range(n)]

    async def one(km: AsyncKernelManager) -> tuple[int, int]:
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=120)
            reply = await kc.execute_interactive("1+1", timeout=120)
            assert reply["content"]["status"] == "ok", reply
            ids: dict[str, Any] = {}
            await kc.execute_interactive(
                "import os; os.getpid(), os.getppid()",
                timeout=120,
                output_hook=lambda m: ids.update(m["content"].get("data", {})),
            )
            return eval(ids["text/plain"])  # type: ignore[no-any-return]
        finally:
            kc.stop_channels()

    try:
        return list(await asyncio.gather(*(one(km) for km in kms)))
    finally:
        await asyncio.gather(
            *(km.shutdown_kernel(now=True) for km in kms if km.has_kernel),
            return_exceptions=True,
        )


def _check_burst(runtime: Path, n: int) -> None:
    ids = asyncio.run(asyncio.wait_for(_burst(n, KERNEL_NAME), 300))
    pids = [pid for pid, _ in ids]
    assert len(set(pids)) == n, "a worker was handed out twice"
    servers = {f["pid"] for f in _ready_fork_servers(runtime)}
    forked = [pid for pid, ppid in ids if ppid in servers]
    assert len(forked) == n, f"{n - len(forked)} of {n} kernels were not forked"
    assert_no_leftovers(pids)


def test_twenty_kernels_at_once_all_answer_with_forked_workers(runtime):
    _check_burst(runtime, 20)


def test_hundred_kernels_at_once_all_answer_with_forked_workers(runtime):
    _check_burst(runtime, 100)


# -- the launches' round trips to the daemon -------------------------------------------


class _HeldDaemon:
    """A stand-in for a daemon that is slow to lease: a real listener on a
    runtime directory's daemon socket that answers ``hello`` at once and
    holds every ``lease`` request unanswered, counting both."""

    def __init__(self, paths: DaemonPaths) -> None:
        self.paths = paths
        self.hellos = 0
        self.leases_held = 0
        self._held: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> _HeldDaemon:
        self.paths.socket.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, os.fspath(self.paths.socket))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._held:
            writer.close()
        self.paths.socket.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        request = decode_payload(await reader.readexactly(length))
        if request["op"] == "hello":
            self.hellos += 1
            writer.write(encode_frame({"v": 1, "ok": True, "protocol": DAEMON_PROTOCOL_VERSION}))
            await writer.drain()
            writer.close()
        else:
            self.leases_held += 1
            self._held.append(writer)


def test_a_burst_of_launches_in_one_process_reaches_the_daemon_at_once(
    pyrepl3_kernelspec, tmp_path, monkeypatch
):
    """40 launches at once through AsyncKernelManager: one hello for all of
    them, and all 40 lease requests in flight together (no thread pool
    between the launches and the daemon letting a handful through)."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    n = 40

    async def main() -> _HeldDaemon:
        async with _HeldDaemon(DaemonPaths.default(tmp_path)) as daemon:
            kms = [AsyncKernelManager(kernel_name=KERNEL_NAME) for _ in range(n)]
            starts = [asyncio.ensure_future(km.start_kernel()) for km in kms]
            try:
                for _ in range(300):  # bounded: 30 s
                    if daemon.leases_held >= n or any(s.done() for s in starts):
                        break
                    await asyncio.sleep(0.1)
            finally:
                for start in starts:
                    start.cancel()
                await asyncio.gather(*starts, return_exceptions=True)
            return daemon

    daemon = asyncio.run(main())
    assert daemon.leases_held == n, f"{daemon.leases_held} of {n} lease requests arrived"
    assert daemon.hellos == 1


def test_a_daemon_that_does_not_answer_fails_each_async_call_in_time(tmp_path):
    """DaemonClient.acall: a daemon that accepts and never answers is
    DaemonUnavailable after the call's timeout; no daemon at all at once."""
    paths = DaemonPaths.default(tmp_path)

    async def main() -> list[BaseException]:
        client = DaemonClient(paths)
        with pytest.raises(DaemonUnavailable, match="no daemon"):
            await client.acall("hello", timeout=5)
        async with _HeldDaemon(paths):
            calls = [client.acall("lease", timeout=0.5) for _ in range(5)]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(asyncio.wait_for(main(), 30))
    assert all(isinstance(o, DaemonUnavailable) for o in outcomes), outcomes
    assert "did not answer within" in str(outcomes[0])


def _lease_request(runtime: Path, warmup_code: str = "") -> dict[str, Any]:
    return {
        "kernel_name": KERNEL_NAME,
        "python": sys.executable,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "owner_pid": os.getpid(),
        "pool": {"size": 1, "warmup_code": warmup_code},
    }


def _run_on(info: dict[str, Any], code: str) -> Any:
    """``code``'s result on the kernel of a lease's connection info."""
    from jupyter_client import BlockingKernelClient

    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        result: dict[str, Any] = {}

        def output(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "execute_result":
                result["text"] = msg["content"]["data"]["text/plain"]

        reply = kc.execute_interactive(code, timeout=TIMEOUT, output_hook=output)
        assert reply["content"]["status"] == "ok", reply["content"]
        return eval(result["text"])
    finally:
        kc.stop_channels()


#: A warm-up whose result is each worker's own.
WARMUP_PID = "import os; warm_pid = os.getpid()"


def test_a_lease_with_no_warm_worker_gets_one_forked_for_its_launch(runtime, tmp_path):
    """No warm worker: the lease's worker is forked for it (not taken from
    the pool and configured after): a child of the fork server in the
    launch's cwd and env, where the warm-up ran again (what it makes is the
    worker's own, as in a pool's worker). A restart takes its next worker
    from the pool and stops the first; the release leaves nothing."""
    client = _daemon(runtime)
    request = {
        **_lease_request(runtime, warmup_code=WARMUP_PID),  # a pool of its own
        "cwd": str(tmp_path),
        "env": dict(os.environ, KERNEL_BURST_TAG="forked-for-it"),
    }
    lease = client.call("lease", **request)
    pids = [lease["worker_pid"]]
    try:
        probe = (
            "import os; os.getpid(), os.getppid(), os.getcwd(), os.environ['KERNEL_BURST_TAG'],"
            " warm_pid"
        )
        pid, ppid, cwd, tag, warm_pid = _run_on(lease["connection_info"], probe)
        assert pid == lease["worker_pid"] == warm_pid and lease["warm"] is False
        assert ppid in {f["pid"] for f in _ready_fork_servers(runtime)}
        assert (cwd, tag) == (str(tmp_path), "forked-for-it")
        pool = next(p for p in _status(runtime)["pools"] if p["warmup_code"] == WARMUP_PID)
        assert pool["leased"] == 0, "the worker came from the pool"
        client.call("kill", lease_id=lease["lease_id"], restart=True)
        restarted = client.call("restart", lease_id=lease["lease_id"])
        pids.append(restarted["worker_pid"])
        assert pids[1] != pids[0]
        assert_no_leftovers(pids[:1])  # the first worker was stopped, not leaked
        pid, _, cwd, tag, warm_pid = _run_on(restarted["connection_info"], probe)
        assert (pid, cwd, tag, warm_pid) == (pids[1], str(tmp_path), "forked-for-it", pids[1])
    finally:
        client.call("release", lease_id=lease["lease_id"])
    assert_no_leftovers(pids)


def test_fork_server_dying_mid_burst(runtime):
    """Leases fall back to new interpreters, the server is restarted, no
    worker is handed out twice, and `pyrepl3-kernel stop` leaves nothing."""
    client = _daemon(runtime)
    request = _lease_request(runtime, warmup_code="import json")
    first = client.call("lease", **request)  # the profile's fork server, ready
    server = next(p for p in client.call("status")["pools"] if p["warmup_code"] == "import json")
    server_pid = server["fork_server"]["pid"]
    assert server["fork_server"]["state"] == "ready"
    replies: list[dict[str, Any]] = [first]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(client.call, "lease", **request) for _ in range(12)]
        time.sleep(0.05)
        os.kill(server_pid, signal.SIGKILL)
        replies += [f.result(timeout=TIMEOUT) for f in futures]
    workers = [r["worker_pid"] for r in replies]
    assert len(set(workers)) == len(workers), "a worker was handed out twice"
    assert all(not pid_gone(pid) for pid in workers)
    deadline = time.monotonic() + TIMEOUT
    while True:
        pools = client.call("status")["pools"]
        fork = next(p for p in pools if p["warmup_code"] == "import json")["fork_server"]
        if fork["state"] == "ready" and fork["restarts"] >= 1:
            break
        assert time.monotonic() < deadline, fork
        time.sleep(0.1)
    new_server = fork["pid"]
    assert new_server != server_pid
    stop_daemon(runtime)
    assert_no_leftovers([*workers, server_pid, new_server])


def test_warmup_that_starts_a_thread_is_reported_and_served_cold(runtime):
    warmup = "import threading, time; threading.Thread(target=time.sleep, args=(600,), name='held', daemon=True).start()"
    client = _daemon(runtime)
    reply = client.call("lease", **_lease_request(runtime, warmup_code=warmup))
    try:
        pool = next(p for p in client.call("status")["pools"] if p["warmup_code"] == warmup)
        assert pool["fork_server"]["state"] == "unsafe"
        assert "held" in pool["fork_server"]["reason"]
        assert _ppid(reply["worker_pid"]) == client.call("hello")["pid"]  # a new interpreter
        shown = subprocess.run(
            [sys.executable, "-m", "pyrepl3_kernel.cli", "status", "--runtime-dir", str(runtime)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "fork server unsafe" in shown and "thread" in shown, shown
    finally:
        client.call("release", lease_id=reply["lease_id"])


def test_least_recently_used_fork_servers_are_stopped(runtime):
    """At most MAX_FORK_SERVERS profiles keep a fork server; a profile
    whose server was stopped gets a new one (and its workers are forked)."""
    from pyrepl3_kernel.daemon.forkservers import MAX_FORK_SERVERS

    client = _daemon(runtime)
    codes = [f"x_{i} = {i}" for i in range(MAX_FORK_SERVERS + 1)]
    request = {**_lease_request(runtime), "pool": {"enabled": False}}
    leases = []
    try:
        for code in codes:  # a profile per warm-up code (pools of size 0)
            reply = client.call("lease", **{**request, "pool": {"size": 0, "warmup_code": code}})
            leases.append(reply["lease_id"])
        servers = client.call("status")["fork_servers"]
        assert len(servers) <= MAX_FORK_SERVERS, servers
        assert codes[0] not in [f["warmup_code"] for f in servers]
        reply = client.call("lease", **{**request, "pool": {"size": 0, "warmup_code": codes[0]}})
        leases.append(reply["lease_id"])
        ready = {
            f["warmup_code"]: f["pid"]
            for f in client.call("status")["fork_servers"]
            if f["state"] == "ready"
        }
        assert _ppid(reply["worker_pid"]) == ready[codes[0]]
    finally:
        for lease_id in leases:
            client.call("release", lease_id=lease_id)


# -- prepared at start ------------------------------------------------------------------


def _wait_for_ready_fork_server(runtime: Path, proc: subprocess.Popen[Any]) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            status = DaemonClient(DaemonPaths.default(runtime), timeout=10).call("status")
        except Exception:
            status = None
        if status is not None:
            ready = [f for f in status["fork_servers"] if f["state"] == "ready"]
            if ready:
                assert not status["leases"] and status["daemon"]["leases_served"] == 0
                return ready[0]
        time.sleep(0.1)
    raise AssertionError("no fork server became ready")


def test_a_daemon_prepares_its_fork_server_at_start(tmp_path):
    runtime = tmp_path / "runtime"
    env = {**os.environ, "PYREPL3_DAEMON_PREPARE": json.dumps({"warmup_code": "import json"})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyrepl3_kernel.cli", "serve", "--runtime-dir", str(runtime)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        server = _wait_for_ready_fork_server(runtime, proc)
        assert server["warmup_code"] == "import json"
    finally:
        stop_daemon(runtime)
        proc.kill()
        proc.wait(10)
    assert_no_leftovers([server["pid"]])


def test_killing_the_daemon_ends_its_fork_server_and_forked_workers(tmp_path):
    runtime = tmp_path / "runtime"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyrepl3_kernel.cli", "serve", "--runtime-dir", str(runtime)],
        stderr=subprocess.DEVNULL,
    )
    pids: list[int] = []
    try:
        server = _wait_for_ready_fork_server(runtime, proc)
        pids.append(server["pid"])
        client = DaemonClient(DaemonPaths.default(runtime), timeout=TIMEOUT)
        request = {**_lease_request(runtime), "pool": {"enabled": False}}
        worker = client.call("lease", **request)["worker_pid"]
        pids.append(worker)
        assert _ppid(worker) == server["pid"]
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while not all(pid_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(10)
        stop_daemon(runtime)
    assert_no_leftovers(pids, timeout=1)


def test_gateway_prepares_the_fork_server_before_the_first_kernel(runtime, tmp_path):
    pytest.importorskip("jupyter_server")
    own_runtime = tmp_path / "gw-runtime"
    own_runtime.mkdir(mode=0o700)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(own_runtime)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyrepl3_kernel.cli",
            "gateway",
            "--port=0",
            "--no-browser",
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    server: dict[str, Any] = {}
    try:
        server = _wait_for_ready_fork_server(own_runtime, proc)
        # and the kernelspec's pool, its first worker forked and waiting
        client = DaemonClient(DaemonPaths.default(own_runtime), timeout=10)
        deadline = time.monotonic() + TIMEOUT
        while True:
            status = client.call("status")
            pools = [p for p in status["pools"] if p["kernel_name"] == KERNEL_NAME]
            if pools and pools[0]["idle"] >= 1:
                break
            assert time.monotonic() < deadline, status["pools"]
            time.sleep(0.1)
        assert status["daemon"]["leases_served"] == 0
        assert pools[0]["fork_server"]["forked"] >= 1
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        stop_daemon(own_runtime)
    assert_no_leftovers([server["pid"]] if server else [])
