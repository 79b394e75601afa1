"""Helpers for the tests of the manager daemon and the ``pyrepl3-pool``
provisioner (test_pool_clients.py, test_pool_daemon.py).

:func:`pooled_kernelspec` installs a pooled kernelspec under its own name
into its own prefix, points ``JUPYTER_PATH``, ``IPYTHONDIR`` and
``JUPYTER_RUNTIME_DIR`` at temporary directories (so the module gets a
daemon of its own), and stops that daemon at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths

_ISOLATED_ENV = ("JUPYTER_PATH", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR")


def cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", *args],
        check=check,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class PoolSetup:
    """A kernelspec installed in its own prefix, with its own runtime dir."""

    name: str
    prefix: Path
    runtime_dir: Path
    work: Path

    @property
    def kernels_dir(self) -> Path:
        return self.prefix / "share" / "jupyter" / "kernels"

    @property
    def paths(self) -> DaemonPaths:
        return DaemonPaths.default(self.runtime_dir)

    def client(self) -> DaemonClient:
        return DaemonClient(self.paths, timeout=30)

    def status(self) -> dict[str, Any]:
        return self.client().call("status")

    def cli_status(self) -> dict[str, Any]:
        """``pyrepl3-kernel status --json``."""
        done = cli("status", "--runtime-dir", str(self.runtime_dir), "--json")
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def counters(self) -> tuple[int, int]:
        """(leases served, warm leases) so far."""
        daemon = self.status()["daemon"]
        return daemon["leases_served"], daemon["warm_leases"]

    def pool(self, kernel_name: str | None = None) -> dict[str, Any] | None:
        for pool in self.status()["pools"]:
            if pool["kernel_name"] == (kernel_name or self.name):
                return pool  # type: ignore[no-any-return]
        return None

    def wait_idle(self, n: int = 1, kernel_name: str | None = None, timeout: float = 90) -> None:
        """Wait until the pool holds ``n`` warm workers."""
        wait_until(
            lambda: (self.pool(kernel_name) or {}).get("idle", 0) >= n,
            timeout,
            f"{n} warm worker(s) in the pool of {kernel_name or self.name}",
        )

    def daemon_pid(self) -> int:
        return int(self.client().call("hello")["pid"])

    def stop(self) -> None:
        cli("stop", "--runtime-dir", str(self.runtime_dir), check=False, timeout=60)

    def add_spec(self, name: str, **config: Any) -> None:
        """A copy of this kernelspec, named ``name``, with ``config`` added to
        its provisioner's config."""
        spec = json.loads((self.kernels_dir / self.name / "kernel.json").read_text())
        spec["metadata"]["kernel_provisioner"]["config"].update(config)
        (self.kernels_dir / name).mkdir()
        (self.kernels_dir / name / "kernel.json").write_text(json.dumps(spec, indent=2))


@contextmanager
def pooled_kernelspec(base: Path, name: str, *install_args: str) -> Iterator[PoolSetup]:
    """Install kernelspec ``name`` (``pyrepl3-kernel install --name NAME
    *install_args``) below ``base`` and make it the environment's only
    daemon; stop the daemon and restore the environment afterwards."""
    setup = PoolSetup(
        name=name,
        prefix=base / "prefix",
        runtime_dir=base / "runtime",
        work=base / "work",
    )
    for path in (setup.runtime_dir, setup.work, base / "ipython"):
        path.mkdir(parents=True)
    cli("install", "--prefix", str(setup.prefix), "--name", name, *install_args)
    saved = {var: os.environ.get(var) for var in _ISOLATED_ENV}
    jupyter_path = [str(setup.prefix / "share" / "jupyter")]
    if saved["JUPYTER_PATH"]:
        jupyter_path.append(saved["JUPYTER_PATH"])
    os.environ["JUPYTER_PATH"] = os.pathsep.join(jupyter_path)
    os.environ["IPYTHONDIR"] = str(base / "ipython")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(setup.runtime_dir)
    try:
        yield setup
    finally:
        setup.stop()
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pids: list[int], timeout: float = 15) -> None:
    """Every process in ``pids`` exits within ``timeout``."""
    wait_until(
        lambda: not [pid for pid in pids if alive(pid)],
        timeout,
        f"processes {[pid for pid in pids if alive(pid)]} to exit",
    )


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    try:
        proc = psutil.Process(pid)
        return [pid, *(child.pid for child in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def processes_naming(text: str) -> list[int]:
    """Pids of the processes (other than this one) with ``text`` in their
    command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(text in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [pid for pid in found if pid != os.getpid() and alive(pid)]


#: Code a cell runs to report where and how its kernel runs.
PROBE = (
    "import os, sys, json; print(json.dumps({'cwd': os.getcwd(), "
    "'foo': os.environ.get('KERNEL_FOO'), 'session': globals().get('__session__'), "
    "'numpy': 'numpy' in sys.modules, 'pid': os.getpid()}))"
)


def probe_result(text: str) -> dict[str, Any]:
    """The JSON line :data:`PROBE` printed, from a cell's stdout."""
    for line in text.splitlines():
        if line.startswith("{") and '"cwd"' in line:
            return json.loads(line)  # type: ignore[no-any-return]
    raise AssertionError(f"no probe output in {text!r}")
