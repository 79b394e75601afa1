"""Shared fixtures.

``pyrepl3_kernelspec`` installs the kernelspec into a temporary prefix (the
way a user would, through the CLI) and points ``JUPYTER_PATH`` at it, so the
tests never depend on a kernelspec installed in the venv or the user's home.
``IPYTHONDIR`` points at a temporary directory too, so the kernels' history
database is isolated from the user's and from other test runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

KERNEL_NAME = "pyrepl3"


@pytest.fixture(scope="session")
def pyrepl3_kernelspec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The directory of a freshly installed ``pyrepl3`` kernelspec.

    While the fixture is active, ``JUPYTER_PATH`` (prepended) makes
    jupyter_client find it and ``IPYTHONDIR`` is a temporary directory; both
    are restored afterwards.
    """
    prefix = tmp_path_factory.mktemp("kernelspec-prefix")
    ipython_dir = tmp_path_factory.mktemp("ipython")
    subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", "install", "--prefix", str(prefix)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    spec_dir = prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME
    assert (spec_dir / "kernel.json").is_file(), f"install did not write {spec_dir}/kernel.json"

    saved = {name: os.environ.get(name) for name in ("JUPYTER_PATH", "IPYTHONDIR")}
    jupyter_path = [str(prefix / "share" / "jupyter")]
    if saved["JUPYTER_PATH"]:
        jupyter_path.append(saved["JUPYTER_PATH"])
    os.environ["JUPYTER_PATH"] = os.pathsep.join(jupyter_path)
    os.environ["IPYTHONDIR"] = str(ipython_dir)
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        found = KernelSpecManager().find_kernel_specs().get(KERNEL_NAME)
        assert found is not None and Path(found).resolve() == spec_dir.resolve(), (
            f"jupyter_client finds {KERNEL_NAME!r} at {found}, not at {spec_dir}"
        )
        yield spec_dir
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
