"""How long a manager daemon lives, and what dies with a killed gateway.

The policy (docs/daemon.md, "Lifecycle"):

- its runtime directory or socket removed: the daemon exits at once, with
  its kernels (no client can reach it);
- started by a Jupyter server: it exits once that server is gone (its
  process ended, or, in process, it removed its ``jpserver-PID.json``) and
  nothing is leased;
- started by another client (nbclient, papermill, ``jupyter console``, a
  script) in a runtime directory that is not the usual one (a test suite's):
  it exits once that client is gone and nothing is leased;
- started by such a client in the usual runtime directory: it stays for
  ``idle_timeout`` after the last lease, so the next short-lived client gets
  a warm kernel.

And a SIGKILLed gateway (a standalone kernel process, or the daemon) takes
along its workers and every process their cells started.

Each test that needs a daemon of its own gives it its own runtime dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_client import KernelManager
from pool_helpers import (
    PoolSetup,
    alive,
    assert_gone,
    cli,
    pooled_kernelspec,
    tree,
    wait_until,
)
from test_rest_api import AS_ROOT, free_port

from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths

NAME = "pyrepl3-lifetime"
COLD = "pyrepl3-lifetime-cold"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolSetup]:
    with pooled_kernelspec(tmp_path_factory.mktemp("lifetime"), NAME) as pool:
        pool.add_spec(COLD, pool_enabled=False)
        yield pool


# -- removing the runtime directory or the socket -------------------------------------


@pytest.fixture
def served(setup: PoolSetup, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``pyrepl3-kernel serve`` in a runtime dir of its own, with one kernel
    leased and a warm worker waiting."""
    runtime = tmp_path / "runtime"
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyrepl3_kernel.cli", "serve", "--runtime-dir", str(runtime)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        client = DaemonClient(DaemonPaths.default(runtime), timeout=60)
        wait_until(lambda: client.ping() is not None, 30, "the daemon to answer")
        client.call(
            "lease",
            kernel_name=NAME,
            owner_pid=os.getpid(),
            env=dict(os.environ),
            cwd=str(tmp_path),
            pool={"size": 1},
        )
        wait_until(lambda: client.call("status")["pools"][0]["idle"] >= 1, 60, "a warm worker")
        yield proc, runtime
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_daemon_exits_when_its_runtime_dir_is_removed(
    served: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, runtime = served
    processes = tree(proc.pid)
    assert len(processes) >= 3  # the daemon, the leased worker, a warm one
    shutil.rmtree(runtime)
    assert proc.wait(timeout=30) == 0
    assert_gone(processes)


def test_the_daemon_exits_when_its_socket_is_removed(
    served: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, runtime = served
    processes = tree(proc.pid)
    DaemonPaths.default(runtime).socket.unlink()
    assert proc.wait(timeout=30) == 0
    assert_gone(processes)
    assert runtime.is_dir()


# -- the process that started the daemon ------------------------------------------------

#: Starts a pooled kernel (the provisioner starts the daemon if none runs),
#: runs a cell, shuts it down; prints the lease and the daemon's pid.
CLIENT = textwrap.dedent(
    """
    import json, sys
    from jupyter_client import KernelManager
    from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths

    km = KernelManager(kernel_name=sys.argv[1])
    km.start_kernel()
    lease, warm = km.provisioner.lease_id, km.provisioner.warm
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    status = kc.execute_interactive("x = 1 + 1", timeout=60)["content"]["status"]
    kc.stop_channels()
    km.shutdown_kernel()
    daemon = DaemonClient(DaemonPaths.default()).call("hello")["pid"]
    print()
    print("RESULT", json.dumps({"lease": lease, "warm": warm, "daemon": daemon, "status": status}))
    """
)


def run_client(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, NAME],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    assert result["lease"] and result["status"] == "ok", (result, done.stderr)
    return result


def usual_env(home: Path) -> dict[str, str]:
    """The environment of a user whose home is ``home``, with no Jupyter
    directory chosen by a variable: the runtime dir is the usual one."""
    env = dict(os.environ)
    for var in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "XDG_DATA_HOME"):
        env.pop(var, None)
    env["HOME"] = str(home)
    return env


def usual_runtime_dir(home: Path) -> Path:
    return home / ".local" / "share" / "jupyter" / "runtime"


def test_a_daemon_started_by_a_client_in_a_test_runtime_dir_exits_with_it(
    setup: PoolSetup, tmp_path: Path
) -> None:
    runtime = tmp_path / "runtime"
    try:
        result = run_client({**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}, tmp_path)
        # the client is gone and nothing is leased: no idle_timeout (600 s) to wait for
        assert_gone([result["daemon"]], timeout=30)
        assert not DaemonPaths.default(runtime).socket.exists()
    finally:
        cli("stop", "--runtime-dir", str(runtime), check=False, timeout=60)


def test_a_daemon_in_the_usual_runtime_dir_outlives_short_clients(
    setup: PoolSetup, tmp_path: Path
) -> None:
    """As papermill or nbclient runs one after another: the second finds
    the daemon the first started, and a warm kernel in it."""
    home = tmp_path / "home"
    home.mkdir()
    env = usual_env(home)
    runtime = usual_runtime_dir(home)
    try:
        first = run_client(env, tmp_path)
        client = DaemonClient(DaemonPaths.default(runtime), timeout=30)
        # the daemon's watch has seen its starter go, and it stays
        wait_until(
            lambda: (client.call("status")["daemon"]["starter"] or {}).get("gone"),
            30,
            "the daemon to notice that its starter exited",
        )
        status = client.call("status")
        assert status["daemon"]["usual_runtime_dir"] is True
        assert status["daemon"]["pid"] == first["daemon"]
        wait_until(lambda: client.call("status")["pools"][0]["idle"] >= 1, 60, "a warm worker")
        second = run_client(env, tmp_path)
        assert second["daemon"] == first["daemon"]
        assert second["warm"] is True
    finally:
        cli("stop", "--runtime-dir", str(runtime), check=False, timeout=60)


#: An in-process Jupyter server, as a test suite runs one: it starts a pooled
#: kernel, shuts it down and cleans up (removing its jpserver-PID.json), and
#: its process lives on until stdin closes.
IN_PROCESS_SERVER = textwrap.dedent(
    """
    import json, sys
    from jupyter_server.serverapp import ServerApp
    from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths

    name, port, root = sys.argv[1], sys.argv[2], sys.argv[3]
    app = ServerApp()
    app.initialize(argv=[f"--port={port}", "--ServerApp.port_retries=0", "--no-browser",
                         "--IdentityProvider.token=secret", f"--ServerApp.root_dir={root}",
                         *sys.argv[4:]])
    app.start_app()  # writes jpserver-PID.json into the runtime dir

    async def main():
        km = app.kernel_manager
        kernel_id = await km.start_kernel(kernel_name=name)
        lease = km.get_kernel(kernel_id).provisioner.lease_id
        daemon = DaemonClient(DaemonPaths.default()).call("hello")["pid"]
        await km.shutdown_kernel(kernel_id)
        await app._cleanup()
        return {"lease": lease, "daemon": daemon, "info_file": app.info_file}

    print(json.dumps(app.io_loop.run_sync(main)), flush=True)
    sys.stdin.read()
    """
)


def test_a_daemon_started_by_a_server_exits_when_the_server_stops(
    setup: PoolSetup, tmp_path: Path
) -> None:
    """Even in the usual runtime dir, and while the server's process lives on."""
    home = tmp_path / "home"
    home.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    runtime = usual_runtime_dir(home)
    proc = subprocess.Popen(
        [sys.executable, "-c", IN_PROCESS_SERVER, NAME, str(free_port()), str(root), *AS_ROOT],
        env=usual_env(home),
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        result = json.loads(line)
        assert result["lease"], "the server's kernel was started cold"
        assert Path(result["info_file"]).parent == runtime
        assert not Path(result["info_file"]).exists()
        assert_gone([result["daemon"]], timeout=30)
        assert proc.poll() is None, "the server's process should still run"
    finally:
        proc.kill()
        proc.communicate()
        cli("stop", "--runtime-dir", str(runtime), check=False, timeout=60)


# -- a killed gateway takes its cells' processes along ---------------------------------

#: Starts two processes from a cell (one of them with a child of its own) and
#: prints the worker's pid.
SPAWN = (
    "import os, subprocess\n"
    "sleeper = subprocess.Popen(['sleep', '1000'])\n"
    "shell = subprocess.Popen(['sh', '-c', 'sleep 1000 & wait'])\n"
    "print('worker', os.getpid())"
)


def spawn_in(km: KernelManager) -> tuple[int, list[int]]:
    """Run SPAWN in ``km``'s kernel: the worker's pid and its descendants."""
    kc = km.client()
    kc.start_channels()
    out: list[str] = []
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive(
            SPAWN, timeout=60, output_hook=lambda m: out.append(m["content"].get("text", ""))
        )
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
    worker = int("".join(out).split()[1])

    def started() -> list[int]:
        found = []
        for pid in tree(worker)[1:]:
            try:
                if psutil.Process(pid).name() in ("sh", "sleep"):
                    found.append(pid)
            except psutil.NoSuchProcess:
                pass
        return found

    wait_until(lambda: len(started()) == 3, 30, "the cell's processes (sh, sleep, sleep)")
    return worker, started()


def test_a_killed_kernel_process_takes_its_cells_processes_along(setup: PoolSetup) -> None:
    km = KernelManager(kernel_name=COLD)
    km.start_kernel(cwd=str(setup.work))
    try:
        gateway = km.provisioner._fallback.process.pid
        worker, descendants = spawn_in(km)
        os.kill(gateway, signal.SIGKILL)
        assert_gone([worker, *descendants], timeout=30)
    finally:
        km.shutdown_kernel(now=True)


def test_a_killed_daemon_takes_its_cells_processes_along(setup: PoolSetup) -> None:
    km = KernelManager(kernel_name=NAME)
    km.start_kernel(cwd=str(setup.work))
    try:
        assert km.provisioner.lease_id is not None, "the kernel was started cold"
        setup.wait_idle(1)
        daemon = setup.daemon_pid()
        worker, descendants = spawn_in(km)
        everything = tree(daemon)  # the warm workers too
        assert set([worker, *descendants]) <= set(everything)
        os.kill(daemon, signal.SIGKILL)
        assert_gone(everything, timeout=30)
        assert not alive(daemon)
    finally:
        km.shutdown_kernel(now=True)  # the daemon is gone: the kernel is dead, no error
