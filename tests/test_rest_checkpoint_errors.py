"""Checkpoint errors over REST say what is wrong without showing where the
server keeps its files (the kernel's own message names its store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_rest_api import JupyterServer, running_server


@pytest.fixture(scope="module")
def gateway(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    base = tmp_path_factory.mktemp("rest-checkpoint-errors")
    with running_server("gateway", base) as server:
        yield server


def test_missing_checkpoint_is_404_without_the_store_path(gateway: JupyterServer) -> None:
    store = gateway.env["PYREPL3_CHECKPOINT_DIR"]
    kernel = gateway.start_kernel()
    try:
        base = f"/api/pyrepl3/kernels/{kernel}/checkpoints/never-saved"
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/restore")):
            r = gateway.api(method, base + path)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["message"] == "CheckpointError: no checkpoint named 'never-saved'"
            assert store not in r.text
            assert str(gateway.base) not in r.text
    finally:
        gateway.api("DELETE", f"/api/kernels/{kernel}")
