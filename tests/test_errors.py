"""Every error the project defines derives from ``Pyrepl3Error``, keeps the
standard base it had, and keeps its name (names travel as ``ename`` and
choose REST statuses)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import pyrepl3_kernel
from pyrepl3_kernel import Pyrepl3Error
from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths, DaemonUnavailable
from pyrepl3_kernel.protocol import ProtocolError, decode


def project_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the package, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(pyrepl3_kernel.__path__, "pyrepl3_kernel."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # running it is importing it
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_project_exception_is_a_pyrepl3_error() -> None:
    found = project_exceptions()
    # the walk reaches every package that defines errors
    for name in (
        "pyrepl3_kernel.session.worker.WorkerDeadError",
        "pyrepl3_kernel.session.pool.PoolExhausted",
        "pyrepl3_kernel.protocol.codec.ProtocolError",
        "pyrepl3_kernel.daemon.client.DaemonError",
        "pyrepl3_kernel.worker.checkpoint.errors.CheckpointError",
        "pyrepl3_kernel.server.bridge.BridgeError",
    ):
        assert name in found
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, Pyrepl3Error))
    assert outside == [], f"not derived from Pyrepl3Error: {outside}"


@pytest.mark.parametrize(
    ("name", "standard_base"),
    [
        ("pyrepl3_kernel.session.worker.WorkerStartError", RuntimeError),
        ("pyrepl3_kernel.session.worker.WorkerDeadError", RuntimeError),
        ("pyrepl3_kernel.session.pool.WarmupError", RuntimeError),
        ("pyrepl3_kernel.session.pool.PoolExhausted", RuntimeError),
        ("pyrepl3_kernel.daemon.client.DaemonError", RuntimeError),
        ("pyrepl3_kernel.daemon.client.DaemonUnavailable", ConnectionError),
        ("pyrepl3_kernel.daemon.server.DaemonAlreadyRunning", RuntimeError),
    ],
)
def test_an_error_keeps_the_standard_base_it_had(
    name: str, standard_base: type[BaseException]
) -> None:
    assert issubclass(project_exceptions()[name], standard_base)


def test_a_daemon_that_is_not_there_is_caught_as_a_pyrepl3_error(tmp_path: Path) -> None:
    client = DaemonClient(DaemonPaths.default(tmp_path), timeout=2)
    with pytest.raises(Pyrepl3Error) as info:
        client.call("hello")
    assert type(info.value) is DaemonUnavailable
    assert str(client.paths.socket) in str(info.value)


def test_a_garbage_message_is_caught_as_a_pyrepl3_error() -> None:
    with pytest.raises(Pyrepl3Error) as info:
        decode(b"\xc1 not a message")
    assert type(info.value) is ProtocolError


def test_errors_module_imports_nothing() -> None:
    """protocol/ (sans-I/O, stdlib and msgpack only) and the worker import it."""
    tree = ast.parse(Path(pyrepl3_kernel.__file__).with_name("errors.py").read_text())
    imports = [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
    ]
    assert imports == []


def test_pyrepl3_error_is_exported_from_the_package() -> None:
    assert "Pyrepl3Error" in pyrepl3_kernel.__all__
    assert "Pyrepl3Error" in dir(pyrepl3_kernel)
    assert (
        pyrepl3_kernel.Pyrepl3Error is importlib.import_module("pyrepl3_kernel.errors").Pyrepl3Error
    )
