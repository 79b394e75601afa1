"""Remote kernels (issue 16): host loss, state store overhead, move time.

Usage::

    .venv/bin/python benchmarks/bench_cluster.py [--quick] [--out DIR]

Runs on the same small cluster the tests build (tests/cluster_helpers.py):
two sshd "hosts" on 127.0.0.2 and 127.0.0.3, each in its own PID namespace,
moto's S3 server on 127.0.0.1 with IAM checks, and jupyter_server starting
PyREPL3 kernels on the hosts through gateway_provisioners'
DistributedProvisioner. Every kernel is driven over jupyter_server's
WebSocket, as a notebook is. Everything started is stopped at the end.

(a) ``1+1`` round trip (request to reply and result, on the kernel's own
    ZMQ ports, from the connection file jupyter_server wrote: the WebSocket
    adds 40 ms of Nagle/delayed-ACK noise that would hide what is measured):
    a kernel whose state goes to S3 against one whose state stays on its
    host's disk (the stated peer: the same kernel without the store), both
    running, measured alternately; the same for ``x = x + 1``, a cell that
    changes the state, so each one is saved and uploaded (off the cell's
    path). The ratio S3/local is the figure to read.
(b) host loss to the next cell answered with the state: a kernel with a
    small namespace, then one with a 200 MB array; once its state is in the
    store, its host is killed (sshd's PID namespace: the kernel and its
    worker die at once, the host's disk is removed), and the clock runs from
    the kill until a cell that reads the state is answered on the other
    host: jupyter_server's restarter noticing (it polls every 3 s: its
    default), the launch over SSH, the download of the state, the restore,
    and the notebook's WebSocket reconnecting when jupyter_server says
    "restarting" (as JupyterLab does).
    The killed host is revived for the next run. ipykernel has no peer
    figure here: its state is gone with its host.
(c) explicit move (``POST /api/pyrepl3/kernels/{id}/move``), small and
    200 MB: from the request to the first cell answered with the state on
    the other host.

Writes ``results/cluster.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cluster_helpers import BUCKET, Cluster, KernelSocket, missing_tools, text_of  # noqa: E402


def kernel_client(cluster: Cluster, kid: str) -> Any:
    """A client on the remote kernel's own ZMQ ports (the connection file
    jupyter_server wrote): the round trip without the WebSocket hop."""
    from jupyter_client import BlockingKernelClient

    path = cluster.root / "server-runtime" / f"kernel-{kid}.json"
    client = BlockingKernelClient(connection_file=str(path))
    client.load_connection_file()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return client


def round_trip(client: Any, code: str) -> float:
    start = time.perf_counter()
    msg_id = client.execute(code)
    reply = result = None
    while reply is None or (result is None and code == "1+1"):
        if reply is None:
            with_reply = client.get_shell_msg(timeout=30)
            if with_reply["parent_header"].get("msg_id") == msg_id:
                reply = with_reply
        if result is None and code == "1+1":
            msg = client.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_result":
                result = msg
    elapsed = time.perf_counter() - start
    while True:  # untimed: up to idle, so nothing spills into the next run
        msg = client.get_iopub_msg(timeout=30)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            break
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {reply['content']}")
    return elapsed


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_round_trips(cluster: Cluster, runs: int) -> dict[str, Any]:
    kernels = {
        "s3": cluster.start_kernel("pyrepl3_ssh"),
        "local": cluster.start_kernel("pyrepl3_ssh_local"),
    }
    clients = {name: kernel_client(cluster, kid) for name, kid in kernels.items()}
    try:
        for client in clients.values():
            round_trip(client, "x = 0")
        out: dict[str, Any] = {}
        for code in ("1+1", "x = x + 1"):
            times: dict[str, list[float]] = {name: [] for name in clients}
            for client in clients.values():  # warm-up
                for _ in range(10):
                    round_trip(client, code)
            for i in range(runs):
                order = list(clients) if i % 2 == 0 else list(reversed(clients))
                for name in order:
                    times[name].append(round_trip(clients[name], code))
            out[code] = {
                name: {
                    "p50_ms": statistics.median(t) * 1e3,
                    "p99_ms": pct(t, 0.99) * 1e3,
                    "runs": len(t),
                }
                for name, t in times.items()
            }
            out[code]["ratio_p50_s3_over_local"] = (
                out[code]["s3"]["p50_ms"] / out[code]["local"]["p50_ms"]
            )
        time.sleep(1.0)
        fs = cluster.moto.fs()
        out["s3_objects_after"] = len(fs.find(f"{BUCKET}/kernels/{kernels['s3']}"))
        return out
    finally:
        for name, client in clients.items():
            client.stop_channels()
            cluster.api("DELETE", f"/api/kernels/{kernels[name]}")


def wait_saved(cluster: Cluster, kid: str, marker: str, timeout: float = 300) -> None:
    """Until the store holds a state whose files include one written after
    ``marker`` was set (the kernel's last cell)."""
    fs = cluster.moto.fs()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            files = fs.find(f"{BUCKET}/kernels/{kid}/autosave")
        except FileNotFoundError:
            files = []
        for path in files:
            if path.endswith(".json") and "/objects/" not in path:
                try:
                    with fs.open(path, "rb") as f:
                        if marker.encode() in f.read():
                            return
                except FileNotFoundError:  # replaced since the listing
                    continue
        fs.invalidate_cache()
        time.sleep(0.2)
    raise TimeoutError("the state never reached the store")


SETUPS = {
    "small": "marker = 'M'; data = {'k': list(range(1000))}",
    "200MB": "import numpy as np; marker = 'M'; big = np.ones(25_000_000)",
}
CHECK = {"small": "len(data['k'])", "200MB": "float(big.sum())"}
EXPECT = {"small": "1000", "200MB": "25000000.0"}


def wait_restarting(ks: KernelSocket, deadline: float) -> None:
    """Until jupyter_server tells the notebook's WebSocket that the kernel
    is restarting (its restarter noticed the loss)."""
    while True:
        msg = ks.recv(max(0.1, deadline - time.monotonic()))
        if msg.get("msg_type") == "status" and msg["content"].get("execution_state") in (
            "restarting",
            "dead",
        ):
            if msg["content"]["execution_state"] == "dead":
                raise RuntimeError("jupyter_server gave the kernel up (dead)")
            return


def answered_with_state(ks: KernelSocket, size: str, deadline: float) -> str:
    """Reconnect (as JupyterLab does on 'restarting') and run the check
    cell until it answers; its output."""
    while time.monotonic() < deadline:
        try:
            ks.connect()
            reply, out = ks.execute(CHECK[size], timeout=120)
        except (TimeoutError, OSError):
            time.sleep(0.1)
            continue
        text = text_of(out)
        if reply["status"] == "ok" and EXPECT[size] in text:
            return text
        raise RuntimeError(f"state not back: {reply} {text}")
    raise TimeoutError("no answer with the state")


def bench_host_loss(cluster: Cluster, size: str) -> dict[str, Any]:
    kid = cluster.start_kernel("pyrepl3_ssh")
    ks = KernelSocket(cluster, kid)
    try:
        ks.execute(SETUPS[size], timeout=300)
        wait_saved(cluster, kid, "marker")
        lost = cluster.kernel_host(kid)
        assert lost is not None
        start = time.monotonic()
        cluster.host(lost).kill()
        wait_restarting(ks, start + 120)
        text = answered_with_state(ks, size, start + 300)
        elapsed = time.monotonic() - start
        now = cluster.kernel_host(kid)
        assert now != lost, (now, lost)
        return {"seconds": elapsed, "from": lost, "to": now, "note": text.splitlines()[0]}
    finally:
        ks.close()
        cluster.api("DELETE", f"/api/kernels/{kid}")
        for host in cluster.hosts:
            if host.proc is None or host.proc.poll() is not None:
                cluster.revive(host)


def bench_move(cluster: Cluster, size: str) -> dict[str, Any]:
    kid = cluster.start_kernel("pyrepl3_ssh")
    ks = KernelSocket(cluster, kid)
    try:
        ks.execute(SETUPS[size], timeout=300)
        src = cluster.kernel_host(kid)
        dst = "127.0.0.3" if src == "127.0.0.2" else "127.0.0.2"
        start = time.monotonic()
        result = cluster.api("POST", f"/api/pyrepl3/kernels/{kid}/move", {"host": dst}, 600)
        answered_with_state(ks, size, start + 300)
        return {
            "seconds": time.monotonic() - start,
            "server_move_seconds": result["seconds"],
            "old_kernel_stop_seconds": result["stop_seconds"],
            "from": result["from"],
            "to": result["to"],
        }
    finally:
        ks.close()
        cluster.api("DELETE", f"/api/kernels/{kid}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    reason = missing_tools()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 0
    runs = 60 if args.quick else 200
    root = Path(tempfile.mkdtemp(prefix="pyrepl3-bench-cluster-"))
    cluster = Cluster(root)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": runs,
    }
    try:
        cluster.start()
        results["round_trip"] = bench_round_trips(cluster, runs)
        sizes = ["small"] if args.quick else ["small", "200MB"]
        results["host_loss"] = {size: bench_host_loss(cluster, size) for size in sizes}
        results["move"] = {size: bench_move(cluster, size) for size in sizes}
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(results, indent=1))
    rt = results["round_trip"]
    print(f"{'metric':48} {'S3 store':>10} {'local':>10} {'ratio':>7}")
    for code in ("1+1", "x = x + 1"):
        r = rt[code]
        print(
            f"{code + ' round trip p50 (ms)':48} {r['s3']['p50_ms']:10.2f} "
            f"{r['local']['p50_ms']:10.2f} {r['ratio_p50_s3_over_local']:7.3f}"
        )
        print(
            f"{code + ' round trip p99 (ms)':48} {r['s3']['p99_ms']:10.2f} {r['local']['p99_ms']:10.2f}"
        )
    for size, r in results["host_loss"].items():
        print(f"{'host loss to next cell with state, ' + size + ' (s)':48} {r['seconds']:10.2f}")
    for size, r in results["move"].items():
        print(
            f"{'move to first cell with state, ' + size + ' (s)':48} {r['seconds']:10.2f}"
            f"   (old kernel saved+stopped {r['old_kernel_stop_seconds']:.2f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
