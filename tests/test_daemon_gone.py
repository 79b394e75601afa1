"""A pooled kernel whose daemon is gone is dead, and says so.

After ``pyrepl3-kernel stop``, or when the runtime directory the client sees
is no longer the one it leased in, a forced shutdown (jupyter_server's test
teardowns, ``KernelManager.shutdown_kernel(now=True)``) must not raise, and
``kill``, ``terminate``, ``poll`` and ``cleanup`` answer "dead". At
interpreter exit (``jupyter run`` shuts its kernel down in an atexit
handler), shutting down must work although no executor takes work any more.

The module has its own kernelspec and runtime dir (so its own daemon).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client import KernelManager
from pool_helpers import (
    PoolSetup,
    alive,
    assert_gone,
    cli,
    pooled_kernelspec,
    processes_naming,
    wait_until,
)

from pyrepl3_kernel.provisioner import PoolProvisioner

NAME = "pyrepl3-daemon-gone"
JUPYTER_RUN = Path(sys.executable).with_name("jupyter-run")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolSetup]:
    with pooled_kernelspec(tmp_path_factory.mktemp("daemon-gone"), NAME) as pool:
        yield pool


@pytest.fixture
def km(setup: PoolSetup) -> Iterator[KernelManager]:
    """A started pooled kernel (leased); shut down (forced) at the end."""
    manager = KernelManager(kernel_name=NAME)
    manager.start_kernel(cwd=str(setup.work))
    try:
        assert manager.provisioner.lease_id is not None, "the kernel was started cold"
        yield manager
    finally:
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)


def worker_pid(setup: PoolSetup, km: KernelManager) -> int:
    lease_id = km.provisioner.lease_id
    (lease,) = [lease for lease in setup.status()["leases"] if lease["lease_id"] == lease_id]
    return int(lease["worker_pid"])


def test_forced_shutdown_after_stop(setup: PoolSetup, km: KernelManager) -> None:
    worker = worker_pid(setup, km)
    cli("stop", "--runtime-dir", str(setup.runtime_dir))
    assert_gone([worker])
    km.shutdown_kernel(now=True)  # raised DaemonUnavailable
    assert not km.is_alive()
    assert not km.has_kernel


def test_every_process_operation_says_dead_after_stop(setup: PoolSetup, km: KernelManager) -> None:
    provisioner = km.provisioner
    assert isinstance(provisioner, PoolProvisioner)
    worker = worker_pid(setup, km)
    setup.stop()
    assert_gone([worker])

    async def probe() -> list[int | None]:
        codes = [await provisioner.poll()]
        await provisioner.send_signal(signal.SIGTERM)
        await provisioner.terminate()
        await provisioner.kill()
        await provisioner.kill(restart=True)
        codes.append(await provisioner.poll())
        codes.append(await provisioner.wait())
        await provisioner.cleanup()
        codes.append(await provisioner.poll())
        return codes

    codes = asyncio.run(probe())
    assert all(code == -signal.SIGKILL for code in codes), codes
    assert not provisioner.has_process


def test_forced_shutdown_when_the_runtime_dir_changed(
    setup: PoolSetup, km: KernelManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's lease lives in the daemon of the runtime dir it was
    started in: a forced shutdown ends it there, and starts no daemon in
    the new one."""
    worker = worker_pid(setup, km)
    lease_id = km.provisioner.lease_id
    elsewhere = tmp_path / "another-runtime-dir"
    elsewhere.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(elsewhere))
    try:
        km.shutdown_kernel(now=True)
        assert_gone([worker])
        assert all(lease["lease_id"] != lease_id for lease in setup.status()["leases"])
        assert processes_naming(str(elsewhere)) == []
        assert not (elsewhere / "pyrepl3-daemon.sock").exists()
    finally:
        cli("stop", "--runtime-dir", str(elsewhere), check=False, timeout=60)


def test_jupyter_run_shuts_its_kernel_down_at_exit(setup: PoolSetup) -> None:
    """``jupyter run`` shuts its kernel down in an atexit handler, when no
    executor takes work any more ("cannot schedule new futures after
    interpreter shutdown")."""
    script = setup.work / "script.py"
    script.write_text("import os\nprint('worker', os.getpid())\n")
    done = subprocess.run(
        [str(JUPYTER_RUN), "--kernel", NAME, str(script)],
        cwd=setup.work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("worker ")]
    worker = int(line.split()[1])
    # the lease was released by the atexit handler, not reaped after the fact
    assert setup.status()["leases"] == []
    assert not alive(worker)


def test_a_restart_after_stop_leases_a_new_kernel(setup: PoolSetup, km: KernelManager) -> None:
    """A restart of a kernel whose daemon is gone starts a new daemon and
    leases there (the old lease cannot be restarted in place)."""
    old_worker = worker_pid(setup, km)
    setup.stop()
    assert_gone([old_worker])
    km.restart_kernel(now=True)
    assert km.provisioner.lease_id is not None, "the restart fell back to a cold kernel"
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive("1 + 1", timeout=60)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
    wait_until(lambda: setup.client().ping() is not None, 30, "the new daemon")
