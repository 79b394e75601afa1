"""The manager daemon under stress: bad input, other users, simultaneous
clients, clients that are killed, ``stop``, and the provisioner's cold
fallback when no daemon can be had.

One daemon (``pyrepl3-kernel serve`` in the module's own runtime dir) serves
the module; the last test stops it and checks that it leaves no process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelManager
from pool_helpers import (
    PoolSetup,
    alive,
    assert_gone,
    cli,
    pooled_kernelspec,
    processes_naming,
    tree,
    wait_until,
)
from traitlets.config import Config

from pyrepl3_kernel.daemon.client import MAX_FRAME, DaemonError

NAME = "pyrepl3-daemon-test"
NOBODY = 65534


class Daemon:
    def __init__(self, setup: PoolSetup, proc: subprocess.Popen[bytes]) -> None:
        self.setup = setup
        self.proc = proc

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.setup.client().call(op, **fields)

    def lease(self, **fields: Any) -> dict[str, Any]:
        request: dict[str, Any] = {
            "kernel_name": NAME,
            "owner_pid": os.getpid(),
            "env": dict(os.environ),
            "cwd": str(self.setup.work),
            "pool": {"size": 2},
        }
        request.update(fields)
        return self.call("lease", **request)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("pool-daemon")
    with pooled_kernelspec(base, NAME, "--pool-size", "2") as setup:
        with open(base / "serve.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pyrepl3_kernel.cli",
                    "serve",
                    "--runtime-dir",
                    str(setup.runtime_dir),
                    "--log-level",
                    "DEBUG",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_until(lambda: setup.client().ping() is not None, 30, "the daemon to answer")
            daemon = Daemon(setup, proc)
            # The first lease makes the kernelspec's pool.
            daemon.call("release", lease_id=daemon.lease()["lease_id"])
            yield daemon
        finally:
            setup.stop()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- bad input on the socket ---------------------------------------------------


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def request(**fields: Any) -> bytes:
    return frame(json.dumps(fields).encode())


def lease_request(**fields: Any) -> bytes:
    base: dict[str, Any] = {"v": 1, "op": "lease", "kernel_name": NAME, "owner_pid": os.getpid()}
    base.update(fields)
    return request(**base)


def send_raw(path: Path, data: bytes, half_close: bool = True) -> dict[str, Any] | None:
    """Send ``data`` on a connection of its own; the reply frame, or None if
    the daemon closed the connection without one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(os.fspath(path))
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    if not received:
        return None
    (length,) = struct.unpack(">I", received[:4])
    assert len(received) == 4 + length, "the reply frame is incomplete"
    return json.loads(received[4:])  # type: ignore[no-any-return]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


BAD_INPUT: dict[str, tuple[bytes | Callable[[], bytes], str | None]] = {
    # (bytes sent, or a function making them; the error code, None: a clean
    # close is fine too)
    "garbage": (b"\x00\x00\x00\x10" + bytes(range(240, 256)), "malformed"),
    "http-request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "too_large"),
    "not-json": (frame(b"{this is not json"), "malformed"),
    "not-utf8": (frame(b'{"v": 1, "op": "\xff\xfe"}'), "malformed"),
    "json-array": (frame(b"[1, 2, 3]"), "malformed"),
    "json-string": (frame(b'"hello"'), "malformed"),
    "huge-length": (b"\xff\xff\xff\xff" + b"{}", "too_large"),
    "just-too-large": (struct.pack(">I", MAX_FRAME + 1), "too_large"),
    "truncated-payload": (struct.pack(">I", 100) + b'{"v": 1, "op"', None),
    "truncated-header": (b"\x00\x00", None),
    "empty": (b"", None),
    "no-version": (request(op="hello"), "unsupported_version"),
    "wrong-version": (request(v=2, op="hello"), "unsupported_version"),
    "version-string": (request(v="1", op="hello"), "unsupported_version"),
    "version-bool": (request(v=True, op="hello"), "unsupported_version"),
    "version-float": (request(v=1.5, op="hello"), "unsupported_version"),
    "unknown-op": (request(v=1, op="launch_missiles"), "unknown_op"),
    "op-not-string": (request(v=1, op=["hello"]), "unknown_op"),
    "no-op": (request(v=1), "unknown_op"),
    "unknown-kernelspec": (lease_request(kernel_name="no-such-kernel"), "unknown_kernel"),
    "invalid-kernelspec-name": (lease_request(kernel_name="../../etc"), "unknown_kernel"),
    "kernel-name-int": (lease_request(kernel_name=5), "bad_request"),
    "env-string": (lease_request(env="PATH=/bin"), "bad_request"),
    "env-int-value": (lease_request(env={"A": 1}), "bad_request"),
    "cwd-int": (lease_request(cwd=3), "bad_request"),
    "cwd-missing": (lease_request(cwd="/no/such/dir"), "bad_request"),
    "cwd-a-file": (lease_request(cwd="/etc/hostname"), "bad_request"),
    "owner-string": (lease_request(owner_pid="1"), "bad_request"),
    "owner-bool": (lease_request(owner_pid=True), "bad_request"),
    "owner-negative": (lease_request(owner_pid=-1), "bad_request"),
    "owner-missing": (request(v=1, op="lease", kernel_name=NAME), "bad_request"),
    "owner-dead": (lambda: lease_request(owner_pid=dead_pid()), "bad_request"),
    "pool-string": (lease_request(pool="big"), "bad_request"),
    "pool-size-negative": (lease_request(pool={"size": -1}), "bad_request"),
    "pool-size-float": (lease_request(pool={"size": 1.5}), "bad_request"),
    "pool-size-huge": (lease_request(pool={"size": 10**6}), "bad_request"),
    "pool-max-zero": (lease_request(pool={"max_kernels": 0}), "bad_request"),
    "pool-warmup-int": (lease_request(pool={"warmup_code": 3}), "bad_request"),
    "python-relative": (lease_request(python="bin/python"), "bad_request"),
    "python-not-executable": (
        lambda: lease_request(python=os.path.abspath(__file__)),
        "bad_request",
    ),
    "python-not-a-python": (lease_request(python="/bin/true"), "worker_failed"),
    "warmup-fails": (lease_request(pool={"warmup_code": "1 / 0"}), "worker_failed"),
    "kernel-id-int": (lease_request(kernel_id=7), "bad_request"),
    "restart-lease-id-int": (request(v=1, op="restart", lease_id=1), "bad_request"),
    "restart-unknown-lease": (request(v=1, op="restart", lease_id="nope"), "unknown_lease"),
    "signal-signum-string": (
        request(v=1, op="signal", lease_id="nope", signum="SIGINT"),
        "bad_request",
    ),
    "interrupt-unknown-lease": (
        request(v=1, op="signal", lease_id="nope", signum=2),
        "unknown_lease",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_a_clear_error_and_the_daemon_stays_up(daemon: Daemon, case: str) -> None:
    data, code = BAD_INPUT[case]
    if callable(data):
        data = data()
    pid = daemon.call("hello")["pid"]
    reply = send_raw(daemon.setup.paths.socket, data)
    if code is None:
        assert reply is None or reply["code"] == "malformed", reply
    else:
        assert reply is not None, "the daemon closed the connection without a reply"
        assert reply["v"] == 1 and reply["ok"] is False, reply
        assert reply["code"] == code, reply
        assert isinstance(reply["error"], str) and len(reply["error"]) > 10, reply
    # still up, the same daemon, and nothing leaked
    assert daemon.call("hello")["pid"] == pid
    assert daemon.call("status")["leases"] == []


def test_idempotent_ops_on_unknown_leases(daemon: Daemon) -> None:
    assert daemon.call("release", lease_id="nope")["ok"] is True
    assert daemon.call("kill", lease_id="nope")["ended"] is True
    assert daemon.call("poll", lease_id="nope")["running"] is False
    assert daemon.call("signal", lease_id="nope", signum=0)["running"] is False


def test_a_silent_client_times_out_and_the_daemon_stays_up(daemon: Daemon) -> None:
    """A header, then nothing (connection left open): the daemon gives up on it
    after 10 s, and serves others meanwhile."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.settimeout(30)
        stuck.connect(os.fspath(daemon.setup.paths.socket))
        stuck.sendall(struct.pack(">I", 50))
        started = time.monotonic()
        assert daemon.call("hello")["ok"] is True  # not blocked by the stuck one
        received = b""
        while chunk := stuck.recv(65536):
            received += chunk
    assert time.monotonic() - started < 20
    assert json.loads(received[4:])["code"] == "malformed"


# -- other users ---------------------------------------------------------------


def run_as_nobody(daemon: Daemon) -> dict[str, Any]:
    """Ask the daemon for its status from a forked child running as
    ``nobody``; what the child saw."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no exceptions out of here
        code = 1
        try:
            os.close(read_end)
            os.chdir(daemon.setup.paths.socket.parent)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result: dict[str, Any] = {"uid": os.getuid()}
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(20)
                try:
                    # relative: only the socket's directory needs to be searchable
                    sock.connect(daemon.setup.paths.socket.name)
                except OSError as exc:
                    result["connect_error"] = exc.strerror
                else:
                    sock.sendall(request(v=1, op="status"))
                    sock.shutdown(socket.SHUT_WR)
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
                    result["reply"] = json.loads(data[4:])
            os.write(write_end, json.dumps(result).encode())
            code = 0
        except BaseException:
            import traceback

            os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data.decode(errors="replace")
    return json.loads(data)  # type: ignore[no-any-return]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_another_user_is_refused(daemon: Daemon) -> None:
    sock_path = daemon.setup.paths.socket
    directory = sock_path.parent
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    dir_mode = stat.S_IMODE(directory.stat().st_mode)
    pid = daemon.call("hello")["pid"]
    try:
        # Let the other user reach the socket (its directory is owner-only
        # too): the socket's own mode refuses it, at connect.
        os.chmod(directory, dir_mode | 0o011)
        result = run_as_nobody(daemon)
        assert result["uid"] == NOBODY
        assert result.get("connect_error") == "Permission denied", result
        # With the socket opened to everyone, the daemon's SO_PEERCRED check
        # refuses it.
        os.chmod(sock_path, 0o666)
        result = run_as_nobody(daemon)
        reply = result["reply"]
        assert reply["ok"] is False and reply["code"] == "forbidden", reply
        assert f"uid {NOBODY}" in reply["error"]
    finally:
        os.chmod(sock_path, 0o600)
        os.chmod(directory, dir_mode)
    assert daemon.call("hello")["pid"] == pid


# -- simultaneous and killed clients --------------------------------------------

_CLIENT = r"""
import json, sys
from jupyter_client import KernelManager

km = KernelManager(kernel_name=sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()  # go
km.start_kernel()
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=60)
out = []
kc.execute_interactive(
    "import os; print(os.getpid())",
    timeout=60,
    output_hook=lambda m: out.append(m["content"].get("text", "")),
)
info = km.get_connection_info()
print(json.dumps({
    "worker_pid": int("".join(out)),
    "key": info["key"].decode(),
    "ports": [info[c + "_port"] for c in ("shell", "iopub", "stdin", "control", "hb")],
    "lease_id": km.provisioner.lease_id,
    "warm": km.provisioner.warm,
}), flush=True)
sys.stdin.readline()  # done
kc.stop_channels()
km.shutdown_kernel()
"""


def start_clients(n: int) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLIENT, NAME],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return procs


def read_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"client {proc.pid} exited with {proc.wait()}"
    return json.loads(line)  # type: ignore[no-any-return]


def test_simultaneous_clients_in_processes_get_distinct_kernels(daemon: Daemon) -> None:
    procs = start_clients(4)
    try:
        daemon.setup.wait_idle(2)
        for proc in procs:  # go, all at once
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [read_result(proc) for proc in procs]
        assert len({r["worker_pid"] for r in results}) == 4
        assert len({r["key"] for r in results}) == 4
        assert len({r["lease_id"] for r in results}) == 4
        ports = [port for r in results for port in r["ports"]]
        assert len(set(ports)) == len(ports)
        assert sum(r["warm"] for r in results) >= 2  # the two warm ones were used
        leases = {lease["lease_id"]: lease for lease in daemon.call("status")["leases"]}
        for proc, result in zip(procs, results, strict=True):
            assert leases[result["lease_id"]]["owner_pid"] == proc.pid
            assert leases[result["lease_id"]]["worker_pid"] == result["worker_pid"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.write("done\n")
                proc.stdin.close()
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    assert_gone([r["worker_pid"] for r in results])
    assert daemon.call("status")["leases"] == []


def test_simultaneous_leases_on_the_socket_are_distinct(daemon: Daemon) -> None:
    n = 6
    barrier = threading.Barrier(n)
    replies: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def lease() -> None:
        try:
            barrier.wait(timeout=30)
            replies.append(daemon.lease())
        except BaseException as exc:
            errors.append(exc)

    daemon.setup.wait_idle(2)
    threads = [threading.Thread(target=lease) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert errors == [] and len(replies) == n
        for field in ("lease_id", "kernel_id", "worker_pid"):
            assert len({r[field] for r in replies}) == n, field
        assert len({r["connection_info"]["key"] for r in replies}) == n
        ports = [
            r["connection_info"][f"{c}_port"]
            for r in replies
            for c in ("shell", "iopub", "stdin", "control", "hb")
        ]
        assert len(set(ports)) == len(ports)
        assert sum(r["warm"] for r in replies) >= 2
        assert all(alive(r["worker_pid"]) for r in replies)
    finally:
        for reply in replies:
            daemon.call("release", lease_id=reply["lease_id"])
    assert_gone([r["worker_pid"] for r in replies])
    assert daemon.call("status")["leases"] == []


def test_a_killed_client_leaves_no_kernel(daemon: Daemon) -> None:
    (proc,) = start_clients(1)
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    result = read_result(proc)
    leases = {lease["lease_id"] for lease in daemon.call("status")["leases"]}
    assert result["lease_id"] in leases
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The reaper runs every 2 s.
    wait_until(
        lambda: (
            not alive(result["worker_pid"])
            and all(
                lease["lease_id"] != result["lease_id"] for lease in daemon.call("status")["leases"]
            )
        ),
        15,
        "the daemon to reap the killed client's kernel",
    )
    assert daemon.call("poll", lease_id=result["lease_id"])["running"] is False
    # its ports are closed: nothing answers on the shell port any more
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", result["ports"][0])) != 0


# -- fallback: no daemon to be had --------------------------------------------------


def cold_start(km: KernelManager, caplog: pytest.LogCaptureFixture, cwd: Path) -> None:
    """Start ``km`` (no daemon can be had), run a cell, shut it down: the
    kernel is a cold one and leaves no process."""
    km.log = logging.getLogger("test_pool_daemon.fallback")
    with caplog.at_level(logging.WARNING, logger=km.log.name):
        km.start_kernel(cwd=str(cwd))
    try:
        assert km.provisioner.lease_id is None and km.provisioner.warm is None
        kernel_pid = km.provisioner._fallback.pid
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        out: list[str] = []
        reply = kc.execute_interactive(
            "import os; print(os.getcwd())",
            timeout=60,
            output_hook=lambda m: out.append(
                m["content"]["text"] if m["content"].get("name") == "stdout" else ""
            ),
        )
        kc.stop_channels()
        assert reply["content"]["status"] == "ok" and "".join(out).strip() == str(cwd)
        processes = tree(kernel_pid)
        assert len(processes) >= 2, "a standalone kernel runs its worker as a child"
    finally:
        km.shutdown_kernel()
    assert_gone(processes)
    warnings = [
        r.getMessage() for r in caplog.records if "starting the kernel cold" in r.getMessage()
    ]
    assert warnings, caplog.text


def test_fallback_when_the_runtime_dir_is_unusable(
    daemon: Daemon,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    not_a_dir = tmp_path / "runtime-is-a-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(not_a_dir))
    km = KernelManager(kernel_name=NAME, connection_file=str(tmp_path / "kernel-fallback.json"))
    cold_start(km, caplog, tmp_path)
    assert processes_naming(str(not_a_dir)) == []


def test_fallback_when_the_daemon_cannot_start(
    daemon: Daemon,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon that exits at start (here: another process holds the lock but
    serves nothing)."""
    import fcntl

    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    config = Config()
    config.PoolProvisioner.daemon_start_timeout = 5.0
    with open(runtime / "pyrepl3-daemon.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.monotonic()
        cold_start(KernelManager(kernel_name=NAME, config=config), caplog, tmp_path)
        assert time.monotonic() - started < 30
    assert "another pyrepl3 daemon holds" in caplog.text
    assert processes_naming(str(runtime)) == []


# -- stop: last, it ends the module's daemon ----------------------------------------


def test_stop_leaves_no_process(daemon: Daemon) -> None:
    lease = daemon.lease()
    daemon.setup.wait_idle(2)
    pid = daemon.call("hello")["pid"]
    assert pid == daemon.proc.pid
    processes = tree(pid)
    assert lease["worker_pid"] in processes and len(processes) >= 4  # daemon, lease, 2 idle
    done = cli("stop", "--runtime-dir", str(daemon.setup.runtime_dir))
    assert f"stopped the pyrepl3 daemon (pid {pid})" in done.stdout
    assert daemon.proc.wait(timeout=30) == 0
    assert_gone(processes)
    assert not daemon.setup.paths.socket.exists()
    status = cli("status", "--runtime-dir", str(daemon.setup.runtime_dir), check=False)
    assert status.returncode == 3 and "no pyrepl3 daemon is running" in status.stdout
    with pytest.raises(ConnectionError):
        daemon.call("hello")
    with pytest.raises((ConnectionError, DaemonError)):
        daemon.call("release", lease_id=lease["lease_id"])
