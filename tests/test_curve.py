"""CurveZMQ transport encryption, as jupyter_client 8.10 negotiates it.

A KernelManager with ``transport_encryption="required"`` makes a Curve key
pair; the kernel (leased from the daemon by the ``pyrepl3-pool``
provisioner, or the ``--no-pool`` standalone process) binds its five sockets
as Curve servers with it. A client with the key works; one without it (or
with another key) gets nothing on iopub and cannot execute, though it holds
the right HMAC key; a relay on the wire sees no plain text. The daemon and
the standalone kernel refuse unusable keys with a clear error. A real
jupyter_server configured with ``transport_encryption=required`` runs a
notebook on both kernelspecs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
import zmq
from frontend import Frontend
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from jupyter_helpers import COLD_KERNEL_NAME, KERNEL_NAME, KERNEL_NAMES, TIMEOUT

from pyrepl3_kernel.daemon.client import DaemonClient, DaemonError, DaemonPaths
from pyrepl3_kernel.provisioner import PoolProvisioner

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CurveZMQ")

#: How long a refused client is given to get anything: a keyed client's
#: request round trip takes milliseconds here.
REFUSED_WAIT = 2.0


class CurveKernel(Frontend):
    """A kernel started with ``transport_encryption="required"`` and a
    client that has its key."""

    def __init__(self, kernel_name: str) -> None:
        super().__init__(kernel_name, transport_encryption="required")

    def run(self, code: str, client: BlockingKernelClient | None = None) -> tuple[str, str]:
        """(status, stdout) of ``code``."""
        out: list[str] = []

        def output(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])

        reply = (client or self.kc).execute_interactive(code, timeout=TIMEOUT, output_hook=output)
        return str(reply["content"]["status"]), "".join(out)


@pytest.fixture(scope="module", params=KERNEL_NAMES)
def curve(request: pytest.FixtureRequest, pyrepl3_kernelspec: Path) -> Iterator[CurveKernel]:
    kernel = CurveKernel(request.param)
    try:
        yield kernel
    finally:
        kernel.close()


def connection_info(km: KernelManager, **override: Any) -> dict[str, Any]:
    info: dict[str, Any] = dict(km.get_connection_info())
    info.update(override)
    return {k: v for k, v in info.items() if v is not None}


def started_client(info: dict[str, Any]) -> BlockingKernelClient:
    client = BlockingKernelClient()
    client.load_connection_info(info)
    client.start_channels()
    return client


def test_the_kernel_serves_the_kernel_managers_keys(curve: CurveKernel) -> None:
    km = curve.km
    assert km.curve_publickey is not None and km.curve_secretkey is not None
    assert zmq.curve_public(km.curve_secretkey) == km.curve_publickey
    with open(km.connection_file) as f:
        written = json.load(f)
    assert written["curve_publickey"] == km.curve_publickey.decode()
    provisioner: Any = km.provisioner
    if curve.kernel_name == KERNEL_NAME:
        # leased from the daemon, not the provisioner's cold fallback
        assert isinstance(provisioner, PoolProvisioner) and provisioner.lease_id
        assert provisioner.connection_info["curve_publickey"] == km.curve_publickey.decode()


def test_a_client_with_the_key_executes_and_hears_the_heartbeat(curve: CurveKernel) -> None:
    assert curve.run("print(6 * 7)") == ("ok", "42\n")
    assert curve.kc.hb_channel.is_beating()
    info = curve.kc.kernel_info(reply=True, timeout=TIMEOUT)
    assert info["content"]["status"] == "ok"


def test_clients_without_the_key_get_nothing_and_cannot_execute(curve: CurveKernel) -> None:
    """Both hold the right HMAC key: only Curve keeps them out."""
    other_public, other_secret = zmq.curve_keypair()
    plain = started_client(connection_info(curve.km, curve_publickey=None, curve_secretkey=None))
    wrong = started_client(
        connection_info(curve.km, curve_publickey=other_public, curve_secretkey=other_secret)
    )
    try:
        for client in (plain, wrong):
            # A socket whose every handshake fails may have no pipe to queue
            # into at the moment of a send: that blocks. Bounded, and a send
            # that cannot even be queued is one more way of being refused.
            client.shell_channel.socket.sndtimeo = int(REFUSED_WAIT * 1000)
            with contextlib.suppress(zmq.Again):
                client.execute("refused_client_ran = True")
            with contextlib.suppress(zmq.Again):
                client.kernel_info()
        # what the keyed client makes the kernel publish, the others never see
        assert curve.run("print('published')") == ("ok", "published\n")
        deadline = time.monotonic() + REFUSED_WAIT
        for client in (plain, wrong):
            for get in (client.get_shell_msg, client.get_iopub_msg):
                with pytest.raises(Empty):
                    get(timeout=max(0.01, deadline - time.monotonic()))
        status, out = curve.run("print('refused_client_ran' in globals())")
        assert (status, out) == ("ok", "False\n")
    finally:
        plain.stop_channels()
        wrong.stop_channels()
    # and the kernel goes on serving its keyed client
    assert curve.run("print('still here')") == ("ok", "still here\n")


class Relay:
    """A loopback TCP relay to ``target_port`` that records every byte it
    forwards, both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = [self._server]
        self._spawn(self._accept)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):
                sock.settimeout(0.2)
                self._sockets.append(sock)
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.seen += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=2)


def test_the_wire_carries_no_plain_text(curve: CurveKernel) -> None:
    """A client through relays on the shell and iopub ports works, and the
    relays see neither the code nor its output."""
    relays = {ch: Relay(getattr(curve.km, f"{ch}_port")) for ch in ("shell", "iopub")}
    client = started_client(
        connection_info(curve.km, **{f"{ch}_port": r.port for ch, r in relays.items()})
    )
    try:
        client.wait_for_ready(timeout=TIMEOUT)
        marker = secrets.token_hex(8)
        assert curve.run(f"print('{marker}' * 2)", client=client) == ("ok", marker * 2 + "\n")
    finally:
        client.stop_channels()
        for relay in relays.values():
            relay.close()
    for channel, relay in relays.items():
        assert len(relay.seen) > 200, f"nothing went through the {channel} relay"
        assert marker.encode() not in relay.seen, f"plain text on the {channel} channel"
        assert b"msg_type" not in relay.seen, f"a message header in plain text on {channel}"


def test_a_restart_keeps_the_keys(curve: CurveKernel) -> None:
    km = curve.km
    before = (km.curve_publickey, km.curve_secretkey)
    curve.run("before_restart = 1")
    km.restart_kernel()  # as jupyter_server restarts a kernel: polite shutdown, then start
    curve.kc.wait_for_ready(timeout=60)
    assert (km.curve_publickey, km.curve_secretkey) == before
    assert curve.run("print('before_restart' in globals())") == ("ok", "False\n")


# -- bad keys: a clear error, nothing started ----------------------------------------------

PUBLIC, SECRET = (k.decode() for k in zmq.curve_keypair())
OTHER_PUBLIC = zmq.curve_keypair()[0].decode()
BAD_KEYS: dict[str, tuple[dict[str, Any], str]] = {
    "half-a-pair": ({"curve_publickey": PUBLIC}, "half a Curve key pair"),
    "not-its-public-key": (
        {"curve_publickey": OTHER_PUBLIC, "curve_secretkey": SECRET},
        "is not the public key of",
    ),
    "too-short": ({"curve_publickey": PUBLIC[:20], "curve_secretkey": SECRET}, "40 characters"),
    "not-z85": ({"curve_publickey": PUBLIC, "curve_secretkey": "~" * 40}, "not valid Z85"),
    "a-number": ({"curve_publickey": PUBLIC, "curve_secretkey": 7}, "40 characters"),
}


@pytest.mark.parametrize("curve", [KERNEL_NAME], indirect=True)  # its daemon
@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_the_daemon_refuses_unusable_keys(curve: CurveKernel, case: str) -> None:
    keys, message = BAD_KEYS[case]
    client = DaemonClient(DaemonPaths.default(os.environ["JUPYTER_RUNTIME_DIR"]), timeout=30)
    leases_before = len(client.call("status")["leases"])
    with pytest.raises(DaemonError) as err:
        client.call("lease", kernel_name=KERNEL_NAME, owner_pid=os.getpid(), **keys)
    assert err.value.code == "bad_request"
    assert message in str(err.value)
    assert SECRET not in str(err.value)  # a secret key is never echoed
    assert len(client.call("status")["leases"]) == leases_before


@pytest.mark.parametrize("case", ["half-a-pair", "not-its-public-key", "not-z85"])
def test_the_standalone_kernel_refuses_unusable_keys(tmp_path: Path, case: str) -> None:
    keys, message = BAD_KEYS[case]
    info = {
        "transport": "tcp",
        "ip": "127.0.0.1",
        "key": secrets.token_hex(16),
        "signature_scheme": "hmac-sha256",
        **{f"{ch}_port": 0 for ch in ("shell", "iopub", "stdin", "control", "hb")},
        **keys,
    }
    connection_file = tmp_path / "kernel.json"
    connection_file.write_text(json.dumps(info))
    done = subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel", "-f", str(connection_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "IPYTHONDIR": str(tmp_path)},
    )
    assert done.returncode != 0
    assert message in done.stderr and str(connection_file) in done.stderr
    assert "Traceback" not in done.stderr
    assert SECRET not in done.stderr


# -- a real jupyter_server with transport_encryption=required ------------------------------


def test_jupyter_server_requiring_encryption_runs_a_notebook(
    pyrepl3_kernelspec: Path, tmp_path: Path
) -> None:
    import nbformat
    from test_rest_api import KernelWS, running_server

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("total = sum(range(10))"),
        nbformat.v4.new_code_cell("print('total', total)"),
        nbformat.v4.new_code_cell("name = input('who? ')\nprint('hello', name)"),
    ]
    with running_server(
        "server", tmp_path / "server", "--MappingKernelManager.transport_encryption=required"
    ) as server:
        nbformat.write(nb, server.base / "encrypted.ipynb")
        for kernel_name in (KERNEL_NAME, COLD_KERNEL_NAME):
            r = server.api(
                "POST",
                "/api/sessions",
                {"path": "encrypted.ipynb", "type": "notebook", "kernel": {"name": kernel_name}},
            )
            assert r.status_code == 201, (r.status_code, r.text)
            kernel_id = r.json()["kernel"]["id"]
            # the server gave the kernel Curve keys (its connection file says so)
            written = json.loads((server.runtime_dir / f"kernel-{kernel_id}.json").read_text())
            assert len(written.get("curve_publickey", "")) == 40, written.keys()
            with KernelWS(server, kernel_id) as ws:
                ws.wait_ready()
                outs = [ws.execute(cell.source, stdin=lambda prompt: "curve") for cell in nb.cells]
            assert [o.status for o in outs] == ["ok", "ok", "ok"]
            assert outs[1].stdout == "total 45\n"
            assert outs[2].prompts == ["who? "] and outs[2].stdout == "hello curve\n"
            r = server.api("DELETE", f"/api/sessions/{r.json()['id']}")
            assert r.status_code == 204, r.text


def test_pyrepl3_rest_execute_with_required_encryption(
    pyrepl3_kernelspec: Path, tmp_path: Path
) -> None:
    """``pyrepl3-kernel gateway``'s own REST execute is a ZMQ client of the
    kernel too: it gets the keys from the kernel's manager."""
    from test_rest_api import execute, running_server

    with running_server(
        "gateway", tmp_path / "gateway", "--MappingKernelManager.transport_encryption=required"
    ) as server:
        kernel_id = server.start_kernel(KERNEL_NAME)
        written = json.loads((server.runtime_dir / f"kernel-{kernel_id}.json").read_text())
        assert len(written.get("curve_publickey", "")) == 40, written.keys()
        r = execute(server, kernel_id, "print('over REST'); 6 * 7")
        assert r.status_code == 200, r.text
        state = r.json()
        assert state["status"] == "ok", state
        assert state["outputs"][0]["text"] == "over REST\n"
        assert state["outputs"][1]["data"]["text/plain"] == "42"


@pytest.mark.parametrize("curve", [KERNEL_NAME], indirect=True)  # its daemon
def test_a_lease_without_the_keys_is_released_and_refused(curve: CurveKernel) -> None:
    """What a daemon older than Curve support answers (a plain kernel) is
    not handed to jupyter_client: the provisioner releases it and says so
    (its launch then starts the kernel cold)."""
    import asyncio

    from jupyter_client.kernelspec import KernelSpecManager

    from pyrepl3_kernel.curve import CurveKeys

    client = DaemonClient(DaemonPaths.default(os.environ["JUPYTER_RUNTIME_DIR"]), timeout=30)
    plain = client.call("lease", kernel_name=KERNEL_NAME, owner_pid=os.getpid())
    try:
        assert "curve_publickey" not in plain["connection_info"]
        provisioner = PoolProvisioner(
            kernel_id="curve-check",
            kernel_spec=KernelSpecManager().get_kernel_spec(KERNEL_NAME),
            parent=None,
        )
        public, secret = zmq.curve_keypair()
        provisioner._curve = CurveKeys(public, secret)
        with pytest.raises(DaemonError) as err:
            asyncio.run(provisioner._check_curve(plain))
        assert err.value.code == "no_curve" and "pyrepl3-kernel stop" in str(err.value)
        leases = [lease["lease_id"] for lease in client.call("status")["leases"]]
        assert plain["lease_id"] not in leases
    finally:
        client.call("release", lease_id=plain["lease_id"])
