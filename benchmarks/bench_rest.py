"""Kernels over HTTP and WebSocket: ``pyrepl3-kernel gateway`` against stock servers.

Usage::

    .venv/bin/python benchmarks/bench_rest.py [--quick] [--out DIR]

Servers (each a subprocess on 127.0.0.1 with a token, in one run):

- ``pyrepl3-kernel gateway`` (the pyrepl3 jupyter_server extension: kernel
  WebSockets with TCP_NODELAY, the /api/pyrepl3 REST endpoints), serving
  ``pyrepl3`` (leased warm from the daemon) and ``python3`` (ipykernel);
- stock ``jupyter server`` (the extension disabled), serving ``python3`` and
  ``pyrepl3``; the latter isolates what TCP_NODELAY does;
- ``jupyter kernelgateway`` (pip ``jupyter-kernel-gateway``), if installed,
  serving ``python3``.

Metrics (all "lower is better"; a target's turns alternate with the others'
and the order rotates each turn, so a shared machine's noise falls on all):

- ``ws_rtt``: ``1+1`` over the kernel's ``/channels`` WebSocket (Jupyter JSON
  protocol), from sending the execute_request to having both the
  execute_reply and the execute_result; then, untimed, the idle status.
- ``start_to_result``: ``POST /api/kernels``, open the WebSocket, execute
  ``1+1``: until its result and reply. The kernel is deleted after each
  start, and the next start waits a second (so the warm pool has refilled).
- ``rest_rtt``: ``POST /api/pyrepl3/kernels/{id}/execute`` with ``1+1`` until
  the JSON answer (keep-alive connection), on the pyrepl3 gateway.

The client sets TCP_NODELAY on its own sockets (as browsers do), so the
server side is what differs. Kernelspecs are installed into a temporary
prefix, the runtime dir (hence the daemon) is temporary and stopped at the
end, and every server is stopped in a ``finally``.

Writes ``results/rest.json`` (samples, summaries, ratios) next to this file
and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
from websockets.sync.client import connect

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
AS_ROOT = ["--allow-root"] if os.geteuid() == 0 else []
FULL = {"warmup": 20, "rtt_runs": 300, "starts": 7, "rest_runs": 300}
QUICK = {"warmup": 10, "rtt_runs": 60, "starts": 3, "rest_runs": 60}
GOAL_MS = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    token: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def start(self, ready_path: str = "/api/kernels") -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                r = requests.get(self.url + ready_path, headers=self.headers, timeout=2)
                if r.status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Delete its kernels, SIGTERM (the server shuts the rest down), then
        SIGKILL its process group if it lingers."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            r = requests.get(self.url + "/api/kernels", headers=self.headers, timeout=10)
            for k in r.json() if r.status_code == 200 else []:
                requests.delete(
                    f"{self.url}/api/kernels/{k['id']}", headers=self.headers, timeout=30
                )
        except Exception as exc:
            print(f"{self.name}: could not delete its kernels: {exc}", file=sys.stderr)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def start_kernel(self, name: str) -> str:
        r = requests.post(
            self.url + "/api/kernels", json={"name": name}, headers=self.headers, timeout=120
        )
        if r.status_code != 201:
            raise RuntimeError(f"{self.name}: POST /api/kernels {r.status_code} {r.text}")
        return str(r.json()["id"])

    def delete_kernel(self, kernel_id: str) -> None:
        requests.delete(f"{self.url}/api/kernels/{kernel_id}", headers=self.headers, timeout=60)


class WS:
    """A kernel WebSocket client (Jupyter JSON protocol), TCP_NODELAY on."""

    def __init__(self, server: Server, kernel_id: str) -> None:
        self.session = uuid.uuid4().hex
        url = f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?session_id={self.session}"
        self._cm = connect(url, additional_headers=server.headers, max_size=None, open_timeout=60)
        self.ws = self._cm.__enter__()
        self.ws.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._cm.__exit__(None, None, None)

    def send(self, msg_type: str, content: dict[str, Any]) -> str:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "username": "bench",
            "session": self.session,
            "date": datetime.now(timezone.utc).isoformat(),
            "version": "5.3",
        }
        self.ws.send(
            json.dumps(
                {
                    "header": header,
                    "parent_header": {},
                    "metadata": {},
                    "content": content,
                    "channel": "shell",
                }
            )
        )
        return msg_id

    def execute(self, code: str = "1+1", timeout: float = 60) -> float:
        """Seconds to the execute_reply and the execute_result; then waits for idle."""
        start = time.perf_counter()
        msg_id = self.send(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
            },
        )
        reply = result = idle = False
        elapsed = 0.0
        deadline = time.monotonic() + timeout
        while not (reply and result and idle):
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.001)))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "execute_reply":
                reply = True
                if msg["content"]["status"] != "ok":
                    raise RuntimeError(f"execute failed: {msg['content']}")
            elif kind == "execute_result":
                result = True
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            if reply and result and not elapsed:
                elapsed = time.perf_counter() - start
        return elapsed

    def wait_ready(self) -> None:
        msg_id = self.send("kernel_info_request", {})
        deadline = time.monotonic() + 60
        while True:
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.001)))
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "kernel_info_reply"
            ):
                return


@dataclass
class Target:
    label: str
    server: Server
    kernel: str
    rest: bool = False
    samples: dict[str, list[float]] = field(default_factory=dict)
    kernel_id: str = ""
    ws: WS | None = None


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(q: float) -> float:
        k = (len(ordered) - 1) * q / 100
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {
        "n": len(ordered),
        "p50_ms": pct(50) * 1000,
        "p90_ms": pct(90) * 1000,
        "p99_ms": pct(99) * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
        "min_ms": ordered[0] * 1000,
    }


def rotated(items: list[Target], turn: int) -> list[Target]:
    k = turn % len(items)
    return items[k:] + items[:k]


@contextlib.contextmanager
def setup(tmp: Path) -> Iterator[tuple[dict[str, str], list[Server]]]:
    """Kernelspecs in a temp prefix, an isolated environment; the servers
    started inside are stopped, and the daemon too, on the way out."""
    prefix = tmp / "prefix"
    subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", "install", "--prefix", str(prefix)],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ)
    for name in ("runtime", "config", "data", "ipython"):
        (tmp / name).mkdir()
    env.update(
        JUPYTER_PATH=os.pathsep.join(
            filter(None, [str(prefix / "share" / "jupyter"), env.get("JUPYTER_PATH")])
        ),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_DATA_DIR=str(tmp / "data"),
        IPYTHONDIR=str(tmp / "ipython"),
        PYREPL3_CHECKPOINT_DIR=str(tmp / "checkpoints"),
    )
    servers: list[Server] = []
    try:
        yield env, servers
    finally:
        for server in servers:
            server.stop()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pyrepl3_kernel.cli",
                "stop",
                "--runtime-dir",
                str(tmp / "runtime"),
            ],
            capture_output=True,
            timeout=60,
        )


def make_servers(tmp: Path, env: dict[str, str], servers: list[Server]) -> dict[str, Server]:
    made: dict[str, Server] = {}

    def add(
        name: str, argv: list[str], server_env: dict[str, str], ready: str = "/api/kernels"
    ) -> None:
        port, token = free_port(), secrets.token_hex(16)
        argv = [a.replace("{port}", str(port)).replace("{token}", token) for a in argv]
        server = Server(name, argv, server_env, port, token, tmp / f"{name}.log")
        servers.append(server)
        server.start(ready)
        made[name] = server

    common = [
        "--port={port}",
        "--IdentityProvider.token={token}",
        "--ServerApp.port_retries=0",
        *AS_ROOT,
    ]
    add("pyrepl3-gateway", [sys.executable, "-m", "pyrepl3_kernel.cli", "gateway", *common], env)
    # The stock server: the pyrepl3 extension (on in this venv) turned off.
    stock_config = tmp / "stock-config"
    stock_config.mkdir()
    (stock_config / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"pyrepl3_kernel.server": False}}})
    )
    add(
        "jupyter-server",
        [str(BIN / "jupyter-server"), "--ip=127.0.0.1", "--no-browser", *common],
        {**env, "JUPYTER_CONFIG_DIR": str(stock_config)},
    )
    if importlib.util.find_spec("kernel_gateway") is not None:
        add(
            "kernel-gateway",
            [
                str(BIN / "jupyter-kernelgateway"),
                "--KernelGatewayApp.ip=127.0.0.1",
                "--KernelGatewayApp.port={port}",
                "--KernelGatewayApp.auth_token={token}",
                "--KernelGatewayApp.port_retries=0",
                "--JupyterWebsocketPersonality.list_kernels=True",
            ],
            env,
        )
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    params = QUICK if args.quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="pyrepl3-bench-rest-"))
    t_start = time.monotonic()
    try:
        with setup(tmp) as (env, servers):
            made = make_servers(tmp, env, servers)
            gw, stock = made["pyrepl3-gateway"], made["jupyter-server"]
            targets = [
                Target("pyrepl3 gateway + pyrepl3", gw, "pyrepl3", rest=True),
                Target("pyrepl3 gateway + ipykernel", gw, "python3", rest=True),
                Target("jupyter server + ipykernel", stock, "python3"),
                Target("jupyter server + pyrepl3", stock, "pyrepl3"),
            ]
            if "kernel-gateway" in made:
                targets.append(
                    Target("kernel gateway + ipykernel", made["kernel-gateway"], "python3")
                )
            results = run(targets, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, params, args.out, time.monotonic() - t_start)
    return 0


def run(targets: list[Target], params: dict[str, int]) -> dict[str, Any]:
    try:
        for t in targets:
            t.kernel_id = t.server.start_kernel(t.kernel)
            t.ws = WS(t.server, t.kernel_id)
            t.ws.wait_ready()
            for _ in range(params["warmup"]):
                t.ws.execute()
            t.samples = {"ws_rtt": [], "start_to_result": [], "rest_rtt": []}
        # WebSocket round trips, alternated.
        for turn in range(params["rtt_runs"]):
            for t in rotated(targets, turn):
                assert t.ws is not None
                t.samples["ws_rtt"].append(t.ws.execute())
        # REST execute round trips (the pyrepl3 gateway's endpoint).
        rest = [t for t in targets if t.rest]
        sessions = {t.label: requests.Session() for t in rest}
        for t in rest:
            for _ in range(params["warmup"]):
                rest_execute(t, sessions[t.label])
        for turn in range(params["rest_runs"]):
            for t in rotated(rest, turn):
                t.samples["rest_rtt"].append(rest_execute(t, sessions[t.label]))
    finally:
        for t in targets:
            if t.ws is not None:
                t.ws.close()
            if t.kernel_id:
                t.server.delete_kernel(t.kernel_id)
    # POST /api/kernels to the first result, alternated.
    failures: dict[str, list[str]] = {t.label: [] for t in targets}
    for turn in range(params["starts"]):
        for t in rotated(targets, turn):
            time.sleep(1.0)  # the pool refills; the machine settles
            try:
                t.samples["start_to_result"].append(start_to_result(t))
            except Exception as exc:  # recorded, and the run goes on
                print(f"{t.label}: start to result failed: {exc!r}", file=sys.stderr)
                failures[t.label].append(repr(exc))
    return {
        t.label: {
            "server": t.server.name,
            "kernel": t.kernel,
            "samples": t.samples,
            "start_failures": failures[t.label],
        }
        for t in targets
    }


def rest_execute(t: Target, session: requests.Session) -> float:
    start = time.perf_counter()
    r = session.post(
        f"{t.server.url}/api/pyrepl3/kernels/{t.kernel_id}/execute",
        json={"code": "1+1"},
        headers=t.server.headers,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    state = r.json()
    if r.status_code != 200 or state["outputs"][-1]["data"]["text/plain"] != "2":
        raise RuntimeError(f"REST execute: {r.status_code} {r.text}")
    return elapsed


def start_to_result(t: Target) -> float:
    start = time.perf_counter()
    kernel_id = t.server.start_kernel(t.kernel)
    ws = None
    try:
        ws = WS(t.server, kernel_id)
        ws.execute(timeout=30)
        return time.perf_counter() - start
    finally:
        if ws is not None:
            ws.close()
        t.server.delete_kernel(kernel_id)


def report(results: dict[str, Any], params: dict[str, int], out: Path, wall: float) -> None:
    summaries = {
        label: {metric: summary(s) for metric, s in r["samples"].items() if s}
        for label, r in results.items()
    }
    base = "jupyter server + ipykernel"
    ours = "pyrepl3 gateway + pyrepl3"
    ratios: dict[str, dict[str, float]] = {}
    for label, s in summaries.items():
        ratios[label] = {
            f"{metric}_p50_vs_stock": s[metric]["p50_ms"] / summaries[base][metric]["p50_ms"]
            for metric in ("ws_rtt", "start_to_result")
            if metric in s
        }
    ws_p50 = summaries[ours]["ws_rtt"]["p50_ms"]
    data = {
        "benchmark": "bench_rest",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "params": params,
        "wall_seconds": round(wall, 1),
        "goal": {"ws_rtt_p50_ms_below": GOAL_MS, "met": ws_p50 < GOAL_MS},
        "summary": summaries,
        "ratios": ratios,
        "start_failures": {label: r["start_failures"] for label, r in results.items()},
        "samples_s": {label: r["samples"] for label, r in results.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "rest.json").write_text(json.dumps(data, indent=1) + "\n")

    print(
        f"\n{'target':<30} {'metric':<16} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'vs stock':>9}"
    )
    for label, s in summaries.items():
        for metric, m in s.items():
            ratio = ratios[label].get(f"{metric}_p50_vs_stock")
            shown = f"{ratio:8.2f}x" if ratio is not None else f"{'':>9}"
            print(
                f"{label:<30} {metric:<16} {m['p50_ms']:8.2f} {m['p90_ms']:8.2f} {m['p99_ms']:8.2f} {shown}"
            )
    for label, r in results.items():
        if r["start_failures"]:
            print(f"{label}: {len(r['start_failures'])} start(s) got no result within 30 s")
    print(
        f"\ngoal: WebSocket 1+1 round trip p50 < {GOAL_MS:g} ms: {ws_p50:.2f} ms "
        f"({'met' if ws_p50 < GOAL_MS else 'NOT met'}); wall time {wall:.0f} s; "
        f"written {out / 'rest.json'}"
    )


if __name__ == "__main__":
    sys.exit(main())
