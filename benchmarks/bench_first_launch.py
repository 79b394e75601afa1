"""The first launch (docs/daemon.md, "The first launch"): the argv path with
no daemon running, and the first kernels of ``pyrepl3-kernel gateway``,
against ipykernel started the same way, side by side in one run.

Usage::

    .venv/bin/python benchmarks/bench_first_launch.py [--runs N] [--out DIR]

With kernelspecs installed into a temporary prefix and a runtime directory
(so a manager daemon) of its own:

(a) the argv path (a kernelspec with no provisioner: what VS Code runs),
    ``start_kernel()`` to the first ``1+1`` result, with no daemon running
    (each run stops the daemon first), then the second launch right after
    it, a third once the daemon the first one started in the background
    has its fork server ready, and a fourth half a second after (the pool
    the third made refilled); against the same argv with
    ``PYREPL3_HANDOFF=0`` (the standalone start) and ipykernel, each started
    the same way in the same turn;
(b) ``pyrepl3-kernel gateway``, started fresh for each run (a runtime
    directory of its own, so a daemon too), its first kernel asked for as
    soon as the server answers: POST ``/api/kernels``, the WebSocket,
    ``1+1``, for each of its first ``--kernels`` kernels, with the phases
    (POST, WebSocket open, execute) apart; against a stock jupyter_server
    with ipykernel started the same way.

Ratios are pyrepl3/ipykernel (below 1: pyrepl3 faster). Writes
``results/first_launch.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_pool import (
    IPYKERNEL,
    BenchError,
    daemon,
    isolated_env,
    ratio,
    start_once,
    stop_daemon,
)

from pyrepl3_kernel.processes import alive

ARGV = "pyrepl3-bench-argv"
STANDALONE = "pyrepl3-bench-argv-standalone"


def install_argv_specs() -> None:
    """Two kernelspecs with only an argv: handed to the daemon, and standalone."""
    prefix = Path(os.environ["JUPYTER_PATH"].split(os.pathsep)[0])
    for name, env in ((ARGV, {}), (STANDALONE, {"PYREPL3_HANDOFF": "0"})):
        spec_dir = prefix / "kernels" / name
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": [sys.executable, "-m", "pyrepl3_kernel", "-f", "{connection_file}"],
            "display_name": name,
            "language": "python",
            "env": env,
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))


def no_daemon(runtime: Path) -> None:
    """Stop the daemon (and wait until its fork servers are gone too)."""
    pids: list[int] = []
    try:
        status = daemon(runtime).call("status", timeout=10)
        pids = [status["daemon"]["pid"], *(f["pid"] for f in status["fork_servers"] if f["pid"])]
    except Exception:
        pass
    stop_daemon(runtime)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise BenchError(f"the daemon's processes {pids} did not exit")
        time.sleep(0.05)


def wait_fork_server(runtime: Path, timeout: float = 60.0) -> float:
    """Seconds until the daemon answers with a ready fork server."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            servers = daemon(runtime).call("status", timeout=10)["fork_servers"]
        except Exception:
            servers = []
        if any(f["state"] == "ready" for f in servers):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise BenchError("no daemon with a ready fork server")


def daemon_state(runtime: Path) -> dict[str, Any]:
    try:
        status = daemon(runtime).call("status", timeout=10)
    except Exception as exc:
        return {"error": str(exc)}
    return {
        "leases_served": status["daemon"]["leases_served"],
        "fork_servers": [f["state"] for f in status["fork_servers"]],
    }


def bench_argv(runs: int, runtime: Path) -> dict[str, Any]:
    for name in (ARGV, STANDALONE, IPYKERNEL):  # untimed: page cache, .pyc files
        start_once(name, "1+1", runtime, wait_warm=False)
    rows: dict[str, list[float]] = {
        "first": [],
        "second": [],
        "later": [],
        "next": [],
        "first_kernel_info": [],
        STANDALONE: [],
        IPYKERNEL: [],
    }
    states = []
    for turn in range(runs):
        order = [STANDALONE, IPYKERNEL] if turn % 2 == 0 else [IPYKERNEL, STANDALONE]
        no_daemon(runtime)
        rows[order[0]].append(
            start_once(order[0], "1+1", runtime, wait_warm=False)["first_cell_ms"]
        )
        first = start_once(ARGV, "1+1", runtime, wait_warm=False)
        rows["first"].append(first["first_cell_ms"])
        rows["first_kernel_info"].append(first["kernel_info_ms"])
        rows["second"].append(start_once(ARGV, "1+1", runtime, wait_warm=False)["first_cell_ms"])
        states.append(
            {**daemon_state(runtime), "fork_server_ready_after_s": wait_fork_server(runtime)}
        )
        rows["later"].append(start_once(ARGV, "1+1", runtime, wait_warm=False)["first_cell_ms"])
        time.sleep(0.5)  # its pool refilled
        rows["next"].append(start_once(ARGV, "1+1", runtime, wait_warm=False)["first_cell_ms"])
        rows[order[1]].append(
            start_once(order[1], "1+1", runtime, wait_warm=False)["first_cell_ms"]
        )
        print(
            f"  turn {turn + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rows.items()),
            file=sys.stderr,
        )
    no_daemon(runtime)
    return {"samples_ms": rows, "daemon_after_second": states}


def bench_gateway(runs: int, kernels: int) -> dict[str, Any]:
    from bench_rest import AS_ROOT, BIN, WS, Server, free_port, setup

    def phases(server: Any, name: str) -> dict[str, float]:
        t0 = time.perf_counter()
        kernel_id = server.start_kernel(name)
        t_post = time.perf_counter()
        ws = WS(server, kernel_id)
        t_ws = time.perf_counter()
        try:
            ws.execute(timeout=60)
            t_cell = time.perf_counter()
        finally:
            ws.close()
            server.delete_kernel(kernel_id)
        return {
            "post_ms": (t_post - t0) * 1000,
            "ws_ms": (t_ws - t_post) * 1000,
            "execute_ms": (t_cell - t_ws) * 1000,
            "total_ms": (t_cell - t0) * 1000,
        }

    def serve(tmp: Path, env: dict[str, str], label: str) -> Any:
        """The server, started; its first kernel is asked for as soon as
        it answers (nothing else runs meanwhile)."""
        port, token = free_port(), secrets.token_hex(16)
        common = [f"--port={port}", f"--IdentityProvider.token={token}", *AS_ROOT]
        if label == "pyrepl3":
            argv = [sys.executable, "-m", "pyrepl3_kernel.cli", "gateway", *common]
        else:  # the stock server: the pyrepl3 extension (on in this venv) turned off
            config = tmp / "stock-config"
            config.mkdir(exist_ok=True)
            (config / "jupyter_server_config.json").write_text(
                json.dumps({"ServerApp": {"jpserver_extensions": {"pyrepl3_kernel.server": False}}})
            )
            env = {**env, "JUPYTER_CONFIG_DIR": str(config)}
            argv = [str(BIN / "jupyter-server"), "--ip=127.0.0.1", "--no-browser", *common]
        return Server(label, argv, env, port, token, tmp / f"{label}.log")

    out: dict[str, list[list[dict[str, float]]]] = {"pyrepl3": [], "ipykernel": []}
    for turn in range(runs):
        labels = [("pyrepl3", "pyrepl3"), ("ipykernel", "python3")]
        for label, kernel in labels if turn % 2 == 0 else labels[::-1]:
            tmp = Path(tempfile.mkdtemp(prefix="pyrepl3-bench-first-"))
            try:
                with setup(tmp) as (env, servers):
                    server = serve(tmp, env, label)
                    servers.append(server)
                    server.start()  # returns as soon as GET /api/kernels answers
                    out[label].append([phases(server, kernel) for _ in range(kernels)])
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"  turn {turn + 1}: pyrepl3 "
            + " ".join(f"{k['total_ms']:.0f}" for k in out["pyrepl3"][-1])
            + " / ipykernel "
            + " ".join(f"{k['total_ms']:.0f}" for k in out["ipykernel"][-1]),
            file=sys.stderr,
        )
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: dict[str, Any]) -> list[str]:
    lines = [f"{'metric (median of runs)':<58} {'pyrepl3':>9} {'ipykernel':>10} {'ratio':>7}"]

    def row(label: str, a: float, b: float) -> None:
        lines.append(f"{label:<58} {a:>7.0f}ms {b:>8.0f}ms {ratio(a, b):>7.3f}")

    if "argv" in results:
        report_argv(results["argv"]["samples_ms"], row, lines)
    if "gateway" in results:
        report_gateway(results["gateway"], row, lines)
    return lines


def report_argv(s: dict[str, list[float]], row: Any, lines: list[str]) -> None:
    ipk = median(s[IPYKERNEL])
    row("(a) argv, no daemon running: start to first 1+1", median(s["first"]), ipk)
    row("(a) argv, the launch right after it", median(s["second"]), ipk)
    row("(a) argv, a launch once its daemon is ready", median(s["later"]), ipk)
    row("(a) argv, the launch after that (pool refilled)", median(s["next"]), ipk)
    row("(a) argv standalone (PYREPL3_HANDOFF=0)", median(s[STANDALONE]), ipk)
    lines.append(
        f"    first launch / standalone: {ratio(median(s['first']), median(s[STANDALONE])):.2f}"
        f"  (samples first {[round(x) for x in s['first']]}, "
        f"standalone {[round(x) for x in s[STANDALONE]]})"
    )


def report_gateway(g: dict[str, Any], row: Any, lines: list[str]) -> None:
    for i in range(len(g["pyrepl3"][0])):
        for phase in ("total_ms", "post_ms", "ws_ms", "execute_ms"):
            a = median([run[i][phase] for run in g["pyrepl3"]])
            b = median([run[i][phase] for run in g["ipykernel"]])
            if phase == "total_ms":
                row(f"(b) gateway kernel {i + 1}: POST to 1+1 result", a, b)
            else:
                lines.append(f"      {phase[:-3]:<10} {a:>7.0f}ms {b:>8.0f}ms")
    for label in ("pyrepl3", "ipykernel"):
        first = median([run[0]["total_ms"] for run in g[label]])
        later = median([k["total_ms"] for run in g[label] for k in run[1:]])
        lines.append(
            f"    {label}: first kernel / median of the later ones: {ratio(first, later):.2f}"
            f"  (first {[round(run[0]['total_ms']) for run in g[label]]})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kernels", type=int, default=5, help="kernels per gateway run")
    parser.add_argument("--skip-gateway", action="store_true")
    parser.add_argument("--skip-argv", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "runs": args.runs,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load": os.getloadavg(),
        },
    }
    t0 = time.perf_counter()
    if not args.skip_argv:
        with isolated_env() as runtime:
            install_argv_specs()
            print("(a) argv path, first launch", file=sys.stderr)
            results["argv"] = bench_argv(args.runs, runtime)
    if not args.skip_gateway:
        print("(b) gateway, first kernels", file=sys.stderr)
        results["gateway"] = bench_gateway(args.runs, args.kernels)
    results["wall_s"] = time.perf_counter() - t0
    lines = report(results)
    results["table"] = lines
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "first_launch.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
