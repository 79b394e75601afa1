"""Warm kernels from the ``pyrepl3-pool`` provisioner, for every kind of client.

JupyterLab's server (jupyter_server's session and kernel managers, in
process), nbclient, papermill and ``jupyter console`` start kernels of a
pooled kernelspec (``--pool-size 2 --warmup-code "import numpy"``); each test
shows that the lease was served warm from the pool (the daemon's counters, the
lease in ``status`` or ``provisioner.warm``) and that the launch's cwd and
environment reached the kernel. Then: restart in place, and the provisioner
settings (pool size, warm-up code, ``pool_enabled=False``).

One daemon serves the whole module (its own runtime dir); it is stopped at
the end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pexpect
import pytest
from jupyter_client import KernelManager
from pool_helpers import (
    PROBE,
    PoolSetup,
    alive,
    assert_gone,
    pooled_kernelspec,
    probe_result,
    tree,
    wait_until,
)
from traitlets.config import Config

NAME = "pyrepl3-clients"
NOPOOL = "pyrepl3-clients-nopool"
WARMUP = "import numpy"
CONSOLE = Path(sys.executable).with_name("jupyter-console")
PAPERMILL = Path(sys.executable).with_name("papermill")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolSetup]:
    base = tmp_path_factory.mktemp("pool-clients")
    with pooled_kernelspec(base, NAME, "--pool-size", "2", "--warmup-code", WARMUP) as setup:
        setup.add_spec(NOPOOL, pool_enabled=False)
        # The first launch starts the daemon, and with it the pool: it is
        # cold. Every test after it waits for warm workers.
        km = KernelManager(kernel_name=NAME)
        km.start_kernel()
        try:
            assert km.provisioner.lease_id is not None, "the daemon did not start"
        finally:
            km.shutdown_kernel(now=True)
        yield setup


@pytest.fixture
def workdir(pool: PoolSetup, request: pytest.FixtureRequest) -> Path:
    path = pool.work / request.node.name.replace("[", "-").rstrip("]") / "a dir"
    path.mkdir(parents=True)
    return path


def run_cell(kc: Any, code: str, timeout: float = 60) -> str:
    """Run ``code`` through a blocking client; its stdout."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


def lease_of(pool: PoolSetup, owner_pid: int) -> dict[str, Any]:
    leases = [lease for lease in pool.status()["leases"] if lease["owner_pid"] == owner_pid]
    assert len(leases) == 1, leases
    return leases[0]


def test_kernel_manager_gets_a_warm_kernel_with_its_cwd_and_env(
    pool: PoolSetup, workdir: Path
) -> None:
    pool.wait_idle(2)
    served, warm = pool.counters()
    km = KernelManager(kernel_name=NAME)
    env = {**os.environ, "KERNEL_FOO": "foo value", "JPY_SESSION_NAME": "/some/nb.ipynb"}
    km.start_kernel(cwd=str(workdir), env=env)
    try:
        assert km.provisioner.warm is True
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        probe = probe_result(run_cell(kc, PROBE))
        kc.stop_channels()
        assert probe["cwd"] == str(workdir)
        assert probe["foo"] == "foo value"
        assert probe["session"] == "/some/nb.ipynb"
        assert probe["numpy"] is True, "the warm-up code did not run in the leased worker"
        # `pyrepl3-kernel status --json`, as a user would look
        status = pool.cli_status()
        assert (status["daemon"]["leases_served"], status["daemon"]["warm_leases"]) == (
            served + 1,
            warm + 1,
        )
        (lease,) = [
            lease for lease in status["leases"] if lease["lease_id"] == km.provisioner.lease_id
        ]
        assert lease["warm"] is True
        assert lease["owner_pid"] == os.getpid()
        assert lease["worker_pid"] == probe["pid"]
        assert lease["kernel_name"] == NAME
        # the kernelspec's provisioner config made the pool
        (spec_pool,) = [p for p in status["pools"] if p["kernel_name"] == NAME]
        assert spec_pool["min_idle"] == 2 and spec_pool["warmup_code"] == WARMUP
        ports = {k: v for k, v in km.get_connection_info().items() if k.endswith("_port")}
        assert lease["ports"] == ports
    finally:
        km.shutdown_kernel()
    assert not alive(probe["pid"])
    assert km.provisioner.lease_id is None
    assert not [lease for lease in pool.status()["leases"] if lease["owner_pid"] == os.getpid()]


def test_jupyter_server_session_gets_a_warm_kernel(
    pool: PoolSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What JupyterLab does on opening ``sub/dir/nb.ipynb``: POST /api/sessions
    ends in SessionManager.create_session, then AsyncMappingKernelManager."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
    from jupyter_server.services.sessions.sessionmanager import SessionManager

    root = pool.work / "server-root"
    (root / "sub" / "dir").mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(), root / "sub" / "dir" / "nb.ipynb")
    monkeypatch.setenv("KERNEL_FOO", "from the server")
    pool.wait_idle(2)
    served, warm = pool.counters()

    async def body() -> dict[str, Any]:
        mkm = AsyncMappingKernelManager(kernel_spec_manager=KernelSpecManager(), root_dir=str(root))
        sm = SessionManager(
            kernel_manager=mkm, contents_manager=AsyncLargeFileManager(root_dir=str(root))
        )
        model = await sm.create_session(
            path="sub/dir/nb.ipynb", name="nb.ipynb", type="notebook", kernel_name=NAME
        )
        kernel_id = model["kernel"]["id"]
        try:
            km = mkm.get_kernel(kernel_id)
            assert km.provisioner.warm is True
            kc = km.client()
            # The client's session is a clone of the manager's, message counter
            # included: its msg_ids would repeat those of the kernel_info_request
            # the server sends after a restart. A browser has a session of its own.
            kc.session.session = uuid.uuid4().hex
            kc.start_channels()
            await kc.wait_for_ready(timeout=60)
            out: list[str] = []
            reply = await kc.execute_interactive(
                PROBE + "\nx = 1",
                timeout=60,
                output_hook=lambda m: out.append(m["content"].get("text", "")),
            )
            assert reply["content"]["status"] == "ok"
            probe = probe_result("".join(out))
            # JupyterLab's restart button
            await asyncio.to_thread(pool.wait_idle, 1)
            await mkm.restart_kernel(kernel_id)
            assert km.provisioner.warm is True
            out.clear()
            reply = await kc.execute_interactive(
                "import os; print(os.getpid(), 'x' in dir())",
                timeout=60,
                output_hook=lambda m: out.append(m["content"].get("text", "")),
            )
            assert reply["content"]["status"] == "ok"
            new_pid, x_defined = "".join(out).split()
            assert int(new_pid) != probe["pid"] and x_defined == "False"
            kc.stop_channels()
        finally:
            await sm.delete_session(model["id"])
            await mkm.shutdown_all()
        return probe

    probe = asyncio.run(body())
    assert probe["cwd"] == str(root / "sub" / "dir")
    assert probe["foo"] == "from the server"
    assert probe["session"] == str(root / "sub" / "dir" / "nb.ipynb")
    assert probe["numpy"] is True
    # the first lease and its restart: both warm
    assert pool.counters() == (served + 1, warm + 1)
    assert not alive(probe["pid"])


def probe_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(PROBE), nbformat.v4.new_code_cell("21 * 2")]
    nbformat.write(nb, path)


def notebook_probe(path: Path) -> dict[str, Any]:
    nb = nbformat.read(path, as_version=4)
    first, second = nb.cells[0], nb.cells[1]
    text = "".join(o.get("text", "") for o in first.outputs if o.output_type == "stream")
    assert second.outputs[0]["data"]["text/plain"] == "42"
    return probe_result(text)


def test_nbclient_gets_a_warm_kernel(
    pool: PoolSetup, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbclient import NotebookClient

    probe_notebook(workdir / "nb.ipynb")
    monkeypatch.setenv("KERNEL_FOO", "from nbclient")
    pool.wait_idle(2)
    served, warm = pool.counters()
    nb = nbformat.read(workdir / "nb.ipynb", as_version=4)
    NotebookClient(
        nb, kernel_name=NAME, timeout=60, resources={"metadata": {"path": str(workdir)}}
    ).execute()
    nbformat.write(nb, workdir / "nb.ipynb")
    probe = notebook_probe(workdir / "nb.ipynb")
    assert probe["cwd"] == str(workdir)
    assert probe["foo"] == "from nbclient"
    assert probe["numpy"] is True
    assert pool.counters() == (served + 1, warm + 1)
    assert not alive(probe["pid"])
    assert pool.status()["leases"] == []


def test_papermill_gets_a_warm_kernel(pool: PoolSetup, workdir: Path) -> None:
    probe_notebook(workdir / "in.ipynb")
    pool.wait_idle(2)
    served, warm = pool.counters()
    done = subprocess.run(
        [
            str(PAPERMILL),
            str(workdir / "in.ipynb"),
            str(workdir / "out.ipynb"),
            "-k",
            NAME,
            "--cwd",
            str(workdir),
        ],
        env={**os.environ, "KERNEL_FOO": "from papermill"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    probe = notebook_probe(workdir / "out.ipynb")
    assert probe["cwd"] == str(workdir)
    assert probe["foo"] == "from papermill"
    assert probe["numpy"] is True
    assert pool.counters() == (served + 1, warm + 1)
    assert not alive(probe["pid"])
    assert pool.status()["leases"] == []


def test_jupyter_console_gets_a_warm_kernel(pool: PoolSetup, workdir: Path) -> None:
    home = workdir.parent / "home"
    home.mkdir()
    env = {
        **os.environ,
        "KERNEL_FOO": "from the console",
        "HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "TERM": "xterm",
    }
    pool.wait_idle(2)
    served, warm = pool.counters()
    child = pexpect.spawn(
        str(CONSOLE),
        ["--kernel", NAME, "--simple-prompt"],
        cwd=str(workdir),
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 400),
    )
    try:
        child.expect(r"In \[1\]: ")
        child.sendline(PROBE)
        child.expect(r"In \[2\]: ")
        probe = probe_result(child.before.replace("\r", ""))
        lease = lease_of(pool, child.pid)
        assert lease["warm"] is True and lease["worker_pid"] == probe["pid"]
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert probe["cwd"] == str(workdir)
    assert probe["foo"] == "from the console"
    assert probe["numpy"] is True
    assert pool.counters() == (served + 1, warm + 1)
    assert_gone([probe["pid"]])
    assert pool.status()["leases"] == []


@pytest.mark.parametrize("now", [False, True], ids=["polite", "now"])
def test_restart_in_place(pool: PoolSetup, workdir: Path, now: bool) -> None:
    """jupyter_server restarts politely; its restarter (after a death) and
    ``restart_kernel(now=True)`` kill first: the lease and its ports stay."""
    pool.wait_idle(2)
    km = KernelManager(kernel_name=NAME)
    km.start_kernel(cwd=str(workdir))
    try:
        assert km.provisioner.warm is True
        lease_id = km.provisioner.lease_id
        before = km.get_connection_info()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        first = probe_result(run_cell(kc, PROBE + "\nx = 41"))
        pool.wait_idle(1)
        km.restart_kernel(now=now)
        assert km.provisioner.warm is True, "the new worker did not come from the pool"
        assert km.provisioner.lease_id == lease_id
        after = km.get_connection_info()
        assert after == before  # same ports, same key
        # The client made before the restart keeps working, on a fresh namespace.
        out = run_cell(kc, "print('x' in dir())\n" + PROBE)
        assert out.splitlines()[0] == "False"
        second = probe_result(out)
        assert second["pid"] != first["pid"]
        assert second["cwd"] == str(workdir) and second["numpy"] is True
        assert_gone([first["pid"]])
        # a second client made now works too
        kc2 = km.client()
        kc2.start_channels()
        kc2.wait_for_ready(timeout=60)
        assert run_cell(kc2, "print(6 * 7)").strip() == "42"
        kc2.stop_channels()
        kc.stop_channels()
    finally:
        km.shutdown_kernel()
    assert_gone([second["pid"]])


@pytest.mark.parametrize("how", ["kernelspec", "config"])
def test_pool_enabled_false_starts_cold(pool: PoolSetup, workdir: Path, how: str) -> None:
    served, _ = pool.counters()
    if how == "kernelspec":
        km = KernelManager(kernel_name=NOPOOL)
    else:
        config = Config()
        config.PoolProvisioner.pool_enabled = False
        km = KernelManager(kernel_name=NAME, config=config)
    km.start_kernel(cwd=str(workdir), env={**os.environ, "KERNEL_FOO": "cold"})
    try:
        assert km.provisioner.lease_id is None and km.provisioner.warm is None
        kernel_pid = km.provisioner._fallback.pid
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        probe = probe_result(run_cell(kc, PROBE))
        kc.stop_channels()
        processes = tree(kernel_pid)
        assert probe["pid"] in processes, "the worker is not the standalone kernel's child"
    finally:
        km.shutdown_kernel()
    assert probe["cwd"] == str(workdir) and probe["foo"] == "cold"
    assert probe["numpy"] is False, "a cold kernel ran the warm-up code"
    assert pool.counters()[0] == served, "the daemon served a lease"
    assert_gone(processes)


def test_concurrent_clients_in_threads_get_distinct_kernels(pool: PoolSetup) -> None:
    """KernelManagers in threads of one process (a notebook server starting
    several kernels at once)."""
    import threading

    managers = [KernelManager(kernel_name=NAME) for _ in range(3)]
    barrier = threading.Barrier(len(managers))
    errors: list[BaseException] = []

    def start(km: KernelManager) -> None:
        try:
            barrier.wait(timeout=30)
            km.start_kernel()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(km,)) for km in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert errors == []
        infos = [km.get_connection_info() for km in managers]
        pids = []
        for km in managers:
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
            pids.append(probe_result(run_cell(kc, PROBE))["pid"])
            kc.stop_channels()
        assert len(set(pids)) == len(managers)
        assert len({info["key"] for info in infos}) == len(managers)
        ports = [
            info[f"{c}_port"]
            for info in infos
            for c in ("shell", "iopub", "stdin", "control", "hb")
        ]
        assert len(set(ports)) == len(ports)
        leases = {km.provisioner.lease_id for km in managers}
        assert len(leases) == len(managers) and None not in leases
    finally:
        for km in managers:
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    assert_gone(pids)
    wait_until(lambda: pool.status()["leases"] == [], 10, "the leases to end")


def test_status_cli_reports_the_pool(pool: PoolSetup) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyrepl3_kernel.cli",
            "status",
            "--runtime-dir",
            str(pool.runtime_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"{NAME}: " in done.stdout and "min_idle 2" in done.stdout, done.stdout
    assert repr(WARMUP) in done.stdout
