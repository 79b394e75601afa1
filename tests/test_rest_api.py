"""The pyrepl3 REST endpoints of ``pyrepl3-kernel gateway``, on a live server.

One gateway (a subprocess with its own runtime dir, hence its own manager
daemon, and its own checkpoint store) serves the module. The tests go
through HTTP only: execute as JSON and as server-sent events, ``input()``
answered over REST, ``?wait``, health, pool, the checkpoint life cycle, the
error codes docs/openapi.yaml promises, and a bounded schemathesis run of
every documented operation (against real kernels and random ids): no 500s,
and every status and body as documented.

This module also holds the harness the other server tests import
(test_gateway_client, test_browser, test_load): :class:`JupyterServer`
(start, wait until ready, stop everything it started even on failure) and
:class:`KernelWS` (the Jupyter JSON message protocol over a kernel's
``/channels`` WebSocket).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "docs" / "openapi.yaml"
AS_ROOT = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
KERNEL_NAME = "pyrepl3"


# --------------------------------------------------------------------------
# Harness: servers
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_daemon(runtime_dir: Path) -> None:
    """``pyrepl3-kernel stop``: the daemon of ``runtime_dir`` and its kernels."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, "-m", "pyrepl3_kernel.cli", "stop", "--runtime-dir", str(runtime_dir)],
            capture_output=True,
            timeout=60,
        )


def server_env(base: Path, **extra: str) -> dict[str, str]:
    """The test process's environment (the kernelspecs of the
    ``pyrepl3_kernelspec`` fixture on ``JUPYTER_PATH``) with a runtime dir
    (so a daemon of its own), config and data dirs and checkpoint store
    under ``base``: nothing is read from or written to the user's home."""
    env = dict(os.environ)
    for name in ("runtime", "config", "data", "checkpoints"):
        (base / name).mkdir(parents=True, exist_ok=True)
    env["JUPYTER_RUNTIME_DIR"] = str(base / "runtime")
    env["JUPYTER_CONFIG_DIR"] = str(base / "config")
    env["JUPYTER_DATA_DIR"] = str(base / "data")
    env["PYREPL3_CHECKPOINT_DIR"] = str(base / "checkpoints")
    env.pop("JUPYTER_TOKEN", None)
    env.update(extra)
    return env


@dataclass
class JupyterServer:
    """A jupyter_server subprocess (``pyrepl3-kernel gateway``, ``jupyter
    server`` or ``jupyter lab``) in its own process group."""

    argv: list[str]
    env: dict[str, str]
    port: int
    token: str
    base: Path
    name: str = "server"
    proc: subprocess.Popen[bytes] | None = None
    _descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    @property
    def log_path(self) -> Path:
        return self.base / f"{self.name}.log"

    @property
    def runtime_dir(self) -> Path:
        return Path(self.env["JUPYTER_RUNTIME_DIR"])

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def start(self, timeout: float = 90) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            with contextlib.suppress(requests.RequestException):
                if self.api("GET", "/api/status", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready within {timeout} s:\n{self.log()}")

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: bool = True,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
        **kwargs: Any,
    ) -> requests.Response:
        all_headers = dict(self.headers) if token else {}
        all_headers.update(headers or {})
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        return requests.request(
            method, self.url + path, data=body, headers=all_headers, timeout=timeout, **kwargs
        )

    def start_kernel(self, name: str | None = None, **model: Any) -> str:
        if name is not None:
            model["name"] = name
        r = self.api("POST", "/api/kernels", model)
        assert r.status_code == 201, (r.status_code, r.text)
        return str(r.json()["id"])

    def stop(self) -> None:
        """Shut down its kernels and the server, then make sure: kill the
        process group and every process it had started, stop its daemon."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                self._descendants = psutil.Process(proc.pid).children(recursive=True)
            with contextlib.suppress(requests.RequestException):
                self.api("POST", "/api/shutdown", timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        stop_daemon(self.runtime_dir)
        for p in self._descendants:
            with contextlib.suppress(psutil.Error):
                p.kill()


@contextlib.contextmanager
def running_server(
    kind: str,
    base: Path,
    *args: str,
    env: dict[str, str] | None = None,
    name: str | None = None,
    timeout: float = 90,
) -> Iterator[JupyterServer]:
    """``kind``: ``gateway`` (``pyrepl3-kernel gateway``), ``server``
    (``jupyter server``) or ``lab`` (``jupyter lab``). Stopped on exit."""
    base.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    bindir = Path(sys.executable).parent
    common = [f"--port={port}", f"--IdentityProvider.token={token}", *AS_ROOT]
    if kind == "gateway":
        argv = [sys.executable, "-m", "pyrepl3_kernel.cli", "gateway", *common]
    elif kind in ("server", "lab"):
        argv = [str(bindir / f"jupyter-{kind}"), "--ip=127.0.0.1", "--no-browser", *common]
    else:
        raise ValueError(kind)
    server = JupyterServer(
        [*argv, "--ServerApp.port_retries=0", *args],
        env if env is not None else server_env(base),
        port,
        token,
        base,
        name or kind,
    )
    try:
        server.start(timeout)
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------
# Harness: the kernel WebSocket (Jupyter JSON message protocol)
# --------------------------------------------------------------------------


@dataclass
class Reply:
    """What one execute_request produced."""

    reply: dict[str, Any]
    outputs: list[dict[str, Any]]  # iopub messages (msg_type, content) in order
    prompts: list[str]

    @property
    def status(self) -> str:
        return str(self.reply.get("status"))

    @property
    def stdout(self) -> str:
        return "".join(
            o["content"]["text"]
            for o in self.outputs
            if o["msg_type"] == "stream" and o["content"]["name"] == "stdout"
        )

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [o["content"] for o in self.outputs if o["msg_type"] == msg_type]


class KernelWS:
    """A client of ``/api/kernels/{id}/channels`` speaking Jupyter's JSON
    WebSocket protocol (no subprotocol: one JSON text frame per message,
    with a ``channel`` field)."""

    def __init__(self, server: JupyterServer, kernel_id: str, timeout: float = 30) -> None:
        from websockets.sync.client import connect

        self.session = uuid.uuid4().hex
        self.kernel_id = kernel_id
        self._connect = connect(
            f"{server.ws_url}/api/kernels/{kernel_id}/channels?session_id={self.session}",
            additional_headers=server.headers,
            open_timeout=timeout,
            max_size=None,
        )
        self.ws = self._connect.__enter__()

    def __enter__(self) -> KernelWS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._connect.__exit__(None, None, None)

    def send(self, channel: str, msg_type: str, content: dict[str, Any], parent: Any = None) -> str:
        msg_id = uuid.uuid4().hex
        self.ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": msg_type,
                        "username": "test",
                        "session": self.session,
                        "date": datetime.now(timezone.utc).isoformat(),
                        "version": "5.3",
                    },
                    "parent_header": parent or {},
                    "metadata": {},
                    "content": content,
                    "channel": channel,
                    "buffers": [],
                }
            )
        )
        return msg_id

    def recv(self, timeout: float) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=max(timeout, 0.001)))  # type: ignore[no-any-return]

    def request(
        self, channel: str, msg_type: str, content: dict[str, Any], timeout: float = 30
    ) -> dict[str, Any]:
        """Send a request and return its reply (on the same channel)."""
        msg_id = self.send(channel, msg_type, content)
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(deadline - time.monotonic())
            if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["channel"] == channel:
                return msg

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        """Until a kernel_info_reply comes back."""
        return self.request("shell", "kernel_info_request", {}, timeout)["content"]  # type: ignore[no-any-return]

    def execute(
        self,
        code: str,
        *,
        timeout: float = 60,
        stdin: Callable[[str], str] | None = None,
        on_output: Callable[[dict[str, Any]], None] | None = None,
    ) -> Reply:
        """Run ``code``; ``stdin(prompt)`` answers input requests. Returns when
        both the execute_reply and the iopub ``idle`` have arrived."""
        msg_id = self.send(
            "shell",
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": stdin is not None,
                "stop_on_error": True,
            },
        )
        deadline = time.monotonic() + timeout
        reply: dict[str, Any] | None = None
        idle = False
        outputs: list[dict[str, Any]] = []
        prompts: list[str] = []
        while reply is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {code!r} within {timeout} s: {outputs}")
            msg = self.recv(left)
            parent = msg.get("parent_header") or {}
            if parent.get("msg_id") != msg_id:
                continue
            channel, msg_type = msg["channel"], msg["msg_type"]
            if channel == "shell" and msg_type == "execute_reply":
                reply = msg["content"]
            elif channel == "iopub" and msg_type == "status":
                idle = idle or msg["content"]["execution_state"] == "idle"
            elif channel == "iopub" and msg_type != "execute_input":
                item = {"msg_type": msg_type, "content": msg["content"]}
                outputs.append(item)
                if on_output is not None:
                    on_output(item)
            elif channel == "stdin" and msg_type == "input_request":
                assert stdin is not None, "input requested without allow_stdin"
                prompts.append(msg["content"]["prompt"])
                self.send(
                    "stdin",
                    "input_reply",
                    {"value": stdin(msg["content"]["prompt"])},
                    msg["header"],
                )
        return Reply(reply, outputs, prompts)


# --------------------------------------------------------------------------
# The module's server
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    base = tmp_path_factory.mktemp("rest-gateway")
    with running_server("gateway", base) as server:
        yield server


@pytest.fixture(scope="module")
def kernel(gateway: JupyterServer) -> str:
    """A pyrepl3 kernel (leased from the daemon), shared by the module."""
    return gateway.start_kernel()


@pytest.fixture(scope="module")
def ipykernel_id(gateway: JupyterServer) -> str:
    """A stock ipykernel (``python3``) on the same server."""
    return gateway.start_kernel("python3")


def execute(server: JupyterServer, kernel_id: str, code: str, **fields: Any) -> requests.Response:
    return server.api("POST", f"/api/pyrepl3/kernels/{kernel_id}/execute", {"code": code, **fields})


@dataclass
class Event:
    kind: str
    data: dict[str, Any]
    at: float  # time.monotonic() when it arrived


def sse(
    server: JupyterServer,
    kernel_id: str,
    code: str,
    on_event: Callable[[Event], None] | None = None,
) -> list[Event]:
    """POST execute with ``Accept: text/event-stream``: the events with their
    arrival times, read as they come."""
    events: list[Event] = []
    with server.api(
        "POST",
        f"/api/pyrepl3/kernels/{kernel_id}/execute",
        {"code": code},
        headers={"Accept": "text/event-stream"},
        stream=True,
    ) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        buffer = ""
        for chunk in r.iter_content(chunk_size=None, decode_unicode=True):
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
                event = Event(fields["event"], json.loads(fields["data"]), time.monotonic())
                events.append(event)
                if on_event is not None:
                    on_event(event)
    return events


# --------------------------------------------------------------------------
# Execute
# --------------------------------------------------------------------------


def test_execute_returns_outputs_as_json(gateway: JupyterServer, kernel: str) -> None:
    r = execute(
        gateway,
        kernel,
        "from IPython.display import HTML, display\n"
        "print('hello'); display(HTML('<b id=\"x\">bold</b>')); 6 * 7",
    )
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["status"] == "ok" and state["kernel_id"] == kernel
    assert len(state["execution_id"]) == 32
    kinds = [o["output_type"] for o in state["outputs"]]
    assert kinds == ["stream", "display_data", "execute_result"], state
    assert state["outputs"][0] == {"output_type": "stream", "name": "stdout", "text": "hello\n"}
    assert state["outputs"][1]["data"]["text/html"] == '<b id="x">bold</b>'
    assert state["outputs"][2]["data"]["text/plain"] == "42"
    assert state["outputs"][2]["execution_count"] == state["execution_count"]

    r = execute(gateway, kernel, "1/0")
    assert r.status_code == 200
    state = r.json()
    assert state["status"] == "error"
    assert state["error"]["ename"] == "ZeroDivisionError"
    assert [o["output_type"] for o in state["outputs"]] == ["error"]


def test_execute_survives_a_worker_crash(gateway: JupyterServer, kernel: str) -> None:
    r = execute(gateway, kernel, "print('before', flush=True); import os; os._exit(3)")
    state = r.json()
    assert state["status"] == "error", state
    assert state["outputs"][0]["text"] == "before\n"
    assert state["error"]["ename"] == "WorkerDied" and "3" in state["error"]["evalue"]
    r = execute(gateway, kernel, "'alive'")
    assert r.json()["outputs"][-1]["data"]["text/plain"] == "'alive'"


def test_sse_events_arrive_while_the_cell_runs(gateway: JupyterServer, kernel: str) -> None:
    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.5)\n"
    events = sse(gateway, kernel, code)
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and "input_request" not in kinds, events
    outputs = [e for e in events if e.kind == "output" and e.data.get("name") == "stdout"]
    assert [o.data["text"] for o in outputs] == ["0\n", "1\n", "2\n"], events
    # The prints came 0.5 s apart, each as it happened: spread over about a
    # second, the first one long before the end (margins for a loaded machine).
    assert outputs[-1].at - outputs[0].at > 0.6, events
    assert events[-1].at - outputs[0].at > 0.9, "the first output came with the last event"
    done = events[-1].data
    assert done["status"] == "ok" and "outputs" not in done
    assert done["execution_id"] == events[0].data["execution_id"]


def test_input_over_rest(gateway: JupyterServer, kernel: str) -> None:
    r = execute(gateway, kernel, "name = input('name? ')\nprint('hi', name)")
    assert r.status_code == 200
    state = r.json()
    assert state["status"] == "input_requested", state
    assert state["input_request"] == {"prompt": "name? ", "password": False}
    eid = state["execution_id"]
    r = gateway.api("GET", f"/api/pyrepl3/executions/{eid}")
    assert r.json()["status"] == "input_requested"
    r = gateway.api("POST", f"/api/pyrepl3/executions/{eid}/input", {"value": "Ada"})
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["status"] == "ok"
    assert "hi Ada\n" in "".join(o.get("text", "") for o in state["outputs"])
    # Not waiting any more: 409.
    r = gateway.api("POST", f"/api/pyrepl3/executions/{eid}/input", {"value": "again"})
    assert r.status_code == 409 and "not waiting for input" in r.json()["message"]


def test_input_over_sse(gateway: JupyterServer, kernel: str) -> None:
    answered: list[str] = []

    def on_event(event: Event) -> None:
        if event.kind == "input_request":
            assert event.data["prompt"] == "pin: " and event.data["password"] is True
            r = gateway.api(
                "POST",
                f"/api/pyrepl3/executions/{event.data['execution_id']}/input",
                {"value": "1234", "timeout": 0},
            )
            assert r.status_code in (200, 202), r.text
            answered.append(r.json()["status"])

    events = sse(gateway, kernel, "import getpass\nprint(len(getpass.getpass('pin: ')))", on_event)
    assert answered, [e.kind for e in events]
    assert [e.kind for e in events] == ["started", "input_request", "output", "done"]
    assert events[2].data["text"] == "4\n"


def test_sse_client_going_away_leaves_the_execution_running(
    gateway: JupyterServer, kernel: str
) -> None:
    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)\n"
    with gateway.api(
        "POST",
        f"/api/pyrepl3/kernels/{kernel}/execute",
        {"code": code},
        headers={"Accept": "text/event-stream"},
        stream=True,
    ) as r:
        first = next(r.iter_content(chunk_size=None, decode_unicode=True))
    eid = json.loads(first.split("data: ", 1)[1])["execution_id"]
    state = gateway.api("GET", f"/api/pyrepl3/executions/{eid}?wait=30").json()
    assert state["status"] == "ok"
    assert state["outputs"] == [{"output_type": "stream", "name": "stdout", "text": "0\n1\n2\n"}]


def test_concurrent_executions_get_their_own_outputs(gateway: JupyterServer, kernel: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def run(n: int) -> dict[str, Any]:
        return execute(gateway, kernel, f"import time; time.sleep(0.2); print({n}); {n}").json()  # type: ignore[no-any-return]

    with ThreadPoolExecutor(4) as pool:
        states = list(pool.map(run, range(4)))
    for n, state in enumerate(states):
        assert state["status"] == "ok"
        assert state["outputs"][0]["text"] == f"{n}\n"
        assert state["outputs"][1]["data"]["text/plain"] == str(n)


def test_allow_stdin_false_fails_input_at_once(gateway: JupyterServer, kernel: str) -> None:
    r = execute(gateway, kernel, "input()", allow_stdin=False)
    state = r.json()
    assert state["status"] == "error" and state["error"]["ename"] == "StdinNotImplementedError"


def test_timeout_then_get_with_wait(gateway: JupyterServer, kernel: str) -> None:
    r = execute(gateway, kernel, "import time; time.sleep(1.5); print('done')", timeout=0.2)
    assert r.status_code == 202, r.text
    state = r.json()
    assert state["status"] == "running"
    eid = state["execution_id"]
    r = gateway.api("GET", f"/api/pyrepl3/executions/{eid}")
    assert r.status_code == 200 and r.json()["status"] == "running"
    start = time.monotonic()
    r = gateway.api("GET", f"/api/pyrepl3/executions/{eid}?wait=30")
    assert time.monotonic() - start < 10
    state = r.json()
    assert state["status"] == "ok" and state["outputs"][0]["text"] == "done\n"
    # Done: ?wait returns at once.
    start = time.monotonic()
    assert gateway.api("GET", f"/api/pyrepl3/executions/{eid}?wait=30").json()["status"] == "ok"
    assert time.monotonic() - start < 2


# --------------------------------------------------------------------------
# Health, pool, kernels started with env
# --------------------------------------------------------------------------


def test_health(gateway: JupyterServer, kernel: str) -> None:
    r = gateway.api("GET", f"/api/pyrepl3/kernels/{kernel}/health")
    assert r.status_code == 200, r.text
    health = r.json()
    assert health["kernel_id"] == kernel
    assert health["kernel_memory"] > 0
    assert set(health["pyrepl3"]) >= {"uptime_s", "restarts", "last_crash", "limits"}


def test_pool_lists_the_lease(gateway: JupyterServer, kernel: str) -> None:
    r = gateway.api("GET", "/api/pyrepl3/pool")
    assert r.status_code == 200, r.text
    status = r.json()
    assert status["daemon"]["pid"] > 0
    assert kernel in [lease["kernel_id"] for lease in status["leases"]]
    assert KERNEL_NAME in [pool["kernel_name"] for pool in status["pools"]]


def test_start_kernel_honours_env(gateway: JupyterServer, tmp_path: Path) -> None:
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    env = {"KERNEL_WORKING_DIR": str(workdir), "KERNEL_FOO": "bar", "NOT_KERNEL": "x"}
    kid = gateway.start_kernel(env=env)
    try:
        state = execute(
            gateway,
            kid,
            "import os; print(os.getcwd(), os.environ.get('KERNEL_FOO'), os.environ.get('NOT_KERNEL'))",
        ).json()
        assert state["outputs"][0]["text"] == f"{workdir} bar None\n"
    finally:
        gateway.api("DELETE", f"/api/kernels/{kid}")
    r = gateway.api("POST", "/api/kernels", {"env": {"KERNEL_WORKING_DIR": str(tmp_path / "nope")}})
    assert r.status_code == 400
    r = gateway.api("POST", "/api/kernels", {"env": {"KERNEL_X": 1}})
    assert r.status_code == 400
    r = gateway.api("POST", "/api/kernels", {"name": "no-such-kernel"})
    assert r.status_code == 404


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def test_checkpoint_life_cycle(gateway: JupyterServer, kernel: str) -> None:
    base = f"/api/pyrepl3/kernels/{kernel}/checkpoints"
    assert execute(gateway, kernel, "cp_x = [1, 2, 3]; cp_y = 'why'").json()["status"] == "ok"
    r = gateway.api("POST", base, {"name": "cp-1"})
    assert r.status_code == 201, r.text
    report = r.json()
    assert report["name"] == "cp-1" and {"cp_x", "cp_y"} <= set(report["saved"])

    r = gateway.api("GET", base)
    assert r.status_code == 200
    assert "cp-1" in [c["name"] for c in r.json()["checkpoints"]]

    r = gateway.api("GET", f"{base}/cp-1")
    assert r.status_code == 200, r.text
    assert {"cp_x", "cp_y"} <= set(r.json()["names"])

    execute(gateway, kernel, "cp_x.append(4); del cp_y; cp_z = 1")
    r = gateway.api("POST", f"{base}/cp-1/restore", {"clear": True})
    assert r.status_code == 200, r.text
    out = execute(gateway, kernel, "print(cp_x, cp_y, 'cp_z' in globals())").json()
    assert out["outputs"][0]["text"] == "[1, 2, 3] why False\n"
    # An empty body restores too (clear defaults to true).
    r = gateway.api("POST", f"{base}/cp-1/restore")
    assert r.status_code == 200, r.text

    # The store is shared: another kernel restores it too.
    other = gateway.start_kernel()
    try:
        r = gateway.api("POST", f"/api/pyrepl3/kernels/{other}/checkpoints/cp-1/restore")
        assert r.status_code == 200, r.text
        out = execute(gateway, other, "print(cp_x, cp_y)").json()
        assert out["outputs"][0]["text"] == "[1, 2, 3] why\n"
    finally:
        gateway.api("DELETE", f"/api/kernels/{other}")

    r = gateway.api("DELETE", f"{base}/cp-1")
    assert r.status_code == 204 and not r.content
    for method, path in (("GET", "/cp-1"), ("DELETE", "/cp-1"), ("POST", "/cp-1/restore")):
        r = gateway.api(method, base + path)
        assert r.status_code == 404, (method, path, r.text)
        assert "no checkpoint named" in r.json()["message"]


def test_a_save_does_not_replace_another_kernels_checkpoint(
    gateway: JupyterServer, kernel: str, tmp_path: Path
) -> None:
    """Names are shared by the kernels of a store: a save over a name another
    kernel (or notebook) saved is 409 and writes nothing; every summary says
    who saved it and in which cell (the execution_count the client saw)."""
    base = f"/api/pyrepl3/kernels/{kernel}/checkpoints"
    count = execute(gateway, kernel, "owned_v = 'first'").json()["execution_count"]
    r = gateway.api("POST", base, {"name": "owned"})
    assert r.status_code == 201, r.text
    report = r.json()
    assert report["cell_number"] == count and report["execution_count"] == count + 1
    assert report["saved_by"] == {"notebook": None, "kernel": kernel}
    assert report["replaced"] is None
    # Its own checkpoint: replaced without force, and the report says so.
    r = gateway.api("POST", base, {"name": "owned"})
    assert r.status_code == 201 and r.json()["replaced"]["cell_number"] == count, r.text

    notebook = str(tmp_path / "owner.ipynb")
    other = gateway.start_kernel(env={"JPY_SESSION_NAME": notebook})
    try:
        other_base = f"/api/pyrepl3/kernels/{other}/checkpoints"
        execute(gateway, other, "owned_v = 'second'")
        r = gateway.api("POST", other_base, {"name": "owned"})
        assert r.status_code == 409, r.text
        message = r.json()["message"]
        assert message.startswith("CheckpointExistsError: checkpoint 'owned' was saved by ")
        assert f"kernel {kernel[:8]} (cell {count}, " in message and '"force": true' in message
        r = gateway.api("POST", other_base, {"name": "owned", "force": "yes"})
        assert r.status_code == 400 and "'force'" in r.json()["message"]

        listed = {c["name"]: c for c in gateway.api("GET", other_base).json()["checkpoints"]}
        assert listed["owned"]["saved_by"] == {"notebook": None, "kernel": kernel}
        assert listed["owned"]["cell_number"] == count and not listed["owned"]["saved_here"]
        listed = {c["name"]: c for c in gateway.api("GET", base).json()["checkpoints"]}
        assert listed["owned"]["saved_here"]

        # A restore brings the first kernel's state, and leaves the other
        # kernel's cell numbers as they were.
        before = execute(gateway, other, "1").json()["execution_count"]
        r = gateway.api("POST", f"{other_base}/owned/restore")
        assert r.status_code == 200, r.text
        assert r.json()["cell_number"] == count
        state = execute(gateway, other, "print(owned_v)").json()
        assert state["outputs"][0]["text"] == "first\n"
        assert state["execution_count"] == before + 1

        # The other kernel's notebook owns what it saves.
        r = gateway.api("POST", other_base, {"name": "owned-too"})
        assert r.status_code == 201, r.text
        assert r.json()["saved_by"] == {"notebook": notebook, "kernel": other}
        r = gateway.api("POST", base, {"name": "owned-too"})
        assert r.status_code == 409
        assert "was saved by notebook " in r.json()["message"]
        assert "owner.ipynb (cell " in r.json()["message"]
    finally:
        gateway.api("DELETE", f"/api/kernels/{other}")
        gateway.api("DELETE", f"{base}/owned")
        gateway.api("DELETE", f"{base}/owned-too")


def test_force_replaces_another_kernels_checkpoint(gateway: JupyterServer, kernel: str) -> None:
    base = f"/api/pyrepl3/kernels/{kernel}/checkpoints"
    execute(gateway, kernel, "forced_v = 'first'")
    assert gateway.api("POST", base, {"name": "forced"}).status_code == 201
    other = gateway.start_kernel()
    try:
        other_base = f"/api/pyrepl3/kernels/{other}/checkpoints"
        execute(gateway, other, "forced_v = 'second'")
        assert gateway.api("POST", other_base, {"name": "forced"}).status_code == 409
        r = gateway.api("POST", other_base, {"name": "forced", "force": True})
        assert r.status_code == 201, r.text
        assert r.json()["replaced"]["saved_by"]["kernel"] == kernel
        assert r.json()["saved_by"]["kernel"] == other
    finally:
        gateway.api("DELETE", f"/api/kernels/{other}")
        gateway.api("DELETE", f"{base}/forced")


def test_checkpoints_of_an_ipykernel_are_409(gateway: JupyterServer, ipykernel_id: str) -> None:
    base = f"/api/pyrepl3/kernels/{ipykernel_id}/checkpoints"
    for method, path, body in (
        ("GET", "", None),
        ("POST", "", {"name": "a"}),
        ("GET", "/a", None),
        ("DELETE", "/a", None),
        ("POST", "/a/restore", {}),
    ):
        r = gateway.api(method, base + path, body)
        assert r.status_code == 409, (method, path, r.status_code, r.text)
        assert "not a pyrepl3 kernel" in r.json()["message"]
    # Execute and health work on any kernel.
    state = execute(gateway, ipykernel_id, "print('ipy')").json()
    assert state["status"] == "ok" and state["outputs"][0]["text"] == "ipy\n"


# --------------------------------------------------------------------------
# Error codes
# --------------------------------------------------------------------------

UNKNOWN = "00000000-0000-0000-0000-000000000000"

ERROR_CASES = [
    # (method, path with {k} for the kernel, body or raw text, status, words in the message)
    ("POST", "/api/pyrepl3/kernels/{k}/execute", "{not json", 400, "not valid JSON"),
    ("POST", "/api/pyrepl3/kernels/{k}/execute", "[1, 2]", 400, "JSON object"),
    ("POST", "/api/pyrepl3/kernels/{k}/execute", {}, 400, "'code'"),
    ("POST", "/api/pyrepl3/kernels/{k}/execute", {"code": 1}, 400, "'code'"),
    ("POST", "/api/pyrepl3/kernels/{k}/execute", {"code": "1", "timeout": -1}, 400, "'timeout'"),
    ("POST", "/api/pyrepl3/kernels/{k}/execute", {"code": "1", "timeout": True}, 400, "'timeout'"),
    (
        "POST",
        "/api/pyrepl3/kernels/{k}/execute",
        {"code": "1", "allow_stdin": "y"},
        400,
        "allow_stdin",
    ),
    ("POST", f"/api/pyrepl3/kernels/{UNKNOWN}/execute", {"code": "1"}, 404, "no kernel"),
    ("GET", "/api/pyrepl3/kernels/nope/health", None, 404, "no kernel"),
    ("GET", f"/api/pyrepl3/kernels/{UNKNOWN}/checkpoints", None, 404, "no kernel"),
    ("POST", f"/api/pyrepl3/kernels/{UNKNOWN}/checkpoints/a/restore", {}, 404, "no kernel"),
    ("GET", f"/api/pyrepl3/executions/{'0' * 32}", None, 404, "no execution"),
    ("POST", f"/api/pyrepl3/executions/{'0' * 32}/input", {"value": "x"}, 404, "no execution"),
    ("POST", "/api/pyrepl3/kernels/{k}/checkpoints", "{", 400, "not valid JSON"),
    ("POST", "/api/pyrepl3/kernels/{k}/checkpoints", {}, 400, "'name'"),
    ("POST", "/api/pyrepl3/kernels/{k}/checkpoints", {"name": "a/b"}, 400, "bad checkpoint name"),
    ("POST", "/api/pyrepl3/kernels/{k}/checkpoints", {"name": "a", "force": 1}, 400, "'force'"),
    (
        "POST",
        "/api/pyrepl3/kernels/{k}/checkpoints",
        {"name": ".hidden"},
        400,
        "bad checkpoint name",
    ),
    (
        "POST",
        "/api/pyrepl3/kernels/{k}/checkpoints",
        {"name": "x" * 129},
        400,
        "bad checkpoint name",
    ),
    ("GET", "/api/pyrepl3/kernels/{k}/checkpoints/.hidden", None, 400, "bad checkpoint name"),
    ("GET", "/api/pyrepl3/kernels/{k}/checkpoints/" + "x" * 129, None, 400, "bad checkpoint name"),
    ("GET", "/api/pyrepl3/kernels/{k}/checkpoints/never-saved", None, 404, "no checkpoint named"),
    ("POST", "/api/pyrepl3/kernels/{k}/checkpoints/a/restore", {"clear": "no"}, 400, "'clear'"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    ERROR_CASES,
    ids=[f"{c[0]} {c[1]} {c[3]}" for c in ERROR_CASES],
)
def test_error_codes(
    gateway: JupyterServer, kernel: str, method: str, path: str, body: Any, status: int, words: str
) -> None:
    r = gateway.api(method, path.format(k=kernel), body)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert words in r.json()["message"]


def test_names_outside_the_url_pattern_are_404(gateway: JupyterServer, kernel: str) -> None:
    for name in ("a%20b", "a%2Fb", "%C3%A9t%C3%A9"):
        r = gateway.api("GET", f"/api/pyrepl3/kernels/{kernel}/checkpoints/{name}")
        assert r.status_code == 404, (name, r.status_code)
    r = gateway.api("GET", "/api/pyrepl3/executions/not-hex")
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/pyrepl3/pool"),
        ("GET", "/api/pyrepl3/kernels/{k}/health"),
        ("POST", "/api/pyrepl3/kernels/{k}/execute"),
        ("GET", "/api/pyrepl3/kernels/{k}/checkpoints"),
        ("DELETE", "/api/pyrepl3/kernels/{k}/checkpoints/a"),
        ("GET", f"/api/pyrepl3/executions/{'0' * 32}"),
    ],
)
def test_no_token_is_403(gateway: JupyterServer, kernel: str, method: str, path: str) -> None:
    body = {"code": "1"} if method == "POST" else None
    for headers in ({}, {"Authorization": "token wrong"}):
        r = gateway.api(method, path.format(k=kernel), body, token=False, headers=headers)
        assert r.status_code == 403, (headers, r.status_code, r.text)
        assert "message" in r.json()


# --------------------------------------------------------------------------
# schemathesis: docs/openapi.yaml against the live server
# --------------------------------------------------------------------------


def _schemathesis_run(
    gateway: JupyterServer,
    path_parameters: dict[str, str],
    max_examples: int,
    *,
    negative: bool = False,
    before: Callable[[Any], None] | None = None,
) -> dict[str, int]:
    """Every documented operation, ``max_examples`` generated cases each (with
    ``path_parameters`` fixed, the rest generated). Fails on a 500, an
    undocumented status, a wrong content type or a body off its schema; with
    ``negative`` (cases that break the schema on purpose), on a 500 or an
    undocumented status.
    ``before(case)`` runs before each call. Returns the count of each status seen."""
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_path(OPENAPI)
    checks = [not_a_server_error, status_code_conformance]
    if not negative:
        checks += [content_type_conformance, response_schema_conformance]
    mode = GenerationMode.NEGATIVE if negative else GenerationMode.POSITIVE
    seen: dict[str, int] = {}
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        fixed = {
            p.name: path_parameters[p.name]
            for p in operation.path_parameters
            if p.name in path_parameters
        }

        @hypothesis.settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=operation.as_strategy(mode, path_parameters=fixed or None))
        def run(case: Any) -> None:
            timeout = case.body.get("timeout") if isinstance(case.body, dict) else None
            if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 2:
                case.body["timeout"] = 2  # bounded run time
            if before is not None:
                before(case)
            # jupyter_server answers a token with a login cookie: drop it, or
            # requests without the token would pass as logged in.
            session.cookies.clear()
            response = case.call_and_validate(
                base_url=gateway.url,
                session=session,
                headers=gateway.headers,
                checks=checks,
                timeout=30,
            )
            key = f"{case.operation.method.upper()} {case.operation.path} {response.status_code}"
            seen[key] = seen.get(key, 0) + 1

        run()
    return seen


def test_openapi_document_is_valid() -> None:
    import schemathesis

    schema = schemathesis.openapi.from_path(OPENAPI)
    schema.validate()  # against the OpenAPI 3.0 meta-schema
    assert len([op for op in schema.get_all_operations() if op.ok()]) == 13


def test_openapi_conformance_on_an_ipykernel(gateway: JupyterServer, ipykernel_id: str) -> None:
    """A stock kernel: execute and health work, checkpoints are 409, as documented."""
    seen = _schemathesis_run(gateway, {"kernel_id": ipykernel_id}, max_examples=3)
    print(json.dumps(seen, indent=1))
    checkpoint_statuses = {k.rsplit(" ", 1)[1] for k in seen if "/checkpoints" in k}
    assert checkpoint_statuses == {"409"}, seen


def test_openapi_conformance_with_schemathesis(gateway: JupyterServer, kernel: str) -> None:
    # A real execution to hit the execution endpoints with.
    eid = execute(gateway, kernel, "1").json()["execution_id"]
    seen = _schemathesis_run(gateway, {"kernel_id": kernel, "execution_id": eid}, max_examples=20)
    print(json.dumps(seen, indent=1))
    statuses = {key.rsplit(" ", 1)[1] for key in seen}
    assert {"200", "201"} <= statuses, seen
    assert any(key.startswith("POST /api/pyrepl3/kernels/{kernel_id}/execute 2") for key in seen)
    # A checkpoint that exists, saved afresh before each call that names it.
    base = f"/api/pyrepl3/kernels/{kernel}/checkpoints"

    def save(case: Any) -> None:
        if "{name}" in case.operation.path:
            assert gateway.api("POST", base, {"name": "st"}).status_code == 201

    seen = _schemathesis_run(gateway, {"kernel_id": kernel, "name": "st"}, 3, before=save)
    print(json.dumps(seen, indent=1))
    for op in ("GET {name} 200", "DELETE {name} 204", "POST {name}/restore 200"):
        method, path, status = op.split()
        assert seen.get(f"{method} /api/pyrepl3/kernels/{{kernel_id}}/checkpoints/{path} {status}")
    # Bodies and parameters off the schema: 4xx, never 500.
    seen = _schemathesis_run(gateway, {"kernel_id": kernel, "execution_id": eid}, 10, negative=True)
    print(json.dumps(seen, indent=1))
    # Random ids: 404 (or 400), never 500.
    seen = _schemathesis_run(gateway, {}, max_examples=5)
    print(json.dumps(seen, indent=1))
    bad = {k: n for k, n in seen.items() if not k.endswith((" 404", " 400")) and "/pool" not in k}
    assert not bad, seen
    # The kernel still works after all that.
    assert execute(gateway, kernel, "'still here'").json()["status"] == "ok"


def test_server_log_has_no_tracebacks(gateway: JupyterServer) -> None:
    """Everything above, the 4xx included, left no uncaught exception."""
    log = gateway.log(10_000_000)
    assert "Traceback" not in log and "Uncaught exception" not in log, log[
        log.find("Traceback") - 500 :
    ]
