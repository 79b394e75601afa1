"""The warm pool (manager daemon + ``pyrepl3-pool`` provisioner) against
ipykernel cold starts, side by side in one run.

Usage::

    .venv/bin/python benchmarks/bench_pool.py [--quick] [--out DIR]

Measures, with pyrepl3 kernelspecs installed by this script into a temporary
prefix and a manager daemon of its own (temporary ``JUPYTER_RUNTIME_DIR``,
stopped at the end), and ipykernel's ``python3`` kernelspec:

(a) ``KernelManager.start_kernel()`` to the first ``kernel_info_reply`` (and
    to the first ``1+1`` reply): a warm pyrepl3 lease vs an ipykernel cold
    start (and, for reference, a cold pyrepl3 kernel, ``--no-pool``);
(b) warm-up code ``import numpy, pandas``: pyrepl3 whose pool ran it vs
    ipykernel running it in its first cell, ``start_kernel()`` to the first
    cell's ``execute_reply`` (the first cell is ``import numpy, pandas`` on
    both);
(c) 20 small notebooks run one after another by nbclient, each in a ``python
    -c`` process of its own (the papermill / CI case): total wall time;
(d) 100 pyrepl3 kernels leased at once from one daemon vs 50 ipykernels
    started at once: time until every one has answered ``kernel_info`` and
    ``1+1``, and the total PSS of the processes (daemon + workers; the kernel
    processes).

Turns alternate between the kernels (and swap which goes first) so that the
noise of a shared machine falls on both. Writes ``results/pool.json`` and
prints a table; ratios are pyrepl3/ipykernel (below 1: pyrepl3 is faster or
smaller).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import zmq
from jupyter_client import AsyncKernelManager, KernelManager
from jupyter_client.asynchronous import AsyncKernelClient

from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths

POOLED = "pyrepl3-bench"
POOLED_NP = "pyrepl3-bench-np"
COLD = "pyrepl3-bench-cold"
IPYKERNEL = "python3"
WARMUP = "import numpy, pandas"
TIMEOUT = 120.0
#: How long each kernel of a burst (d) may take to answer.
BURST_TIMEOUT = 90.0
#: See bench_jupyter.py: a client made before the kernel has bound its ports
#: retries its connects every RECONNECT_IVL; ZMQ's 100 ms default would add up
#: to 100 ms at random to every start, whatever the kernel.
RECONNECT_IVL_MS = 10

FULL = {"starts": 10, "np_starts": 8, "notebooks": 20, "burst_pyrepl3": 100, "burst_ipykernel": 50}
QUICK = {"starts": 4, "np_starts": 3, "notebooks": 6, "burst_pyrepl3": 30, "burst_ipykernel": 15}


class BenchError(RuntimeError):
    pass


# -- setup ------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextmanager
def isolated_env() -> Iterator[Path]:
    """Kernelspecs in a temporary prefix, a runtime dir (and daemon) and an
    IPython dir of our own; the daemon is stopped at the end."""
    base = Path(tempfile.mkdtemp(prefix="pyrepl3-bench-"))
    prefix, runtime = base / "prefix", base / "runtime"
    runtime.mkdir(mode=0o700)
    (base / "ipython").mkdir()
    cli("install", "--prefix", str(prefix), "--name", POOLED, "--pool-size", "2")
    cli(
        "install",
        "--prefix",
        str(prefix),
        "--name",
        POOLED_NP,
        "--pool-size",
        "2",
        "--warmup-code",
        WARMUP,
    )
    cli("install", "--prefix", str(prefix), "--name", COLD, "--no-pool")
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(prefix / "share" / "jupyter"), *filter(None, [saved["JUPYTER_PATH"]])]
    )
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime)
    os.environ["IPYTHONDIR"] = str(base / "ipython")
    try:
        yield runtime
    finally:
        stop_daemon(runtime)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(base, ignore_errors=True)


def stop_daemon(runtime: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", "stop", "--runtime-dir", str(runtime)],
        capture_output=True,
        timeout=60,
    )


def daemon(runtime: Path) -> DaemonClient:
    return DaemonClient(DaemonPaths.default(runtime), timeout=60)


def wait_idle(runtime: Path, kernel_name: str, n: int = 1, timeout: float = TIMEOUT) -> None:
    """Until the kernelspec's pool holds ``n`` warm workers."""
    deadline = time.monotonic() + timeout
    while True:
        pools = daemon(runtime).call("status")["pools"]
        if any(p["kernel_name"] == kernel_name and p["idle"] >= n for p in pools):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the pool of {kernel_name} did not fill up: {pools}")
        time.sleep(0.05)


_CONTEXT: zmq.Context | None = None


def client_context() -> zmq.Context:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = zmq.Context()
        _CONTEXT.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    return _CONTEXT


def stop(km: KernelManager) -> None:
    try:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    except Exception as exc:  # keep cleaning up
        print(f"warning: shutdown of {km.kernel_name} failed: {exc!r}", file=sys.stderr)


def alternate(names: list[str], n: int) -> Iterator[list[str]]:
    for i in range(n):
        yield names if i % 2 == 0 else names[::-1]


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": samples,
    }


def pss_of(pids: list[int]) -> dict[str, Any]:
    rss = pss = 0
    counted = 0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0)
        counted += 1
    return {"processes": counted, "pss_mib": pss / 2**20, "rss_mib": rss / 2**20}


def tree(pid: int) -> list[int]:
    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


# -- (a) and (b): one start ---------------------------------------------------------


def start_once(
    kernel_name: str, first_cell: str, runtime: Path, wait_warm: bool = True
) -> dict[str, Any]:
    """start_kernel() to the first kernel_info_reply, and to the first cell's
    execute_reply (``first_cell``)."""
    if wait_warm and kernel_name in (POOLED, POOLED_NP):
        wait_idle(runtime, kernel_name)  # untimed: a warm worker waits
    km = KernelManager(kernel_name=kernel_name)
    kc = None
    try:
        t0 = time.perf_counter()
        km.start_kernel(stderr=subprocess.DEVNULL)  # ipykernel's TCP warning, once per start
        t_launched = time.perf_counter()
        kc = km.client(context=client_context())
        kc.start_channels()
        kc.kernel_info(reply=True, timeout=TIMEOUT)
        t_info = time.perf_counter()
        reply = kc.execute(first_cell, reply=True, timeout=TIMEOUT)
        t_cell = time.perf_counter()
        if reply["content"]["status"] != "ok":
            raise BenchError(f"{kernel_name}: {first_cell!r} failed: {reply['content']}")
        return {
            "launch_ms": (t_launched - t0) * 1000,
            "kernel_info_ms": (t_info - t0) * 1000,
            "first_cell_ms": (t_cell - t0) * 1000,
            "warm": getattr(km.provisioner, "warm", None),
        }
    finally:
        if kc is not None:
            kc.stop_channels()
        stop(km)


def bench_starts(
    names: list[str], first_cell: str, runs: int, runtime: Path
) -> dict[str, dict[str, Any]]:
    for name in names:  # untimed: page cache, .pyc files, the daemon and its pools
        start_once(name, first_cell, runtime, wait_warm=False)
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for order in alternate(names, runs):
        for name in order:
            raw[name].append(start_once(name, first_cell, runtime))
    out: dict[str, dict[str, Any]] = {}
    for name, runs_ in raw.items():
        out[name] = {
            "kernel_info_ms": summary([r["kernel_info_ms"] for r in runs_]),
            "first_cell_ms": summary([r["first_cell_ms"] for r in runs_]),
            "launch_ms": summary([r["launch_ms"] for r in runs_]),
            "warm": [r["warm"] for r in runs_],
        }
    return out


# -- (c) notebooks in processes of their own ------------------------------------------

_RUN_NOTEBOOK = textwrap.dedent(
    """
    import sys
    import nbformat
    from nbclient import NotebookClient

    path, kernel_name = sys.argv[1], sys.argv[2]
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name=kernel_name, timeout=120,
                   resources={"metadata": {"path": sys.argv[3]}}).execute()
    assert nb.cells[-1].outputs[0]["data"]["text/plain"] == "499500"
    """
)


def bench_notebooks(n: int, runtime: Path, workdir: Path) -> dict[str, Any]:
    import nbformat

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "small.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# a small notebook"),
        nbformat.v4.new_code_cell("x = [i * i for i in range(100)]"),
        nbformat.v4.new_code_cell("print(len(x), x[-1])"),
        nbformat.v4.new_code_cell("sum(range(1000))"),
    ]
    nbformat.write(nb, path)
    names = [POOLED, IPYKERNEL]
    before = daemon(runtime).call("status")["daemon"]
    times: dict[str, list[float]] = {name: [] for name in names}
    for order in alternate(names, n):
        for name in order:
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", _RUN_NOTEBOOK, str(path), name, str(workdir)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            times[name].append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise BenchError(f"notebook on {name} failed:\n{done.stderr[-2000:]}")
    after = daemon(runtime).call("status")["daemon"]
    return {
        name: {
            "total_s": sum(ts),
            "per_notebook_s": summary(ts),
            **(
                {
                    "leases": after["leases_served"] - before["leases_served"],
                    "warm_leases": after["warm_leases"] - before["warm_leases"],
                }
                if name == POOLED
                else {}
            ),
        }
        for name, ts in times.items()
    }


# -- (d) many kernels at once --------------------------------------------------------


async def _ready(info: dict[str, Any], t0: float) -> float:
    """kernel_info, then 1+1, on a fresh client; seconds since t0 when done."""
    kc = AsyncKernelClient()
    kc.load_connection_info(info)
    kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
    try:
        await kc.kernel_info(reply=True, timeout=BURST_TIMEOUT)
        reply = await kc.execute("1+1", reply=True, timeout=BURST_TIMEOUT)
        if reply["content"]["status"] != "ok":
            raise BenchError(f"1+1 failed: {reply['content']}")
        return time.perf_counter() - t0
    finally:
        kc.stop_channels()


def burst_result(
    n: int, outcomes: list[float | BaseException], memory: dict[str, Any]
) -> dict[str, Any]:
    ready = [o for o in outcomes if isinstance(o, float)]
    failures = [repr(o) for o in outcomes if not isinstance(o, float)]
    return {
        "kernels": n,
        "ready": len(ready),
        "failed": len(failures),
        "failures": failures[:10],
        "all_ready_s": max(ready) if ready else float("nan"),
        "ready_s": summary(sorted(ready)) if ready else None,
        "memory": memory,
        "pss_per_ready_kernel_mib": memory["pss_mib"] / len(ready) if ready else float("nan"),
    }


def fresh_daemon(runtime: Path) -> dict[str, Any]:
    """Restart the daemon (started by a launch, as usual) with one pool only,
    its 2 warm workers ready; the lease request that pool serves."""
    stop_daemon(runtime)
    km = KernelManager(kernel_name=POOLED)
    km.start_kernel()
    request = {
        "kernel_name": POOLED,
        "python": km.kernel_spec.argv[0],
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "owner_pid": os.getpid(),
        "pool": {"size": 2},
    }
    stop(km)
    wait_idle(runtime, POOLED, 2)
    return request


async def burst_pyrepl3(n: int, runtime: Path, lease_request: dict[str, Any]) -> dict[str, Any]:
    """``n`` leases at once, on the daemon's socket; every kernel then answers
    kernel_info and 1+1."""
    client = daemon(runtime)
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=n)
    leases: list[dict[str, Any]] = []

    async def one(t0: float) -> float:
        reply = await loop.run_in_executor(
            pool, lambda: client.call("lease", timeout=BURST_TIMEOUT, **lease_request)
        )
        leases.append(reply)
        return await _ready(reply["connection_info"], t0)

    try:
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(t0) for _ in range(n)), return_exceptions=True)
        await asyncio.sleep(1.0)  # settle
        # The daemon and everything it runs: leased workers and the refilled pool.
        memory = pss_of(tree(client.call("hello")["pid"]))
        warm = sum(bool(r["warm"]) for r in leases)
    finally:
        await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool, lambda r=r: client.call("release", lease_id=r["lease_id"])
                )
                for r in leases
            ),
            return_exceptions=True,
        )
        pool.shutdown(wait=False)
        stop_daemon(runtime)
    return {**burst_result(n, outcomes, memory), "warm_leases": warm}


async def burst_ipykernel(n: int) -> dict[str, Any]:
    managers = [AsyncKernelManager(kernel_name=IPYKERNEL) for _ in range(n)]

    async def one(km: AsyncKernelManager, t0: float) -> float:
        await km.start_kernel(stderr=subprocess.DEVNULL)
        try:
            return await _ready(km.get_connection_info(), t0)
        except Exception as exc:
            code = km.provisioner.process.poll() if km.provisioner else None
            raise BenchError(f"{exc!r}; kernel process exit code: {code}") from exc

    try:
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(km, t0) for km in managers), return_exceptions=True)
        await asyncio.sleep(1.0)
        pids = [
            pid
            for km, outcome in zip(managers, outcomes, strict=True)
            if isinstance(outcome, float)
            for pid in tree(km.provisioner.pid)
        ]
        memory = pss_of(pids)
    finally:
        await asyncio.gather(
            *(km.shutdown_kernel(now=True) for km in managers if km.has_kernel),
            return_exceptions=True,
        )
    return burst_result(n, outcomes, memory)


# -- report ------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(results: dict[str, Any]) -> list[str]:
    a, b, c, d = (results[k] for k in ("a_start", "b_warmup", "c_notebooks", "d_burst"))
    rows = [
        (
            "(a) start_kernel -> kernel_info_reply, median ms",
            a[POOLED]["kernel_info_ms"]["median"],
            a[IPYKERNEL]["kernel_info_ms"]["median"],
        ),
        (
            "(a) start_kernel -> first 1+1 reply, median ms",
            a[POOLED]["first_cell_ms"]["median"],
            a[IPYKERNEL]["first_cell_ms"]["median"],
        ),
        (
            f"(b) start -> `{WARMUP}` cell done, median ms",
            b[POOLED_NP]["first_cell_ms"]["median"],
            b[IPYKERNEL]["first_cell_ms"]["median"],
        ),
        (
            f"(c) {results['params']['notebooks']} notebooks, 1 process each, total s",
            c[POOLED]["total_s"],
            c[IPYKERNEL]["total_s"],
        ),
        (
            "(d) all kernels ready (kernel_info + 1+1), s",
            d["pyrepl3"]["all_ready_s"],
            d["ipykernel"]["all_ready_s"],
        ),
        (
            "(d) total PSS, MiB",
            d["pyrepl3"]["memory"]["pss_mib"],
            d["ipykernel"]["memory"]["pss_mib"],
        ),
        (
            "(d) PSS per ready kernel, MiB",
            d["pyrepl3"]["pss_per_ready_kernel_mib"],
            d["ipykernel"]["pss_per_ready_kernel_mib"],
        ),
    ]
    lines = [f"{'metric':<58} {'pyrepl3':>10} {'ipykernel':>10} {'ratio':>7}"]
    for label, mine, theirs in rows:
        lines.append(f"{label:<58} {mine:>10.1f} {theirs:>10.1f} {ratio(mine, theirs):>7.3f}")
    lines.append(
        f"(a) cold pyrepl3 (--no-pool) for reference: kernel_info "
        f"{a[COLD]['kernel_info_ms']['median']:.1f} ms, 1+1 {a[COLD]['first_cell_ms']['median']:.1f} ms"
    )
    p3, ipk = d["pyrepl3"], d["ipykernel"]
    lines.append(
        f"(d) pyrepl3: {p3['ready']} of {p3['kernels']} kernels ready, {p3['failed']} failed, "
        f"{p3['warm_leases']} leases warm, {p3['memory']['processes']} processes "
        f"(daemon, workers, refilled pool); ipykernel: {ipk['ready']} of {ipk['kernels']} "
        f"ready, {ipk['failed']} failed"
    )
    for failure in ipk["failures"][:3] + p3["failures"][:3]:
        lines.append(f"    failure: {failure[:160]}")
    lines.append(f"(c) pyrepl3 leases warm: {c[POOLED]['warm_leases']} of {c[POOLED]['leases']}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    params = QUICK if args.quick else FULL
    results: dict[str, Any] = {
        "params": params,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
        },
    }
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    with isolated_env() as runtime:

        def step(what: str) -> None:
            # What is measured so far is kept, should a later step fail.
            (args.out / "pool.json").write_text(json.dumps(results, indent=2) + "\n")
            print(f"[{time.time() - started:6.1f} s] {what}", flush=True)

        step("(a) start to kernel_info")
        results["a_start"] = bench_starts(
            [POOLED, IPYKERNEL, COLD], "1+1", params["starts"], runtime
        )
        step("(b) warm-up code")
        results["b_warmup"] = bench_starts(
            [POOLED_NP, IPYKERNEL], WARMUP, params["np_starts"], runtime
        )
        step("(c) notebooks")
        results["c_notebooks"] = bench_notebooks(
            params["notebooks"], runtime, runtime.parent / "notebooks"
        )
        step(f"(d) {params['burst_pyrepl3']} pyrepl3 kernels at once")
        results["d_burst"] = {
            "pyrepl3": asyncio.run(
                burst_pyrepl3(params["burst_pyrepl3"], runtime, fresh_daemon(runtime))
            )
        }
        step(f"(d) {params['burst_ipykernel']} ipykernels at once")
        results["d_burst"]["ipykernel"] = asyncio.run(burst_ipykernel(params["burst_ipykernel"]))
        step("done")
    results["elapsed_s"] = time.time() - started
    a, b, c, d = (results[k] for k in ("a_start", "b_warmup", "c_notebooks", "d_burst"))
    results["ratios"] = {
        "a_kernel_info": ratio(
            a[POOLED]["kernel_info_ms"]["median"], a[IPYKERNEL]["kernel_info_ms"]["median"]
        ),
        "a_first_1plus1": ratio(
            a[POOLED]["first_cell_ms"]["median"], a[IPYKERNEL]["first_cell_ms"]["median"]
        ),
        "b_warmup_first_cell": ratio(
            b[POOLED_NP]["first_cell_ms"]["median"], b[IPYKERNEL]["first_cell_ms"]["median"]
        ),
        "c_notebooks_total": ratio(c[POOLED]["total_s"], c[IPYKERNEL]["total_s"]),
        "d_all_ready": ratio(d["pyrepl3"]["all_ready_s"], d["ipykernel"]["all_ready_s"]),
        "d_pss_per_kernel": ratio(
            d["pyrepl3"]["pss_per_ready_kernel_mib"], d["ipykernel"]["pss_per_ready_kernel_mib"]
        ),
    }
    table = report(results)
    results["table"] = table
    (args.out / "pool.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(table))
    print(f"wrote {args.out / 'pool.json'} ({results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
