"""One heartbeat thread for all the kernels of a process
(pyrepl3_kernel/gateway/heartbeat.py): each kernel keeps its own port and
answers its own pings, and stops answering when it is shut down while the
others still answer. And the sockets a hosting process binds in advance
(pyrepl3_kernel/gateway/ready_channels.py): taken by plain kernels, with the
ports they report, never by Curve kernels or kernels with chosen ports.

In this process (real ZMQ sockets), then with two kernels hosted by one
manager daemon and started through jupyter_client's ``KernelManager``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from jupyter_client import KernelManager
from pool_helpers import PoolSetup, pooled_kernelspec

from pyrepl3_kernel.gateway import ready_channels
from pyrepl3_kernel.gateway.channels import CHANNELS, KernelChannels
from pyrepl3_kernel.gateway.heartbeat import Heartbeat

NAME = "pyrepl3-shared-hb-test"
#: How long a ping waits for its echo before the port counts as silent.
ANSWER_WAIT = 5.0
#: How long a stopped heartbeat's port is pinged before it counts as silent.
SILENT_WAIT = 1.5


def ping(port: int, payload: bytes, wait: float = ANSWER_WAIT) -> bytes | None:
    """What ``127.0.0.1:port`` echoes to ``payload`` (a REQ socket, as
    jupyter_client's heartbeat channel), or None if nothing within ``wait``."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.REQ) as sock:
        sock.linger = 0
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(payload)
        if sock.poll(int(wait * 1000)):
            return sock.recv()
        return None


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pyrepl3-heartbeat"]


def test_heartbeats_of_one_process_share_a_thread_and_answer_on_their_own_ports() -> None:
    beats = [Heartbeat("tcp://127.0.0.1", 0) for _ in range(3)]
    try:
        for beat in beats:
            beat.start()
        assert len({beat.port for beat in beats}) == 3
        assert len(heartbeat_threads()) == 1
        for i, beat in enumerate(beats):
            payload = f"ping {i}".encode()
            assert ping(beat.port, payload) == payload
        beats[1].stop()
        assert ping(beats[1].port, b"after stop", SILENT_WAIT) is None
        for i in (0, 2):
            assert ping(beats[i].port, b"still") == b"still"
        # a stopped heartbeat's port is free again
        again = Heartbeat("tcp://127.0.0.1", beats[1].port)
        again.start()
        beats[1] = again
        assert ping(again.port, b"rebound") == b"rebound"
        assert len(heartbeat_threads()) == 1
    finally:
        for beat in beats:
            beat.stop()


def test_a_heartbeat_stopped_before_it_started_frees_its_port() -> None:
    import psutil

    beat = Heartbeat("tcp://127.0.0.1", 0)
    beat.stop()
    beat.stop()  # idempotent
    # Freed: this process no longer holds the port (another process of the
    # machine may take a freed port at any time, so a rebind alone would race).
    held = {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.laddr}
    assert beat.port not in held
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", beat.port))
    except OSError:  # taken meanwhile by someone else: not by us
        held = {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.laddr}
        assert beat.port not in held
    finally:
        probe.close()


def test_an_ipc_heartbeat_needs_a_port() -> None:
    with pytest.raises(ValueError, match="explicit port"):
        Heartbeat("ipc:///tmp/pyrepl3-hb-test", 0)


async def filled(ready: ready_channels.ReadyChannels, n: int) -> None:
    for _ in range(500):
        if len(ready) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} sets were not bound in advance ({len(ready)} were)")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


PORTS = (*CHANNELS, "hb")


def test_plain_kernels_take_sockets_bound_in_advance_and_report_their_ports() -> None:
    async def main() -> None:
        ready = ready_channels.keep_ready(2)
        kernels: list[KernelChannels] = []
        try:
            await filled(ready, 2)
            first = ready._sets[0].ports
            kernel = KernelChannels({"key": "k"}, "plain")
            kernels.append(kernel)
            kernel.bind()
            info = kernel.connection_info
            assert {c: info[f"{c}_port"] for c in PORTS} == first
            assert len(ready) == 1  # taken; refilled once the burst is over
            await filled(ready, 2)
            # the sockets it reports are its own: a request reaches it, a ping is echoed
            with zmq.Context.instance().socket(zmq.DEALER) as client:
                client.linger = 0
                client.connect(f"tcp://127.0.0.1:{info['shell_port']}")
                client.send_multipart([b"hello"])
                assert (await asyncio.wait_for(kernel.recv("shell"), 10))[-1] == b"hello"
            assert ping(info["hb_port"], b"beat") == b"beat"
            # Curve (options before bind) and chosen ports bind their own
            public, secret = zmq.curve_keypair()
            curve = KernelChannels(
                {"key": "k", "curve_publickey": public, "curve_secretkey": secret}, "curve"
            )
            chosen = KernelChannels({"key": "k", "shell_port": free_port()}, "chosen")
            kernels += [curve, chosen]
            unused = {port for ready_set in ready._sets for port in ready_set.ports.values()}
            for other in (curve, chosen):
                other.bind()
                assert not unused & {other.connection_info[f"{c}_port"] for c in PORTS}
            assert len(ready) == 2
        finally:
            unused = {port for ready_set in ready._sets for port in ready_set.ports.values()}
            ready_channels.close()
            for kernel in kernels:
                kernel.close()
        assert ready_channels.take("tcp", "127.0.0.1") is None
        # closing is asynchronous in libzmq: the ports are free shortly after
        for _ in range(500):
            if all(port_is_free(port) for port in unused):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the unused sets' ports were not freed")

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolSetup]:
    base: Path = tmp_path_factory.mktemp("shared-hb")
    with pooled_kernelspec(base, NAME, "--pool-size", "1") as setup:
        yield setup


def test_hosted_kernels_heartbeats_answer_until_their_own_shutdown(pool: PoolSetup) -> None:
    managers = [KernelManager(kernel_name=NAME) for _ in range(2)]
    try:
        for km in managers:
            km.start_kernel(cwd=str(pool.work))
        lease_ids = [km.provisioner.lease_id for km in managers]  # type: ignore[union-attr]
        assert all(lease_ids), "both kernels are hosted by the daemon"
        hosted = {lease["lease_id"] for lease in pool.status()["leases"]}
        assert set(lease_ids) <= hosted
        ports = [km.hb_port for km in managers]
        assert ports[0] != ports[1]
        for km in managers:
            kc = km.client()
            kc.start_channels()
            try:
                kc.wait_for_ready(timeout=60)
                assert kc.hb_channel.is_beating()
            finally:
                kc.stop_channels()
        for i, port in enumerate(ports):
            assert ping(port, f"kernel {i}".encode()) == f"kernel {i}".encode()
        managers[0].shutdown_kernel(now=False)
        assert ping(ports[0], b"gone?", SILENT_WAIT) is None
        assert ping(ports[1], b"here") == b"here"
    finally:
        for km in managers:
            if km.has_kernel:
                km.shutdown_kernel(now=True)
