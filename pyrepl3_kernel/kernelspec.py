"""The kernelspec that ``pyrepl3-kernel install`` writes: ``kernel.json``
(argv, provisioner, metadata) and the logos."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ._version import __version__

DEFAULT_DISPLAY_NAME = "PyREPL3"
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
LOGO_FILES = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")

PROVISIONER_NAME = "pyrepl3-pool"


def kernel_spec_dict(
    executable: str | None = None,
    display_name: str = DEFAULT_DISPLAY_NAME,
    env: dict[str, str] | None = None,
    pool: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of the ``kernel.json`` written by ``install``.

    With ``pool`` (the provisioner's config, possibly empty), kernels are
    leased warm from the manager daemon by the ``pyrepl3-pool`` provisioner;
    clients that ignore provisioners run ``argv``, which hands the kernel to
    the daemon too (a forked worker, see handoff.py). Without it, every
    launch is a standalone kernel (``PYREPL3_HANDOFF=0``).
    """
    spec: dict[str, Any] = {
        "argv": [
            executable or sys.executable,
            "-m",
            "pyrepl3_kernel",
            "-f",
            "{connection_file}",
        ],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {
            # JupyterLab offers its debugger where the workers have debugpy.
            "debugger": _debugger_available(executable),
            # jupyter_client provisions CurveZMQ keys for the kernel only when
            # asked to (KernelManager.transport_encryption); see pyrepl3_kernel/curve.py
            "supported_encryption": ["curve"],
            "pyrepl3": {"version": __version__},
        },
    }
    if pool is not None:
        spec["metadata"]["kernel_provisioner"] = {
            "provisioner_name": PROVISIONER_NAME,
            "config": dict(pool),
        }
    else:
        env = {"PYREPL3_HANDOFF": "0", **(env or {})}
    if env:
        spec["env"] = dict(env)
    return spec


def _debugger_available(python: str | None) -> bool:
    from .gateway.debugger import debugpy_importable

    return debugpy_importable(python)


def write_kernel_spec(
    directory: Path,
    executable: str | None = None,
    display_name: str = DEFAULT_DISPLAY_NAME,
    env: dict[str, str] | None = None,
    pool: dict[str, Any] | None = None,
) -> list[str]:
    """Write kernel.json and copy the logos into *directory*.

    Returns the names of logo files that could not be found.
    """
    import shutil

    spec = kernel_spec_dict(executable, display_name, env, pool)
    (directory / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    missing = []
    for name in LOGO_FILES:
        src = RESOURCES_DIR / name
        if src.is_file():
            shutil.copyfile(src, directory / name)
        else:
            missing.append(name)
    return missing
