"""Load on loopback: many pyrepl3 kernels through one ``pyrepl3-kernel gateway``.

``PYREPL3_LOAD_KERNELS`` (default 100) kernels are started through
``POST /api/kernels`` (leased from the gateway's daemon), each gets its own
kernel WebSocket, and all of them execute at once for a bounded time
(``PYREPL3_LOAD_SECONDS``, default 20): each cell prints a numbered
sequence, and every line must arrive, in order, with nothing lost or
duplicated, on every kernel. Then every kernel is shut down through the REST
API, and no worker process of theirs may remain. The phases' times are
printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_rest_api import JupyterServer, running_server

KERNELS = int(os.environ.get("PYREPL3_LOAD_KERNELS", "100"))
SECONDS = float(os.environ.get("PYREPL3_LOAD_SECONDS", "20"))
LINES = 50  # printed per cell

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gateway(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    with running_server("gateway", tmp_path_factory.mktemp("load-gateway")) as server:
        yield server


def _msg(
    session: str, msg_type: str, content: dict[str, Any], channel: str = "shell"
) -> tuple[str, str]:
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "username": "load",
        "session": session,
        "date": datetime.now(timezone.utc).isoformat(),
        "version": "5.3",
    }
    text = json.dumps(
        {
            "header": header,
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": channel,
        }
    )
    return msg_id, text


class KernelLoad:
    """One kernel's client: connect, wait ready, run numbered cells."""

    def __init__(self, server: JupyterServer, kernel_id: str, index: int) -> None:
        self.server = server
        self.kernel_id = kernel_id
        self.index = index
        self.session = uuid.uuid4().hex
        self.cells = 0
        self.lines = 0
        self.latencies: list[float] = []
        self.problems: list[str] = []

    async def run(self, deadline: float) -> None:
        from websockets.asyncio.client import connect

        url = (
            f"{self.server.ws_url}/api/kernels/{self.kernel_id}/channels?session_id={self.session}"
        )
        async with connect(
            url, additional_headers=self.server.headers, max_size=None, open_timeout=60
        ) as ws:
            await self._request(ws, "kernel_info_request", {}, time.monotonic() + 60)
            while time.monotonic() < deadline or self.cells == 0:
                await self._cell(ws, time.monotonic() + 60)

    async def _request(
        self, ws: Any, msg_type: str, content: dict[str, Any], until: float
    ) -> dict[str, Any]:
        msg_id, text = _msg(self.session, msg_type, content)
        await ws.send(text)
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), until - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id and msg["channel"] == "shell":
                return msg  # type: ignore[no-any-return]

    async def _cell(self, ws: Any, until: float) -> None:
        tag = f"k{self.index}c{self.cells}"
        # store_history off: 100 kernels committing cells to the one IPython
        # history database of IPYTHONDIR hit "database is locked", which
        # IPython reports on stdout (ipykernel alike); not what is measured.
        code = f"for i in range({LINES}):\n    print('{tag}', i)"
        msg_id, text = _msg(
            self.session,
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": False,
                "user_expressions": {},
                "allow_stdin": False,
            },
        )
        start = time.monotonic()
        await ws.send(text)
        stdout, reply, idle = [], None, False
        while reply is None or not idle:
            msg = json.loads(await asyncio.wait_for(ws.recv(), until - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["channel"] == "shell" and msg["msg_type"] == "execute_reply":
                reply = msg["content"]
            elif msg["msg_type"] == "stream":
                stdout.append(msg["content"]["text"])
            elif msg["msg_type"] == "status":
                idle = idle or msg["content"]["execution_state"] == "idle"
        self.latencies.append(time.monotonic() - start)
        expected = "".join(f"{tag} {i}\n" for i in range(LINES))
        if reply.get("status") != "ok":
            self.problems.append(f"{tag}: reply {reply}")
        elif "".join(stdout) != expected:
            self.problems.append(f"{tag}: got {''.join(stdout)!r}")
        self.cells += 1
        self.lines += "".join(stdout).count("\n")


async def _drive(clients: list[KernelLoad], seconds: float) -> list[BaseException | None]:
    deadline = time.monotonic() + seconds
    results = await asyncio.gather(*(c.run(deadline) for c in clients), return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


def test_many_kernels_at_once(gateway: JupyterServer) -> None:
    timings: dict[str, float] = {}
    kernel_ids: list[str] = []
    try:
        # 1. Start them all through the REST API (a few requests in flight).
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            kernel_ids = list(pool.map(lambda _: gateway.start_kernel("pyrepl3"), range(KERNELS)))
        timings["start"] = time.monotonic() - start
        assert len(set(kernel_ids)) == KERNELS
        status = gateway.api("GET", "/api/pyrepl3/pool").json()
        leases = {lease["kernel_id"]: lease for lease in status["leases"]}
        assert set(kernel_ids) <= set(leases), "a kernel is not leased from the daemon"
        workers = [leases[k]["worker_pid"] for k in kernel_ids]
        assert len(set(workers)) == KERNELS and all(psutil.pid_exists(p) for p in workers)

        # 2. Everyone executes at once over its own WebSocket.
        clients = [KernelLoad(gateway, k, i) for i, k in enumerate(kernel_ids)]
        start = time.monotonic()
        errors = asyncio.run(asyncio.wait_for(_drive(clients, SECONDS), SECONDS + 180))
        timings["execute"] = time.monotonic() - start
        failed = {
            c.kernel_id: repr(e) for c, e in zip(clients, errors, strict=True) if e is not None
        }
        assert not failed, failed
        problems = [p for c in clients for p in c.problems]
        assert not problems, problems[:5]
        assert all(c.cells >= 1 for c in clients)
        cells = sum(c.cells for c in clients)
        lines = sum(c.lines for c in clients)
        assert lines == cells * LINES
        latencies = sorted(x for c in clients for x in c.latencies)
        median = latencies[len(latencies) // 2]
        p95 = latencies[int(len(latencies) * 0.95)]

        # 3. Shut them all down through the REST API.
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda k: gateway.api("DELETE", f"/api/kernels/{k}").status_code, kernel_ids
                )
            )
        timings["shutdown"] = time.monotonic() - start
        assert codes == [204] * KERNELS
        kernel_ids = []
        assert gateway.api("GET", "/api/kernels").json() == []
        deadline = time.monotonic() + 30
        while True:
            alive = [p for p in workers if _alive(p)]
            leased = gateway.api("GET", "/api/pyrepl3/pool").json()["leases"]
            if not alive and not leased:
                break
            assert time.monotonic() < deadline, f"workers left: {alive}, leases: {leased}"
            time.sleep(0.2)
        timings["cleanup"] = time.monotonic() - start - timings["shutdown"]
        print(
            f"\n{KERNELS} kernels: started in {timings['start']:.1f} s; {cells} cells "
            f"({lines} lines) in {timings['execute']:.1f} s, cell round trip median "
            f"{median * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms; shut down in "
            f"{timings['shutdown']:.1f} s, workers gone {timings['cleanup']:.1f} s later"
        )
    finally:
        for kid in kernel_ids:  # a failure above: the server's stop does the rest
            try:
                gateway.api("DELETE", f"/api/kernels/{kid}", timeout=10)
            except Exception:
                break


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
