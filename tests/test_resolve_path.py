"""``/api/resolvePath`` on a real ``jupyter server``: a file named relative to
a kernel's working directory resolves for a PyREPL3 kernel, pooled or cold,
as it does for ipykernel (jupyter_server's ``test_resolve_path_kernel``,
``test_resolve_path_server_and_kernel``, ``test_resolve_path_missing``).
JupyterLab uses it to open files that a traceback or an output names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_helpers import KERNEL_NAMES
from test_rest_api import JupyterServer, running_server


@pytest.fixture(scope="module")
def server(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    base = tmp_path_factory.mktemp("resolve-path")
    with running_server("server", base) as srv:
        yield srv


@pytest.fixture
def kernel_root(server: JupyterServer, request: pytest.FixtureRequest) -> Path:
    """``more/path/segments`` below the server's root, with a ``hello.py``."""
    name = request.node.name.replace("[", "-").rstrip("]")
    root = server.base / name / "more" / "path" / "segments"
    root.mkdir(parents=True)
    (root / "hello.py").write_text("(irrelevant)")
    return root


def start_kernel_in(server: JupyterServer, kernel_name: str, directory: Path) -> str:
    return server.start_kernel(kernel_name, path=str(directory.relative_to(server.base)))


def resolve(server: JupyterServer, path: str, kernel_id: str | None = None) -> list[dict[str, Any]]:
    params = {"path": path}
    if kernel_id is not None:
        params["kernel"] = kernel_id
    r = server.api("GET", "/api/resolvePath", params=params)
    assert r.status_code == 200, r.text
    return r.json()["resolved"]  # type: ignore[no-any-return]


def stop_kernel(server: JupyterServer, kernel_id: str) -> None:
    r = server.api("DELETE", f"/api/kernels/{kernel_id}")
    assert r.status_code == 204, r.text


@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_a_file_in_the_kernels_directory_resolves(
    server: JupyterServer, kernel_root: Path, kernel_name: str
) -> None:
    kernel_id = start_kernel_in(server, kernel_name, kernel_root)
    try:
        assert resolve(server, "hello.py", kernel_id) == [
            {"scope": "kernel", "path": (kernel_root / "hello.py").as_posix()}
        ]
        # a missing file resolves nowhere
        assert resolve(server, "not_hello", kernel_id) == []
    finally:
        stop_kernel(server, kernel_id)


@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_server_and_kernel_both_resolve(
    server: JupyterServer, kernel_root: Path, kernel_name: str
) -> None:
    """The same name in the server's root and the kernel's directory: two
    candidates, one per scope."""
    (server.base / "hello.py").write_text("(irrelevant)")
    kernel_id = start_kernel_in(server, kernel_name, kernel_root)
    try:
        resolved = resolve(server, "hello.py", kernel_id)
        assert sorted(r["scope"] for r in resolved) == ["kernel", "server"], resolved
        (kernel,) = [r for r in resolved if r["scope"] == "kernel"]
        assert kernel["path"] == (kernel_root / "hello.py").as_posix()
    finally:
        stop_kernel(server, kernel_id)
        (server.base / "hello.py").unlink()
