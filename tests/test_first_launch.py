"""The first launch (docs/daemon.md, "The first launch"): an argv launch
with no daemon running starts its kernel standalone at once and leaves a
daemon with a ready fork server behind, which the next launch is handed to;
a launch while that fork server is still starting is not held up; a
launcher that confines its kernel starts no daemon; ``pyrepl3-kernel
gateway`` answers only once its daemon, fork server and pool are ready.

Each test has a runtime directory (so a daemon) of its own, stopped at the
end, and checks by pid that nothing it started is left.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_helpers import KERNEL_NAME, stop_daemon
from session_helpers import assert_no_leftovers

from pyrepl3_kernel.daemon.client import DaemonClient, DaemonError, DaemonPaths
from pyrepl3_kernel.daemonstart import daemon_starting, ensure_daemon, mark_starting, start_daemon

ARGV_KERNEL = "pyrepl3-first-argv"
TIMEOUT = 60.0


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Path]:
    """A runtime directory of this test's own; its daemon is stopped at the end."""
    runtime_dir = tmp_path / "runtime"
    runtime_dir.mkdir(mode=0o700)
    try:
        yield runtime_dir
    finally:
        stop_daemon(runtime_dir)


@pytest.fixture
def argv_specs(pyrepl3_kernelspec: Path, tmp_path: Path) -> KernelSpecManager:
    """A kernelspec with only an argv (what VS Code runs), and the same
    argv under a launcher that lowers a resource limit."""
    kernels = tmp_path / "kernels"
    argv = [sys.executable, "-m", "pyrepl3_kernel", "-f", "{connection_file}"]
    limited = f'ulimit -n 500 && exec {sys.executable} -m pyrepl3_kernel -f "$1"'
    for name, spec_argv in (
        (ARGV_KERNEL, argv),
        (ARGV_KERNEL + "-limited", ["/bin/sh", "-c", limited, "sh", "{connection_file}"]),
    ):
        (kernels / name).mkdir(parents=True)
        spec = {"argv": spec_argv, "display_name": name, "language": "python"}
        (kernels / name / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def _client(runtime: Path) -> DaemonClient:
    return DaemonClient(DaemonPaths.default(runtime), timeout=TIMEOUT)


def _launch(
    specs: KernelSpecManager, runtime: Path, name: str = ARGV_KERNEL, **kwargs: Any
) -> KernelManager:
    km = KernelManager(kernel_name=name, kernel_spec_manager=specs)
    km.start_kernel(env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}, **kwargs)
    return km


def _pids(km: KernelManager) -> tuple[int, int]:
    """(the kernel's worker pid, its parent's pid)."""
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        result: dict[str, str] = {}

        def output(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "execute_result":
                result["text"] = msg["content"]["data"]["text/plain"]

        reply = kc.execute_interactive(
            "import os; (os.getpid(), os.getppid())", timeout=TIMEOUT, output_hook=output
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        worker, parent = eval(result["text"])
        return int(worker), int(parent)
    finally:
        kc.stop_channels()


def _ready_fork_server(runtime: Path, count: int = 1) -> dict[str, Any]:
    """The daemon's status once ``count`` fork servers are ready (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = _client(runtime).call("status", timeout=10)
        except Exception:
            status = {}
        if sum(f["state"] == "ready" for f in status.get("fork_servers", [])) >= count:
            return status
        time.sleep(0.05)
    raise AssertionError(f"no ready fork server: {status}")


def _daemon_pids(status: dict[str, Any]) -> list[int]:
    return [status["daemon"]["pid"], *(f["pid"] for f in status["fork_servers"] if f["pid"])]


def _shutdown(*managers: KernelManager) -> None:
    for km in managers:
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# -- the argv path -------------------------------------------------------------------


def test_first_argv_launch_runs_standalone_and_leaves_a_warm_daemon(runtime, argv_specs):
    assert _client(runtime).ping() is None
    first = _launch(argv_specs, runtime)
    second: KernelManager | None = None
    pids: list[int] = []
    try:
        worker, parent = _pids(first)
        pids.append(worker)
        # no daemon answered: the kernel is this process's own, at once
        assert parent == first.provisioner.process.pid
        # ... and the daemon it started in the background gets its fork server ready
        status = _ready_fork_server(runtime)
        pids += _daemon_pids(status)
        assert status["daemon"]["starter"]["pid"] == os.getpid()  # JPY_PARENT_PID: the client
        assert status["daemon"]["leases_served"] == 0
        fork_server = next(f["pid"] for f in status["fork_servers"] if f["state"] == "ready")
        # ... and the pool of this kernelspec, so the next launch is leased warm
        deadline = time.monotonic() + TIMEOUT
        while True:
            pools = _client(runtime).call("status")["pools"]
            if any(p["kernel_name"] == ARGV_KERNEL and p["idle"] >= 1 for p in pools):
                break
            assert time.monotonic() < deadline, pools
            time.sleep(0.05)
        # The next launch is handed over: its worker is forked by that server.
        second = _launch(argv_specs, runtime)
        worker2, parent2 = _pids(second)
        pids.append(worker2)
        assert parent2 == fork_server
        leases = _client(runtime).call("status")["leases"]
        assert [lease["owner_pid"] for lease in leases] == [second.provisioner.process.pid]
        assert leases[0]["warm"], leases  # from the pool the daemon prepared at start
    finally:
        _shutdown(first, *([second] if second else []))
        stop_daemon(runtime)
    assert_no_leftovers(pids)


def test_a_launch_while_the_fork_server_starts_is_not_held_up(runtime):
    client = _client(runtime)
    ensure_daemon(client, starter=os.getpid())
    pids = _daemon_pids(_ready_fork_server(runtime))
    ports = _free_ports(5)
    request = {
        "connection_info": {
            "transport": "tcp",
            "ip": "127.0.0.1",
            "key": secrets.token_hex(16),
            "signature_scheme": "hmac-sha256",
            **dict(
                zip(
                    ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"),
                    ports,
                    strict=True,
                )
            ),
        },
        "python": sys.executable,
        # another start-up environment: a fork server of its own, starting now
        "env": {**os.environ, "PYTHONHASHSEED": "7"},
        "cwd": str(runtime),
        "owner_pid": os.getpid(),
        "fork_server_wait_s": 0,
    }
    try:
        with pytest.raises(DaemonError) as refused:
            client.call("handoff", **request)
        assert refused.value.code == "warming", refused.value
        status = _ready_fork_server(runtime, count=2)  # it goes on starting
        pids += _daemon_pids(status)
        assert status["leases"] == []
        reply = client.call("handoff", **request)  # ready now: handed over at once
        pids.append(reply["worker_pid"])
        servers = [f["pid"] for f in status["fork_servers"]]
        with open(f"/proc/{reply['worker_pid']}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) in servers
        client.call("release", lease_id=reply["lease_id"])
    finally:
        stop_daemon(runtime)
    assert_no_leftovers(pids)


def test_a_confined_first_launch_starts_no_daemon(runtime, argv_specs, tmp_path):
    """A launcher that confines its kernel (here ``ulimit -n``) means it for
    the kernel: a daemon started from there would serve later kernels so."""
    err = tmp_path / "kernel.err"
    with open(err, "w") as stderr:
        km = _launch(argv_specs, runtime, ARGV_KERNEL + "-limited", stderr=stderr)
    worker = 0
    try:
        worker, parent = _pids(km)
        assert parent == km.provisioner.process.pid
    finally:
        _shutdown(km)
    assert "confined by its launcher (RLIMIT_NOFILE)" in err.read_text()
    paths = DaemonPaths.default(runtime)
    assert _client(runtime).ping() is None and not daemon_starting(paths)
    assert_no_leftovers([worker])


def test_stop_ends_a_daemon_still_waiting_to_start(runtime):
    """``pyrepl3-kernel stop`` while the daemon a first launch started still
    waits for that launch's kernel: nothing comes up after it."""
    busy = subprocess.Popen(["sleep", "60"])  # a "kernel" that never gets a worker
    try:
        paths = DaemonPaths.default(runtime)
        shell = start_daemon(paths, starter_pid=os.getpid(), after_start_of=busy.pid)
        mark_starting(paths, shell)
        group = os.getpgid(shell)
        assert daemon_starting(paths) and _client(runtime).ping() is None
        done = subprocess.run(
            [sys.executable, "-m", "pyrepl3_kernel.cli", "stop", "--runtime-dir", str(runtime)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "stopped the pyrepl3 daemon" in done.stdout, done
        assert_no_leftovers([shell])
        assert_no_leftovers(_group(group))  # the start-up wait too
        assert not daemon_starting(paths)
    finally:
        busy.kill()
        busy.wait(10)


def _group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (zombies: gone)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    found.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return found


# -- pyrepl3-kernel gateway ----------------------------------------------------------


def test_gateway_answers_with_its_fork_server_and_pool_ready(runtime, tmp_path):
    requests = pytest.importorskip("requests")
    pytest.importorskip("jupyter_server")
    (port,) = _free_ports(1)
    token = secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    for name in ("config", "data"):
        (tmp_path / name).mkdir()
        env[f"JUPYTER_{name.upper()}_DIR"] = str(tmp_path / name)
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyrepl3_kernel.cli",
                "gateway",
                f"--port={port}",
                f"--IdentityProvider.token={token}",
                "--ServerApp.port_retries=0",
                *(["--allow-root"] if os.geteuid() == 0 else []),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"token {token}"}
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while True:  # until it first answers
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if requests.get(url + "/api/status", headers=headers, timeout=5).ok:
                    break
            except requests.RequestException:
                time.sleep(0.05)
        # At once, no waiting: the daemon, its fork server and the pool are ready.
        status = _client(runtime).call("status")
        pids += _daemon_pids(status)
        ready = [f for f in status["fork_servers"] if f["state"] == "ready"]
        assert ready, status["fork_servers"]
        pools = [p for p in status["pools"] if p["kernel_name"] == KERNEL_NAME]
        assert pools and pools[0]["idle"] >= 1, status["pools"]
        assert status["daemon"]["leases_served"] == 0
        assert "fork server is ready" in log.read_text()
        # and its first kernel is forked
        r = requests.post(url + "/api/kernels", json={"name": KERNEL_NAME}, headers=headers)
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + TIMEOUT
        while True:  # its worker is listed once the kernel has configured it
            leases = _client(runtime).call("status")["leases"]
            assert len(leases) == 1, leases
            if leases[0]["worker_pid"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        pids.append(leases[0]["worker_pid"])
        assert leases[0]["warm"], leases  # from the pool the gateway prepared
        with open(f"/proc/{leases[0]['worker_pid']}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) in [f["pid"] for f in ready]
        requests.delete(f"{url}/api/kernels/{r.json()['id']}", headers=headers, timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        stop_daemon(runtime)
    assert_no_leftovers(pids)
