"""The fork server (docs/daemon.md, "The fork server") against ipykernel,
side by side in one run.

Usage::

    .venv/bin/python benchmarks/bench_fork.py [--quick] [--out DIR]

Measures, with kernelspecs installed into a temporary prefix and a manager
daemon of its own (temporary ``JUPYTER_RUNTIME_DIR``, stopped at the end):

(a) bursts: N kernels started at once through ``AsyncKernelManager`` (N = 20
    and 100) until every one has answered ``kernel_info`` and ``1+1``:
    pyrepl3 (pooled kernelspec; the daemon running, its pool of 2 ready) vs
    ipykernel started the same way; and PSS per kernel, pyrepl3's counting
    the daemon, its fork server and the refilled pool;
(b) the argv path: ``start_kernel()`` to the first ``1+1`` result with a
    kernelspec that has no provisioner (what VS Code runs; the daemon
    already running) vs ipykernel; the pooled launch (provisioner) beside it;
(c) ``pyrepl3-kernel gateway``: its first kernel (POST /api/kernels, the
    WebSocket, ``1+1``) right after the server answers, against its fifth,
    and against the first kernel of a stock jupyter_server with ipykernel.

Beside each burst, its floor: the same N ``AsyncKernelManager`` starts and
``kernel_info``/``1+1`` on kernels that are already running (leased before
the clock starts, handed over by a provisioner that does nothing): what
jupyter_client costs in this process, and the kernels' answers, with no
kernel start at all. ``--bursts-only --runs 3`` repeats the bursts alone.

Writes ``results/fork.json`` and prints a table; ratios are
pyrepl3/ipykernel (below 1: pyrepl3 faster or smaller).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_pool import (
    IPYKERNEL,
    POOLED,
    BenchError,
    _ready,
    alternate,
    daemon,
    isolated_env,
    pss_of,
    ratio,
    start_once,
    stop_daemon,
    summary,
    tree,
    wait_idle,
)
from jupyter_client import AsyncKernelManager, KernelManager
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

ARGV = "pyrepl3-bench-argv"
FULL = {"bursts": [20, 100], "starts": 10, "gateway_kernels": 5}
QUICK = {"bursts": [10, 30], "starts": 4, "gateway_kernels": 3}


def install_argv_spec(runtime: Path) -> None:
    """A kernelspec with only an argv, beside the ones bench_pool installs."""
    prefix = Path(os.environ["JUPYTER_PATH"].split(os.pathsep)[0])
    spec_dir = prefix / "kernels" / ARGV
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "pyrepl3_kernel", "-f", "{connection_file}"],
        "display_name": "argv only",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def warm_daemon(runtime: Path) -> None:
    """A fresh daemon, started by a launch as usual, its pool of 2 ready."""
    stop_daemon(runtime)
    km = KernelManager(kernel_name=POOLED)
    km.start_kernel()
    km.shutdown_kernel(now=True)
    wait_idle(runtime, POOLED, 2)


async def burst(kernel_name: str, n: int, runtime: Path | None) -> dict[str, Any]:
    managers = [AsyncKernelManager(kernel_name=kernel_name) for _ in range(n)]

    async def one(km: AsyncKernelManager, t0: float) -> float:
        await km.start_kernel(stderr=asyncio.subprocess.DEVNULL)
        return await _ready(km.get_connection_info(), t0)

    try:
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(km, t0) for km in managers), return_exceptions=True)
        await asyncio.sleep(1.0)  # settle
        if runtime is not None:
            client = daemon(runtime)
            pids = tree(client.call("hello")["pid"])
            forks = client.call("status")["fork_servers"]
        else:
            pids = [
                pid
                for km, o in zip(managers, outcomes, strict=True)
                if isinstance(o, float) and km.provisioner is not None
                for pid in tree(km.provisioner.pid)
            ]
            forks = None
        memory = pss_of(pids)
    finally:
        await asyncio.gather(
            *(km.shutdown_kernel(now=True) for km in managers if km.has_kernel),
            return_exceptions=True,
        )
    ready = [o for o in outcomes if isinstance(o, float)]
    failures = [repr(o) for o in outcomes if not isinstance(o, float)]
    return {
        "kernels": n,
        "ready": len(ready),
        "failures": failures[:5],
        "all_ready_s": max(ready) if ready else float("nan"),
        "memory": memory,
        "pss_per_kernel_mib": memory["pss_mib"] / len(ready) if ready else float("nan"),
        "fork_servers": forks,
    }


class RunningKernel(KernelProvisionerBase):  # type: ignore[misc]
    """A provisioner whose kernel is already running: ``launch_kernel``
    hands over the connection info it was given; nothing else is done."""

    given: dict[str, Any] = {}

    @property
    def has_process(self) -> bool:
        return True

    async def poll(self) -> int | None:
        return None

    async def wait(self) -> int | None:
        return None

    async def send_signal(self, signum: int) -> None:
        pass

    async def kill(self, restart: bool = False) -> None:
        pass

    async def terminate(self, restart: bool = False) -> None:
        pass

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        kwargs["cmd"] = []
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        info = dict(self.given)
        info["key"] = info["key"].encode()
        self.connection_info = info
        return info

    async def cleanup(self, restart: bool = False) -> None:
        pass


async def floor(n: int, runtime: Path) -> dict[str, Any]:
    """``n`` AsyncKernelManager starts at once, each handed a kernel that
    was leased (so running, its worker ready) before the clock started,
    until every one answered kernel_info and 1+1."""
    client = daemon(runtime)
    loop = asyncio.get_running_loop()
    request = {
        "kernel_name": POOLED,
        "python": sys.executable,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "owner_pid": os.getpid(),
        "pool": {"size": 2},
    }
    leases = await asyncio.gather(
        *(loop.run_in_executor(None, lambda: client.call("lease", **request)) for _ in range(n))
    )
    managers = []
    for lease in leases:
        km = AsyncKernelManager(kernel_name=POOLED)
        km.provisioner = RunningKernel(
            kernel_id=lease["kernel_id"], kernel_spec=km.kernel_spec, parent=km
        )
        km.provisioner.given = lease["connection_info"]
        km.kernel_id = lease["kernel_id"]
        managers.append(km)

    async def one(km: AsyncKernelManager, t0: float) -> float:
        await km.start_kernel()
        return await _ready(km.get_connection_info(), t0)

    try:
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(km, t0) for km in managers), return_exceptions=True)
    finally:
        for km in managers:
            await km.cleanup_resources()
        await asyncio.gather(
            *(
                loop.run_in_executor(
                    None, lambda r=r: client.call("release", lease_id=r["lease_id"])
                )
                for r in leases
            ),
            return_exceptions=True,
        )
    ready = [o for o in outcomes if isinstance(o, float)]
    return {
        "kernels": n,
        "ready": len(ready),
        "failures": [repr(o) for o in outcomes if not isinstance(o, float)][:5],
        "all_ready_s": max(ready) if ready else float("nan"),
    }


def bench_bursts(sizes: list[int], runtime: Path, runs: int = 1) -> dict[str, Any]:
    """Each size ``runs`` times: pyrepl3, ipykernel and the floor, in turn
    (the first run's figures at the top level, every run's in ``runs``)."""
    out: dict[str, Any] = {}
    for n in sizes:
        every = []
        for run in range(runs):
            warm_daemon(runtime)
            print(f"  {n} pyrepl3 kernels at once (run {run + 1})", file=sys.stderr)
            p3 = asyncio.run(burst(POOLED, n, runtime))
            print(f"  {n} ipykernels at once", file=sys.stderr)
            ipk = asyncio.run(burst(IPYKERNEL, n, None))
            print(f"  {n} kernels already running (the floor)", file=sys.stderr)
            warm_daemon(runtime)
            low = asyncio.run(floor(n, runtime))
            every.append({"pyrepl3": p3, "ipykernel": ipk, "floor": low})
        out[str(n)] = {**every[0], "runs": every}
    return out


def bench_argv(runs: int, runtime: Path) -> dict[str, Any]:
    stop_daemon(runtime)
    first = start_once(ARGV, "1+1", runtime, wait_warm=False)  # starts the daemon too
    names = [ARGV, POOLED, IPYKERNEL]
    for name in names:  # untimed: page cache, the pools
        start_once(name, "1+1", runtime, wait_warm=False)
    raw: dict[str, list[float]] = {name: [] for name in names}
    for order in alternate(names, runs):
        for name in order:
            if name == POOLED:
                wait_idle(runtime, POOLED)
            raw[name].append(start_once(name, "1+1", runtime, wait_warm=False)["first_cell_ms"])
    return {
        "no_daemon_running_first_cell_ms": first["first_cell_ms"],
        **{name: summary(samples) for name, samples in raw.items()},
    }


def bench_gateway(kernels: int) -> dict[str, Any]:
    from bench_rest import WS, make_servers, setup

    def start_to_result(server: Any, name: str) -> float:
        start = time.perf_counter()
        kernel_id = server.start_kernel(name)
        ws = WS(server, kernel_id)
        try:
            ws.execute(timeout=60)
            return (time.perf_counter() - start) * 1000
        finally:
            ws.close()
            server.delete_kernel(kernel_id)

    with (
        tempfile.TemporaryDirectory(prefix="pyrepl3-bench-gw-") as tmp,
        setup(Path(tmp)) as (
            env,
            servers,
        ),
    ):
        made = make_servers(Path(tmp), env, servers)
        gateway, stock = made["pyrepl3-gateway"], made["jupyter-server"]
        # The stock server's kernel is ipykernel ("python3"); its first one too.
        p3 = [start_to_result(gateway, "pyrepl3") for _ in range(kernels)]
        ipk = [start_to_result(stock, "python3") for _ in range(kernels)]
    return {"pyrepl3_ms": p3, "ipykernel_ms": ipk}


def report(results: dict[str, Any]) -> list[str]:
    lines = [f"{'metric':<62} {'pyrepl3':>9} {'ipykernel':>10} {'ratio':>7}"]

    def row(label: str, a: float, b: float, unit: str) -> None:
        lines.append(f"{label:<62} {a:>8.1f}{unit} {b:>9.1f}{unit} {ratio(a, b):>7.3f}")

    for n, d in results["bursts"].items():
        p3, ipk = d["pyrepl3"], d["ipykernel"]
        for i, r in enumerate(d.get("runs") or [d]):
            row(
                f"(a) {n} kernels at once, all answered 1+1 (s)"
                + (f", run {i + 1}" if len(d.get("runs") or []) > 1 else ""),
                r["pyrepl3"]["all_ready_s"],
                r["ipykernel"]["all_ready_s"],
                "s",
            )
            if "floor" in r:
                row(
                    f"    floor: {n} kernels already running (jupyter_client only)",
                    r["floor"]["all_ready_s"],
                    r["ipykernel"]["all_ready_s"],
                    "s",
                )
        row(
            f"(a) {n} kernels at once, PSS per kernel (MiB)",
            p3["pss_per_kernel_mib"],
            ipk["pss_per_kernel_mib"],
            "M",
        )
        if p3["failures"] or ipk["failures"]:
            lines.append(f"    failures: {p3['failures']} / {ipk['failures']}")
    if "argv" not in results:
        return lines
    a = results["argv"]
    row(
        "(b) argv path: start_kernel() to first 1+1 result (ms, median)",
        a[ARGV]["median"],
        a[IPYKERNEL]["median"],
        " ",
    )
    row(
        "(b) pooled (provisioner): start_kernel() to first 1+1 (ms)",
        a[POOLED]["median"],
        a[IPYKERNEL]["median"],
        " ",
    )
    lines.append(
        f"    argv path, no daemon running yet (starts it): {a['no_daemon_running_first_cell_ms']:.0f} ms"
    )
    g = results["gateway"]
    row(
        "(c) gateway: first kernel POST to 1+1 result (ms)",
        g["pyrepl3_ms"][0],
        g["ipykernel_ms"][0],
        " ",
    )
    row(
        "(c) gateway: last kernel POST to 1+1 result (ms)",
        g["pyrepl3_ms"][-1],
        g["ipykernel_ms"][-1],
        " ",
    )
    lines.append(
        f"    pyrepl3 first/last kernel: {ratio(g['pyrepl3_ms'][0], g['pyrepl3_ms'][-1]):.2f}"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller bursts, fewer runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--bursts-only", action="store_true", help="only (a), the bursts (and their floors)"
    )
    parser.add_argument("--runs", type=int, default=1, help="runs of each burst (default 1)")
    args = parser.parse_args()
    params = dict(QUICK if args.quick else FULL, burst_runs=args.runs)
    results: dict[str, Any] = {
        "params": params,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    t0 = time.perf_counter()
    with isolated_env() as runtime:
        install_argv_spec(runtime)
        if not args.bursts_only:
            print("(b) argv path and pooled launches", file=sys.stderr)
            results["argv"] = bench_argv(params["starts"], runtime)
        print("(a) bursts", file=sys.stderr)
        results["bursts"] = bench_bursts(params["bursts"], runtime, args.runs)
    if not args.bursts_only:
        print("(c) gateway", file=sys.stderr)
        results["gateway"] = bench_gateway(params["gateway_kernels"])
    results["wall_s"] = time.perf_counter() - t0
    lines = report(results)
    results["table"] = lines
    args.out.mkdir(parents=True, exist_ok=True)
    name = "fork-quick" if args.quick else "fork"
    (args.out / (name + ("-bursts.json" if args.bursts_only else ".json"))).write_text(
        json.dumps(results, indent=2)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
