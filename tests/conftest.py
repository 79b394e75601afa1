"""Shared fixtures.

``pyrepl3_kernelspec`` installs the kernelspecs into a temporary prefix (the
way a user would, through the CLI) and points ``JUPYTER_PATH`` at it, so the
tests never depend on a kernelspec installed in the venv or the user's home:

- ``pyrepl3``: the default install, whose ``pyrepl3-pool`` provisioner leases
  warm kernels from the manager daemon;
- ``pyrepl3-cold`` (``--no-pool``): one standalone process per kernel, what a
  client that ignores provisioners (VS Code) gets.

``IPYTHONDIR`` points at a temporary directory, so the kernels' history
database is isolated from the user's and from other test runs, and so does
``JUPYTER_RUNTIME_DIR``, so the tests start their own manager daemon (never
lease from, or leave behind, the user's); it is stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_helpers import COLD_KERNEL_NAME, KERNEL_NAME, stop_daemon

_ISOLATED_ENV = ("JUPYTER_PATH", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _restore_env(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def _isolated_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test, also one that asks for no kernelspec, runs with its own
    ``JUPYTER_RUNTIME_DIR`` and ``IPYTHONDIR``: a kernel it launches by argv
    hands off to (or starts) a daemon there, never the user's, and that
    daemon is stopped at the end of the run."""
    runtime_dir = tmp_path_factory.mktemp("default-runtime")
    saved = {name: os.environ.get(name) for name in ("IPYTHONDIR", "JUPYTER_RUNTIME_DIR")}
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime_dir)
    os.environ["IPYTHONDIR"] = str(tmp_path_factory.mktemp("default-ipython"))
    try:
        yield
    finally:
        stop_daemon(runtime_dir)
        _restore_env(saved)


@pytest.fixture(scope="session")
def pyrepl3_kernelspec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The directory of a freshly installed ``pyrepl3`` kernelspec
    (``pyrepl3-cold`` is installed beside it).

    While the fixture is active, ``JUPYTER_PATH`` (prepended) makes
    jupyter_client find them, and ``IPYTHONDIR`` and ``JUPYTER_RUNTIME_DIR``
    are temporary directories; all three are restored afterwards.
    """
    prefix = tmp_path_factory.mktemp("kernelspec-prefix")
    ipython_dir = tmp_path_factory.mktemp("ipython")
    runtime_dir = tmp_path_factory.mktemp("runtime")
    _cli("install", "--prefix", str(prefix))
    _cli("install", "--prefix", str(prefix), "--name", COLD_KERNEL_NAME, "--no-pool")
    kernels = prefix / "share" / "jupyter" / "kernels"
    spec_dir = kernels / KERNEL_NAME
    for name in (KERNEL_NAME, COLD_KERNEL_NAME):
        assert (kernels / name / "kernel.json").is_file(), (
            f"install did not write {name}/kernel.json"
        )

    saved = {name: os.environ.get(name) for name in _ISOLATED_ENV}
    jupyter_path = [str(prefix / "share" / "jupyter")]
    if saved["JUPYTER_PATH"]:
        jupyter_path.append(saved["JUPYTER_PATH"])
    os.environ["JUPYTER_PATH"] = os.pathsep.join(jupyter_path)
    os.environ["IPYTHONDIR"] = str(ipython_dir)
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime_dir)
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        found = KernelSpecManager().find_kernel_specs()
        for name in (KERNEL_NAME, COLD_KERNEL_NAME):
            assert found.get(name) and Path(found[name]).resolve() == (kernels / name).resolve(), (
                f"jupyter_client finds {name!r} at {found.get(name)}, not in {kernels}"
            )
        yield spec_dir
    finally:
        stop_daemon(runtime_dir)
        _restore_env(saved)


# -- one kernel per kernelspec for a whole test module (tests/frontend.py) ----------------


@pytest.fixture(scope="module", params=[KERNEL_NAME, COLD_KERNEL_NAME])
def shared(request: pytest.FixtureRequest, pyrepl3_kernelspec: Path) -> Iterator[Any]:
    """A :class:`frontend.Frontend` on each kernelspec, for the module's tests."""
    from frontend import Frontend

    fe = Frontend(request.param)
    try:
        yield fe
    finally:
        fe.close()


@pytest.fixture
def kernel(shared: Any) -> Any:
    """The module's kernel, with nothing left unread from the test before."""
    shared.flush()
    return shared
