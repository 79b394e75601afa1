"""PyREPL3 kernels on remote hosts (issue 16), on a real small cluster built
here (tests/cluster_helpers.py): two sshd "hosts" on 127.0.0.2 and
127.0.0.3, each in its own PID namespace with its own working and autosave
directories, moto's S3 server on 127.0.0.1 with IAM checks on, and a real
jupyter_server whose kernelspecs start PyREPL3 through gateway_provisioners'
DistributedProvisioner over SSH. The cluster tests are marked ``cluster``
(deselect with ``-m 'not cluster'``); the host-loss test runs last, since it
kills a host."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import BUCKET, Cluster, KernelSocket, missing_tools, text_of

from pyrepl3_kernel.cluster import kernelspecs
from pyrepl3_kernel.cluster.statestore import StateMirror, public_url

ROOT = Path(__file__).resolve().parent.parent

needs_provisioners = pytest.mark.skipif(
    importlib.util.find_spec("gateway_provisioners") is None,
    reason="gateway_provisioners is not installed (pip install -e '.[dev]')",
)

# -- without a cluster ------------------------------------------------------------------


@needs_provisioners
def test_kernelspecs_validate_against_the_provisioners_settings() -> None:
    ssh = kernelspecs.distributed_kernelspec(remote_hosts=["10.0.0.1", "10.0.0.2"])
    assert kernelspecs.validate(ssh) == []
    for kind in ("kubernetes", "docker"):
        assert kernelspecs.validate(kernelspecs.container_kernelspec(kind)) == []
    bad = kernelspecs.distributed_kernelspec(remote_hosts=["h"])
    bad["metadata"]["kernel_provisioner"]["config"] = {"remote_hosts": "h1", "remote_hostz": 1}
    problems = kernelspecs.validate(bad)
    assert any("remote_hosts" in p and "list" in p for p in problems), problems
    assert any("no setting 'remote_hostz'" in p for p in problems), problems
    bad = kernelspecs.container_kernelspec("kubernetes")
    bad["argv"].append("{no_such_placeholder}")
    assert any("no_such_placeholder" in p for p in kernelspecs.validate(bad))


def test_the_image_runs_the_launcher_the_ssh_kernelspec_runs() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    argv = kernelspecs.launch_argv("python")
    assert cmd[:3] == argv[:3] == ["python", "-m", "pyrepl3_kernel.cluster.launcher"]
    # The pod gets the placeholders' values as KERNEL_ID, RESPONSE_ADDRESS, ...
    assert "KERNEL_LANGUAGE=python" in text


@needs_provisioners
def test_the_image_command_speaks_the_protocol_to_gateway_provisioners() -> None:
    """The Kubernetes/Docker path as far as this machine allows: the
    Dockerfile's CMD, run with the environment a kernel pod gets, against
    gateway_provisioners' own ResponseManager; a cell, an interrupt and a
    shutdown through the comm port."""
    import subprocess
    import sys

    from cluster_helpers import free_port

    env = dict(GP_RESPONSE_IP="127.0.0.1", GP_RESPONSE_PORT=str(free_port("127.0.0.1")))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cluster_container_run.py")],
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cmd"] == kernelspecs.launch_argv()[1:3]
    assert {"comm_port", "pid", "pgid", "kernel_id", "key", "shell_port"} <= set(report["keys"])
    assert report["cell"] == ["ok", "42"]
    assert report["interrupt"] == "KeyboardInterrupt"
    assert report["exit"] == 0


def test_a_kernel_that_could_not_get_its_state_back_never_overwrites_it(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "auto.json").write_text('{"v": "the state to keep"}')
    store = str(tmp_path / "store")
    assert StateMirror(store, "k", str(saved)).sync()
    local = tmp_path / "local"
    late = StateMirror(store, "k", str(local))
    late.abandon_restore()  # the kernel gave up waiting for the download
    assert late.restore_into() is None and not local.exists()
    late.hold("the saved state could not be fetched within 1 s, and is left as it is")
    local.mkdir()
    (local / "auto.json").write_text('{"v": "a new, empty kernel"}')
    assert not late.sync()
    assert "left as it is" in (late.note() or "")
    assert "to keep" in (tmp_path / "store/k/autosave/auto.json").read_text()


def test_listener_survives_bad_requests() -> None:
    import socket as socketlib

    from pyrepl3_kernel.cluster.handshake import Listener

    got: list[int] = []
    listener = Listener("127.0.0.1", on_signal=got.append)
    listener.start()
    try:
        for raw in (
            b"not json",
            b"[1]",
            b'{"signum": "x"}',
            b'{"signum": 9999}',
            b'{"signum": 10}',
        ):
            with socketlib.create_connection(("127.0.0.1", listener.port), timeout=5) as s:
                s.sendall(raw)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [10]  # only the valid signal, and the listener still answers
        with socketlib.create_connection(("127.0.0.1", listener.port), timeout=5) as s:
            s.sendall(b'{"shutdown": 1}')
        deadline = time.monotonic() + 10
        while not listener._closed.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener._closed.is_set()
    finally:
        listener.close()


@needs_provisioners
def test_install_writes_a_provisioner_kernelspec_that_validates(tmp_path: Path) -> None:
    import subprocess
    import sys

    cli = [sys.executable, "-m", "pyrepl3_kernel.cli", "install", "--prefix", str(tmp_path)]
    done = subprocess.run(
        [*cli, "--provisioner", "ssh", "--remote-hosts", "h1", "h2", "--state-url", "s3://b/k"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/pyrepl3_ssh/kernel.json").read_text())
    assert kernelspecs.validate(spec) == []
    assert spec["metadata"]["kernel_provisioner"]["config"]["remote_hosts"] == ["h1", "h2"]
    assert spec["env"]["PYREPL3_STATE_URL"] == "s3://b/k"
    assert spec["argv"][1:3] == ["-m", "pyrepl3_kernel.cluster.launcher"]
    bad = subprocess.run(
        [*cli, "--provisioner", "ssh", "--image", "x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--image is for" in bad.stderr


def test_state_mirror_round_trip_and_failure_note(tmp_path: Path) -> None:
    local = tmp_path / "autosave"
    (local / "objects").mkdir(parents=True)
    (local / "objects" / "abc").write_bytes(b"x" * 1000)
    (local / "auto.json").write_text('{"names": {}}')
    (local / ".autosave.lock").write_text("")
    store = tmp_path / "store"
    mirror = StateMirror(str(store), "k1", str(local))
    assert mirror.sync() and mirror.failure is None and mirror.note() is None
    assert (store / "k1" / "autosave" / "objects" / "abc").read_bytes() == b"x" * 1000
    assert not (store / "k1" / "autosave" / ".autosave.lock").exists()
    other = StateMirror(str(store), "k1", str(tmp_path / "elsewhere"))
    resumed = other.restore_into()
    assert resumed is not None and resumed.files == 2
    assert (tmp_path / "elsewhere" / "auto.json").read_text() == '{"names": {}}'
    # A store that refuses writes (a file where its directory should be):
    # the cell's note says so, once.
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    bad = StateMirror(str(blocked), "k1", str(local))
    assert not bad.sync()
    assert bad.failure
    assert "NOT being saved" in (bad.note() or "")
    assert bad.note() is None  # said once, not on every cell
    assert StateMirror.from_env("k", str(local), env={}) is None


def test_a_kernel_taken_for_lost_never_overwrites_its_successor(tmp_path: Path) -> None:
    local = tmp_path / "a"
    (local / "objects").mkdir(parents=True)
    (local / "auto.json").write_text('{"v": 1}')
    store = str(tmp_path / "store")
    old = StateMirror(store, "k", str(local), host="hostA")
    assert old.check() and old.sync()
    new = StateMirror(store, "k", str(tmp_path / "b"), host="hostB")
    assert new.restore_into() is not None and new.check()
    (local / "auto.json").write_text('{"v": 2, "from": "the old host, back from the dead"}')
    assert not old.sync()
    assert "replaced by the one started on hostB" in (old.note() or "")
    assert "the old host" not in (tmp_path / "store/k/autosave/auto.json").read_text()
    assert json.loads((tmp_path / "store/k/kernel.json").read_text())["host"] == "hostB"
    assert public_url("s3://user:pw@bucket/x") == "s3://bucket/x"


# -- on the cluster ------------------------------------------------------------------------

cluster_mark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.close()


def store_files(cluster: Cluster, kernel_id: str) -> list[str]:
    fs = cluster.moto.fs()
    try:
        return list(fs.find(f"{BUCKET}/kernels/{kernel_id}"))
    except FileNotFoundError:
        return []


def wait_for(predicate, timeout: float = 60, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


def saved_manifest(cluster: Cluster, kernel_id: str) -> bool:
    return any(p.endswith(".json") and "/autosave/" in p for p in store_files(cluster, kernel_id))


@cluster_mark
def test_remote_kernel_runs_cells_on_its_host_and_saves_to_the_store(cluster: Cluster) -> None:
    kid = cluster.start_kernel()
    ks = KernelSocket(cluster, kid)
    try:
        host = cluster.kernel_host(kid)
        assert host in ("127.0.0.2", "127.0.0.3")
        reply, out = ks.execute("import os; x = 41; print(os.getcwd())")
        assert reply["status"] == "ok", out
        assert text_of(out).strip() == str(cluster.host(host).work)
        reply, out = ks.execute("x + 1")
        assert text_of(out).strip() == "42"
        wait_for(lambda: saved_manifest(cluster, kid), 30, "the state in the store")
        # Named checkpoints go to the store directly (PYREPL3_CHECKPOINT_DIR).
        reply, out = ks.execute("%checkpoint save first")
        assert reply["status"] == "ok", text_of(out)
        assert any(
            p.endswith("first.json") for p in cluster.moto.fs().find(f"{BUCKET}/checkpoints")
        )
        ks.execute("x = 0")
        reply, out = ks.execute("%checkpoint restore first\nprint(x)")
        assert reply["status"] == "ok" and text_of(out).strip().endswith("41"), text_of(out)
    finally:
        ks.close()
        cluster.api("DELETE", f"/api/kernels/{kid}")
    wait_for(lambda: not store_files(cluster, kid), 30, "a shut-down kernel's state removed")


@cluster_mark
def test_input_interrupt_restart_and_shutdown_on_a_remote_kernel(cluster: Cluster) -> None:
    kid = cluster.start_kernel()
    ks = KernelSocket(cluster, kid)
    try:
        reply, out = ks.execute("name = input('who? '); print('hi', name)", stdin="remote")
        assert reply["status"] == "ok" and "hi remote" in text_of(out)

        msg_id = ks.send(
            "execute_request",
            {"code": "import time; time.sleep(60)", "silent": False, "store_history": True},
        )
        time.sleep(1.0)
        cluster.api("POST", f"/api/kernels/{kid}/interrupt")
        reply = ks.reply(msg_id, timeout=30)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"

        wait_for(lambda: saved_manifest(cluster, kid), 30, "the state in the store")
        cluster.api("POST", f"/api/kernels/{kid}/restart")
        ks.connect()  # as JupyterLab does after a restart (the ports changed)
        reply, out = ks.execute("name")
        assert reply["status"] == "error" and reply["ename"] == "NameError", out
        assert "restored" not in text_of(out)
    finally:
        ks.close()
    cluster.api("DELETE", f"/api/kernels/{kid}")
    assert kid not in [k["id"] for k in cluster.api("GET", "/api/kernels")]
    wait_for(lambda: not store_files(cluster, kid), 30, "a shut-down kernel's state removed")


@cluster_mark
def test_store_refusing_writes_never_blocks_a_cell_and_says_so(cluster: Cluster) -> None:
    for spec, why in (
        ("pyrepl3_ssh_badcred", "signature|InvalidAccessKeyId|Forbidden|denied"),
        ("pyrepl3_ssh_nobucket", "NoSuchBucket|no-such-bucket|not exist|NotFound"),
    ):
        kid = cluster.start_kernel(spec)
        ks = KernelSocket(cluster, kid)
        try:
            reply, out = ks.execute("y = [1, 2, 3]; sum(y)", timeout=60)
            text = text_of(out)
            assert reply["status"] == "ok" and "6" in text, text
            assert "NOT being saved" in text, text
            assert re.search(why, text, re.I), text
            assert "not-the-secret" not in text
            reply, out = ks.execute("len(y)", timeout=60)
            assert reply["status"] == "ok" and "3" in text_of(out)
        finally:
            ks.close()
            cluster.api("DELETE", f"/api/kernels/{kid}")
    logs = cluster.all_logs()
    assert "not-the-secret" not in logs and cluster.moto.secret_key not in logs


@cluster_mark
def test_explicit_move_keeps_the_state(cluster: Cluster) -> None:
    kid = cluster.start_kernel()
    ks = KernelSocket(cluster, kid)
    try:
        src = cluster.kernel_host(kid)
        dst = "127.0.0.3" if src == "127.0.0.2" else "127.0.0.2"
        reply, _ = ks.execute("import numpy as np; a = np.arange(1000); s = 'moved'")
        assert reply["status"] == "ok"
        result = cluster.api("POST", f"/api/pyrepl3/kernels/{kid}/move", {"host": dst})
        assert result["from"] == src and result["to"] == dst, result
        assert cluster.kernel_host(kid) == dst
        ks.connect()
        reply, out = ks.execute("print(s, int(a.sum()), os.getcwd() if 'os' in dir() else '')")
        text = text_of(out)
        assert reply["status"] == "ok", text
        assert "moved here from" in text and src in text, text
        assert "moved 499500" in text, text
        with pytest.raises(Exception, match="409"):
            cluster.api("POST", f"/api/pyrepl3/kernels/{kid}/move", {"host": dst})
        # And back, with the CLI.
        import subprocess
        import sys

        done = subprocess.run(
            [sys.executable, "-m", "pyrepl3_kernel.cli", "move", kid, "--to", src,
             "--server", cluster.url, "--token", cluster.token],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"from {dst} to {src}" in done.stdout
        ks.connect()
        reply, out = ks.execute("s")
        assert reply["status"] == "ok" and "moved" in text_of(out)
        bad = subprocess.run(
            [sys.executable, "-m", "pyrepl3_kernel.cli", "move", kid, "--to", "10.9.9.9",
             "--server", cluster.url, "--token", cluster.token],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 1 and "not one of the provisioner's remote_hosts" in bad.stderr
    finally:
        ks.close()
        cluster.api("DELETE", f"/api/kernels/{kid}")


@cluster_mark
def test_host_loss_brings_the_kernel_back_elsewhere_with_its_state(cluster: Cluster) -> None:
    """Runs last: it kills a host for good."""
    kid = cluster.start_kernel()
    ks = KernelSocket(cluster, kid)
    try:
        lost = cluster.kernel_host(kid)
        assert lost is not None
        reply, _ = ks.execute("data = {'k': list(range(100))}; total = sum(data['k'])")
        assert reply["status"] == "ok"
        wait_for(lambda: saved_manifest(cluster, kid), 30, "the state in the store")
        running = ks.send(
            "execute_request",
            {"code": "import time; time.sleep(120)  # the long one", "silent": False},
        )
        time.sleep(2.0)  # the record names a cell that runs for more than 1 s
        cluster.host(lost).kill()  # sshd, the kernel and its worker; its disk too

        # jupyter_server's restarter notices and starts the kernel on another
        # host; the notebook's WebSocket is told "restarting".
        deadline = time.monotonic() + 90
        while True:
            msg = ks.recv(max(0.1, deadline - time.monotonic()))
            if msg.get("msg_type") == "status" and msg["content"].get("execution_state") in (
                "restarting",
                "dead",
            ):
                assert msg["content"]["execution_state"] == "restarting"
                break
            assert msg["parent_header"].get("msg_id") != running or msg["channel"] == "iopub"
        ks.connect()
        reply, out = ks.execute("total, data['k'][-1]")
        text = text_of(out)
        assert reply["status"] == "ok", text
        assert "(4950, 99)" in text, text
        assert "previous host" in text and lost in text, text
        assert "did not finish" in text and "time.sleep(120)" in text, text
        now = cluster.kernel_host(kid)
        assert now is not None and now != lost
        # The state came from the store: the lost host's directories are gone.
        assert not cluster.host(lost).runtime.exists()
    finally:
        ks.close()
        cluster.api("DELETE", f"/api/kernels/{kid}")
