"""A small real cluster on this machine (issue 16): "hosts" that are sshd
instances, each in its own PID namespace (bubblewrap) on its own loopback
address, an S3 store (moto's server), and jupyter_server with
gateway_provisioners' DistributedProvisioner starting PyREPL3 kernels on the
hosts over SSH. Every process started here is stopped by :meth:`close`, and
every address is on loopback.

Killing a host (:meth:`SshHost.kill`) kills its sshd's PID namespace: the
kernels started through it die with it, as on a node that is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"
BWRAP = shutil.which("bwrap")
PYTHON = sys.executable
BUCKET = "pyrepl3-state"
ACCESS_KEY = "AKIAPYREPL3TEST00001"  # moto's IAM creates its own; these are replaced
SECRET_KEY = "pyrepl3-test-secret"


def missing_tools() -> str | None:
    if not os.path.exists(SSHD):
        return "openssh-server is not installed (scripts/setup.sh installs it)"
    if BWRAP is None:
        return "bubblewrap is not installed (scripts/setup.sh installs it)"
    if os.geteuid() != 0:
        return "the test sshd hosts need root (root login by key on loopback)"
    for mod in ("gateway_provisioners", "moto", "s3fs", "jupyter_server"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (pip install -e '.[dev]')"
    return None


def free_port(*ips: str) -> int:
    """A port free on every one of ``ips``."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        try:
            for ip in ips[1:]:
                with socket.socket() as s:
                    s.bind((ip, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


def wait_port(ip: str, port: int, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {ip}:{port} after {timeout} s")


def stop(
    proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 10
) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class SshHost:
    """One host: sshd on ``ip:port`` in its own PID namespace, with its own
    working and runtime (autosave) directories given to every session."""

    def __init__(self, root: Path, name: str, ip: str, port: int, env: dict[str, str]) -> None:
        self.root, self.name, self.ip, self.port = root / name, name, ip, port
        self.env = env
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def runtime(self) -> Path:
        return self.root / "runtime"

    def start(self, authorized_keys: Path) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.runtime.mkdir(parents=True, exist_ok=True)
        key = self.root / "host_key"
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        setenv = {
            "JUPYTER_RUNTIME_DIR": str(self.runtime),
            "PYREPL3_WORKING_DIR": str(self.work),
            **self.env,
        }
        config = self.root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.ip}:{self.port}",
                    f"HostKey {key}",
                    "PidFile none",
                    f"AuthorizedKeysFile {authorized_keys}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "LogLevel ERROR",
                    "SetEnv " + " ".join(f"{k}={v}" for k, v in setenv.items()),
                ]
            )
            + "\n"
        )
        assert BWRAP is not None
        argv = [
            BWRAP,
            "--bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/run",
            "--dir", "/run/sshd",
            "--unshare-pid",
            "--die-with-parent",
            SSHD, "-D", "-e", "-f", str(config),
        ]  # fmt: skip
        log = open(self.root / "sshd.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        wait_port(self.ip, self.port, self.proc)

    def known_hosts_line(self) -> str:
        pub = (self.root / "host_key.pub").read_text().split()
        return f"[{self.ip}]:{self.port} {pub[0]} {pub[1]}\n"

    def kill(self) -> None:
        """The host is lost: its sshd and every process started through it die
        at once (SIGKILL of its PID namespace), and its disk is gone."""
        stop(self.proc, signal.SIGKILL)
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.runtime, ignore_errors=True)


class MotoS3:
    """moto's S3 (and IAM) server on 127.0.0.1, in its own process. With
    ``auth``, requests are checked against moto's IAM: :attr:`access_key`
    is a user allowed everything, any other key is refused."""

    def __init__(self, root: Path, auth: bool = True) -> None:
        self.root = root
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = auth
        self.proc: subprocess.Popen[Any] | None = None
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY

    def start(self) -> None:
        env = dict(os.environ)
        # The set-up below makes 4 requests without credentials; every
        # request after them must be signed by a key moto's IAM knows.
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4" if self.auth else "inf"
        log = open(self.root / "moto.log", "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_port("127.0.0.1", self.port, self.proc)
        import boto3

        anon = {"aws_access_key_id": "x", "aws_secret_access_key": "x", "region_name": "us-east-1"}
        boto3.client("s3", endpoint_url=self.url, **anon).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", endpoint_url=self.url, **anon)
        iam.create_user(UserName="kernel")
        iam.put_user_policy(
            UserName="kernel",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="kernel")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def env(self, secret: str | None = None) -> dict[str, str]:
        """Credentials and endpoint, as a host's environment gives them."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            client_kwargs={"endpoint_url": self.url, "region_name": "us-east-1"},
            skip_instance_cache=True,
        )

    def close(self) -> None:
        stop(self.proc)


class Cluster:
    """Hosts, the store and a jupyter_server whose kernelspecs launch PyREPL3
    kernels on the hosts through DistributedProvisioner."""

    def __init__(self, root: Path, hosts: int = 2, auth: bool = True) -> None:
        self.root = root
        self.token = uuid.uuid4().hex
        self.moto = MotoS3(root, auth=auth)
        ips = [f"127.0.0.{2 + i}" for i in range(hosts)]
        self.ssh_port = free_port(*ips)
        self.hosts: list[SshHost] = []
        self._ips = ips
        self.server: subprocess.Popen[Any] | None = None
        self.port = free_port("127.0.0.1")
        self.home = root / "server-home"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def host(self, ip: str) -> SshHost:
        return next(h for h in self.hosts if h.ip == ip)

    def start(self) -> None:
        self.moto.start()
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True)
        key = ssh_dir / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        authorized = self.root / "authorized_keys"
        shutil.copy(f"{key}.pub", authorized)
        for i, ip in enumerate(self._ips):
            host = SshHost(self.root, f"host{'ABC'[i]}", ip, self.ssh_port, self.moto.env())
            host.start(authorized)
            self.hosts.append(host)
        (ssh_dir / "known_hosts").write_text("".join(h.known_hosts_line() for h in self.hosts))
        self.install_kernelspecs()
        self.start_server()

    def revive(self, host: SshHost) -> None:
        """A lost host comes back (empty disk, same address and key)."""
        host.start(self.root / "authorized_keys")

    def kernelspec(self, name: str, env: dict[str, str]) -> None:
        from pyrepl3_kernel.cluster.kernelspecs import distributed_kernelspec

        spec = distributed_kernelspec(
            python=PYTHON, remote_hosts=[h.ip for h in self.hosts], env=env, display_name=name
        )
        d = self.root / "share" / "kernels" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "kernel.json").write_text(json.dumps(spec, indent=1))

    def install_kernelspecs(self) -> None:
        state = f"s3://{BUCKET}/kernels"
        self.kernelspec(
            "pyrepl3_ssh",
            {"PYREPL3_STATE_URL": state, "PYREPL3_CHECKPOINT_DIR": f"s3://{BUCKET}/checkpoints"},
        )
        self.kernelspec(
            "pyrepl3_ssh_badcred",
            {"PYREPL3_STATE_URL": state, "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        )
        self.kernelspec("pyrepl3_ssh_nobucket", {"PYREPL3_STATE_URL": "s3://no-such-bucket/k"})
        self.kernelspec("pyrepl3_ssh_local", {})  # autosave on the host's disk only

    def start_server(self) -> None:
        env = dict(os.environ)
        env.update(
            HOME=str(self.home),
            JUPYTER_PATH=str(self.root / "share"),
            JUPYTER_DATA_DIR=str(self.root / "server-data"),
            JUPYTER_RUNTIME_DIR=str(self.root / "server-runtime"),
            JUPYTER_CONFIG_DIR=str(self.root / "server-config"),
            GP_SSH_PORT=str(self.ssh_port),
            GP_RESPONSE_IP="127.0.0.1",
            GP_RESPONSE_PORT=str(free_port("127.0.0.1")),
            GP_REMOTE_USER="root",
            GP_UNAUTHORIZED_USERS="nobody",
            GP_KERNEL_LOG_DIR=str(self.root / "kernel-logs"),
            KERNEL_LAUNCH_TIMEOUT="60",
        )
        (self.root / "kernel-logs").mkdir(exist_ok=True)
        log = open(self.root / "server.log", "ab")
        self.server = subprocess.Popen(
            [
                PYTHON, "-m", "jupyter_server",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                "--ServerApp.open_browser=False",
                "--ServerApp.allow_root=True",
                f"--ServerApp.root_dir={self.root}",
                "--KernelSpecManager.ensure_native_kernel=False",
                "--KernelSpecManager.allowed_kernelspecs=pyrepl3_ssh,pyrepl3_ssh_badcred,pyrepl3_ssh_nobucket,pyrepl3_ssh_local",
            ],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )  # fmt: skip
        wait_port("127.0.0.1", self.port, self.server, timeout=60)

    # -- REST ------------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def start_kernel(self, name: str = "pyrepl3_ssh", env: dict[str, str] | None = None) -> str:
        body: dict[str, Any] = {"name": name}
        if env:
            body["env"] = env
        return str(self.api("POST", "/api/kernels", body)["id"])

    def kernel_host(self, kernel_id: str) -> str | None:
        """The host a kernel runs on, as its launch log says."""
        text = self.server_log()
        marker = f"Kernel ID: {kernel_id}"
        for line in reversed(text.splitlines()):
            if marker in line and "Host: '" in line:
                return line.split("Host: '", 1)[1].split("'", 1)[0]
        return None

    def server_log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")

    def all_logs(self) -> str:
        """The server's, the kernels' and the hosts' logs, as one text."""
        paths = [self.root / "server.log", *sorted((self.root / "kernel-logs").glob("*"))]
        paths += [h.root / "sshd.log" for h in self.hosts]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            with contextlib.suppress(Exception):
                for k in self.api("GET", "/api/kernels", timeout=10):
                    with contextlib.suppress(Exception):
                        self.api("DELETE", f"/api/kernels/{k['id']}", timeout=60)
        stop(self.server)
        for host in self.hosts:
            stop(host.proc, signal.SIGKILL)
        self.moto.close()


class KernelSocket:
    """A notebook's connection to one kernel: jupyter_server's WebSocket,
    legacy JSON frames, as JupyterLab uses it."""

    def __init__(self, cluster: Cluster, kernel_id: str) -> None:
        self.cluster, self.kernel_id = cluster, kernel_id
        self.session = uuid.uuid4().hex
        self.ws: Any = None
        self.connect()

    def connect(self) -> None:
        from websockets.sync.client import connect

        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close()
        url = (
            self.cluster.url.replace("http", "ws")
            + f"/api/kernels/{self.kernel_id}/channels?session_id={self.session}"
        )
        self.ws = connect(
            url, additional_headers={"Authorization": f"token {self.cluster.token}"},
            max_size=None, open_timeout=60,
        ).__enter__()  # fmt: skip
        # As a notebook does: kernel_info until it answers.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg_id = self.send("kernel_info_request", {})
            try:
                self.reply(msg_id, timeout=3)
                return
            except TimeoutError:
                continue
        raise TimeoutError("no kernel_info_reply")

    def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> str:
        msg_id = uuid.uuid4().hex
        self.ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": msg_type,
                        "session": self.session,
                        "username": "test",
                        "version": "5.4",
                        "date": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": content,
                    "channel": channel,
                    "buffers": [],
                }
            )
        )
        return msg_id

    def recv(self, timeout: float) -> dict[str, Any]:
        try:
            raw = self.ws.recv(timeout=timeout)
        except TimeoutError:
            raise TimeoutError("no message from the kernel") from None
        return dict(json.loads(raw))

    def reply(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {msg_id}")
            msg = self.recv(left)
            if msg.get("channel") == "shell" and msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def execute(
        self, code: str, timeout: float = 120, stdin: str | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run a cell; (its execute_reply content, its iopub messages up to idle)."""
        msg_id = self.send(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "allow_stdin": stdin is not None,
            },
        )
        outputs: list[dict[str, Any]] = []
        reply = None
        idle = False
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"cell {code!r} did not finish: {outputs}")
            msg = self.recv(left)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["channel"] == "stdin" and msg["msg_type"] == "input_request":
                self.send("input_reply", {"value": stdin or ""}, channel="stdin")
            elif msg["channel"] == "shell":
                reply = msg["content"]
            elif msg["channel"] == "iopub":
                if msg["msg_type"] == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                else:
                    outputs.append(msg)
        return reply, outputs

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


def text_of(outputs: list[dict[str, Any]]) -> str:
    parts = []
    for m in outputs:
        c = m["content"]
        if m["msg_type"] == "stream":
            parts.append(c["text"])
        elif m["msg_type"] in ("execute_result", "display_data"):
            parts.append(c["data"].get("text/plain", "") + "\n")
        elif m["msg_type"] == "error":
            parts.append(f"{c['ename']}: {c['evalue']}\n")
    return "".join(parts)
