"""pyrepl3 against ipykernel over Jupyter messaging, side by side in one run.

Usage::

    .venv/bin/python benchmarks/bench_jupyter.py [--quick] [--out DIR]

Both kernels are started from their installed kernelspecs (``pyrepl3`` and
``python3``) with ``jupyter_client.KernelManager`` and driven by one client
process through their five ZMQ channels. Wherever two kernels can be measured
alternately (round trips, streams, 100k lines, cold starts) the benchmark
alternates them, and swaps which one goes first on each turn, so that the noise
of a shared machine falls on both. Absolute figures move from run to run; the
ratios pyrepl3/ipykernel are the result (below 1: pyrepl3 is faster/smaller).

Writes ``results/jupyter.json`` (raw samples, summaries, ratios) and
``results/jupyter.png`` next to this file, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import zmq
from jupyter_client import KernelManager
from jupyter_client.blocking import BlockingKernelClient

# A standalone (cold) pyrepl3 kernel against ipykernel: this benchmark is
# about the kernel itself; warm leases from the pool are bench_pool.py's.
KERNELS = {"pyrepl3": "pyrepl3-cold", "ipykernel": "python3"}


#: ``pyrepl3-kernel install``'s arguments for ``pyrepl3-cold`` (no pool provisioner).
COLD_KERNELSPEC = ["--name", "pyrepl3-cold", "--no-pool"]


def install_kernelspecs(prefix: Path, *variants: list[str]) -> None:
    """Install a kernelspec into ``prefix`` for each of ``variants`` (the
    extra arguments of ``pyrepl3-kernel install``: ``[]`` is ``pyrepl3``)
    and put the prefix first on JUPYTER_PATH."""
    for extra in variants:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pyrepl3_kernel.cli",
                "install",
                "--prefix",
                str(prefix),
                *extra,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    path = str(prefix / "share" / "jupyter")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        filter(None, [path, os.environ.get("JUPYTER_PATH")])
    )


def install_cold_kernelspec(prefix: Path) -> None:
    """Install ``pyrepl3-cold`` (no pool provisioner) and put it on JUPYTER_PATH."""
    install_kernelspecs(prefix, COLD_KERNELSPEC)


@contextmanager
def temporary_daemon(prefix: str) -> Iterator[None]:
    """Kernels of a temporary home: ``pyrepl3`` and ``pyrepl3-cold``
    installed into a temporary prefix (first on JUPYTER_PATH), a temporary
    runtime dir (so a daemon of its own) and IPython dir; at the end the
    daemon is stopped and the directory removed."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        install_kernelspecs(base / "prefix", [], COLD_KERNELSPEC)
        runtime = base / "runtime"
        runtime.mkdir()
        os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime)
        os.environ["IPYTHONDIR"] = str(base / "ipython")
        try:
            yield
        finally:
            subprocess.run(
                [sys.executable, "-m", "pyrepl3_kernel.cli", "stop", "--runtime-dir", str(runtime)],
                capture_output=True,
                timeout=60,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_meta(cfg: dict[str, Any], t0: float) -> dict[str, Any]:
    """A run's configuration, duration since ``t0`` and machine, for its JSON."""
    return {
        "config": cfg,
        "seconds": round(time.perf_counter() - t0, 1),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


NAMES = list(KERNELS)
TIMEOUT = 60.0
#: Client sockets retry a refused connect every RECONNECT_IVL ms (ZMQ's default
#: is 100 ms). A client made before the kernel has bound its ports would add up
#: to that much, at random, to a cold start; 10 ms keeps it out of the figure.
RECONNECT_IVL_MS = 10

FULL = {
    "warmup": 30,
    "exec_runs": 300,
    "info_runs": 300,
    "stream_prints": 200,
    "stream_gap": 0.005,
    "stream_rounds": 3,
    "lines": 100_000,
    "lines_rounds": 5,
    "starts": 5,
    "mem_settle": 1.0,
}
QUICK = {
    "warmup": 10,
    "exec_runs": 60,
    "info_runs": 60,
    "stream_prints": 100,
    "stream_gap": 0.005,
    "stream_rounds": 1,
    "lines": 20_000,
    "lines_rounds": 1,
    "starts": 2,
    "mem_settle": 0.5,
}


class BenchError(RuntimeError):
    pass


# -- statistics ----------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in 0..100), like numpy's default."""
    if not samples:
        return float("nan")
    s = sorted(samples)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": percentile(samples, 50),
        "p99": percentile(samples, 99),
        "mean": statistics.fmean(samples) if samples else float("nan"),
        "min": min(samples) if samples else float("nan"),
        "max": max(samples) if samples else float("nan"),
    }


def rotations(names: list[str], n: int) -> Iterator[list[str]]:
    """The order for each of ``n`` turns: all of ``names``, rotated by one
    each turn (two names: the first one swapped each turn)."""
    for i in range(n):
        k = i % len(names)
        yield names[k:] + names[:k]


def alternate(n: int) -> Iterator[list[str]]:
    """Kernel order for turn i: both kernels, the first one swapped each turn."""
    return rotations(NAMES, n)


# -- a client that waits on shell and iopub at once -----------------------------


_CONTEXT: zmq.Context | None = None


def client_context() -> zmq.Context:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = zmq.Context()
        _CONTEXT.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    return _CONTEXT


class Client:
    """A kernel client that polls shell and iopub together and stamps arrivals."""

    def __init__(self, km: KernelManager) -> None:
        self.km = km
        self.kc: BlockingKernelClient = km.client(context=client_context())
        self.kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        self.session = self.kc.session
        self.shell = self.kc.shell_channel.socket
        self.iopub = self.kc.iopub_channel.socket
        self.poller = zmq.Poller()
        self.poller.register(self.shell, zmq.POLLIN)
        self.poller.register(self.iopub, zmq.POLLIN)

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        except Exception:
            pass

    def send(self, msg_type: str, content: dict[str, Any]) -> str:
        msg = self.session.msg(msg_type, content)
        self.session.send(self.shell, msg)
        return msg["header"]["msg_id"]

    def execute(self, code: str) -> str:
        return self.send(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )

    def recv(self, deadline: float) -> Iterator[tuple[str, dict[str, Any], float]]:
        """Yield (channel, message, arrival perf_counter, arrival time.time())."""
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError("timed out waiting for the kernel")
            events = dict(self.poller.poll(left * 1000))
            for sock, channel in ((self.iopub, "iopub"), (self.shell, "shell")):
                if sock not in events:
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    t_perf = time.perf_counter()
                    t_wall = time.time()
                    _, frames = self.session.feed_identities(frames)
                    msg = self.session.deserialize(frames)
                    yield channel, msg, t_perf, t_wall

    def drain(self, quiet: float = 0.05) -> None:
        """Throw away whatever is still queued (iopub_welcome, old statuses)."""
        while dict(self.poller.poll(quiet * 1000)):
            for sock in (self.shell, self.iopub):
                while True:
                    try:
                        sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break

    def wait_iopub_ready(self, timeout: float = TIMEOUT) -> None:
        """Send kernel_info until something of it shows on iopub (subscription live)."""
        deadline = time.perf_counter() + timeout
        while True:
            msg_id = self.send("kernel_info_request", {})
            got_reply = got_iopub = False
            step_end = min(deadline, time.perf_counter() + 1.0)
            try:
                for channel, msg, _, _ in self.recv(step_end):
                    if msg["parent_header"].get("msg_id") != msg_id:
                        continue
                    if channel == "shell":
                        got_reply = True
                    else:
                        got_iopub = True
                    if got_reply and got_iopub:
                        self.drain()
                        return
            except BenchError:
                if time.perf_counter() >= deadline:
                    raise

    # -- measured operations ---------------------------------------------------

    def exec_round_trip(self, code: str = "1+1") -> float:
        """Seconds from sending execute_request to having execute_reply and execute_result."""
        t0 = time.perf_counter()
        msg_id = self.execute(code)
        t_reply = t_result = None
        idle = False
        deadline = t0 + TIMEOUT
        for channel, msg, t, _ in self.recv(deadline):
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if channel == "shell" and kind == "execute_reply":
                if msg["content"].get("status") != "ok":
                    raise BenchError(f"execute failed: {msg['content']}")
                t_reply = t
            elif kind == "execute_result":
                t_result = t
            elif kind == "error":
                raise BenchError(f"execute error: {msg['content']}")
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            if t_reply is not None and t_result is not None and idle:
                break
        assert t_reply is not None and t_result is not None
        return max(t_reply, t_result) - t0

    def kernel_info_round_trip(self) -> float:
        t0 = time.perf_counter()
        msg_id = self.send("kernel_info_request", {})
        t_reply = None
        idle = False
        for channel, msg, t, _ in self.recv(t0 + TIMEOUT):
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if channel == "shell" and msg["header"]["msg_type"] == "kernel_info_reply":
                t_reply = t
            elif (
                msg["header"]["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                idle = True
            if t_reply is not None and idle:
                break
        assert t_reply is not None
        # The loop waited for idle as well so that nothing spills into the next turn.
        return t_reply - t0

    def run_collect(
        self, code: str, timeout: float = TIMEOUT
    ) -> tuple[float, list[tuple[float, str]]]:
        """Run a cell to idle; return (seconds to idle, [(arrival wall time, stdout text)]).

        The texts are stream messages as sent: a line may be split over several.
        """
        t0 = time.perf_counter()
        msg_id = self.execute(code)
        chunks: list[tuple[float, str]] = []
        reply = None
        idle_at = None
        for channel, msg, t, wall in self.recv(t0 + timeout):
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if channel == "shell" and kind == "execute_reply":
                reply = msg["content"]
            elif kind == "stream" and msg["content"]["name"] == "stdout":
                chunks.append((wall, msg["content"]["text"]))
            elif kind == "error":
                raise BenchError(
                    f"cell failed: {msg['content'].get('ename')}: {msg['content'].get('evalue')}"
                )
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle_at = t
            if reply is not None and idle_at is not None:
                break
        assert reply is not None and idle_at is not None
        if reply.get("status") != "ok":
            raise BenchError(f"cell failed: {reply}")
        return idle_at - t0, chunks


# -- kernel lifetime -------------------------------------------------------------


@contextmanager
def started(kernel_name: str, **options: Any) -> Iterator[tuple[KernelManager, Client]]:
    """A kernel (``options``: the KernelManager's) and a client whose iopub
    is live; both ended at the end."""
    km = KernelManager(kernel_name=kernel_name, **options)
    client: Client | None = None
    try:
        km.start_kernel()
        client = Client(km)
        client.wait_iopub_ready()
        yield km, client
    finally:
        if client is not None:
            client.close()
        stop(km)


def stop(km: KernelManager) -> None:
    try:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    except Exception as e:  # keep cleaning up the others
        print(f"warning: shutdown of {km.kernel_name} failed: {e!r}", file=sys.stderr)


def kernel_pid(km: KernelManager) -> int:
    prov = km.provisioner
    pid = getattr(prov, "pid", None) or getattr(getattr(prov, "process", None), "pid", None)
    if not pid:
        raise BenchError(f"no pid for {km.kernel_name}")
    return int(pid)


def tree_memory(pid: int) -> dict[str, Any]:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = pss = uss = 0
    detail = []
    for p in procs:
        try:
            info = p.memory_full_info()
            cmdline = " ".join(p.cmdline())[:160]
        except psutil.NoSuchProcess:  # gone, or a zombie (e.g. a finished autosave child)
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0)
        uss += info.uss
        detail.append(
            {
                "pid": p.pid,
                "cmdline": cmdline,
                "rss_mib": info.rss / 2**20,
                "pss_mib": getattr(info, "pss", 0) / 2**20,
            }
        )
    return {
        "processes": len(detail),
        "rss_mib": rss / 2**20,
        "pss_mib": pss / 2**20,
        "uss_mib": uss / 2**20,
        "detail": detail,
    }


# -- the benchmarks ------------------------------------------------------------


def bench_round_trips(
    clients: dict[str, Client], cfg: dict[str, Any], log: Callable[[str], None]
) -> dict:
    out: dict[str, Any] = {}
    for c in clients.values():
        for _ in range(cfg["warmup"]):
            c.exec_round_trip()
            c.kernel_info_round_trip()
    log("  execute 1+1 ...")
    ex: dict[str, list[float]] = {n: [] for n in NAMES}
    for order in alternate(cfg["exec_runs"]):
        for n in order:
            ex[n].append(clients[n].exec_round_trip() * 1000)
    log("  kernel_info ...")
    ki: dict[str, list[float]] = {n: [] for n in NAMES}
    for order in alternate(cfg["info_runs"]):
        for n in order:
            ki[n].append(clients[n].kernel_info_round_trip() * 1000)
    out["execute_1plus1_ms"] = {n: {**summary(ex[n]), "samples": ex[n]} for n in NAMES}
    out["kernel_info_ms"] = {n: {**summary(ki[n]), "samples": ki[n]} for n in NAMES}
    return out


def stream_code(count: int, gap: float, flush: bool) -> str:
    end = ", flush=True" if flush else ""
    return (
        "import time as _t\n"
        f"for _i in range({count}):\n"
        f"    print(repr(_t.time()){end})\n"
        f"    _t.sleep({gap})\n"
    )


def complete_lines(chunks: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Reassemble stream messages into lines, each with the arrival of its newline."""
    lines: list[tuple[float, str]] = []
    pending = ""
    for arrived, text in chunks:
        parts = (pending + text).split("\n")
        pending = parts.pop()
        lines.extend((arrived, line) for line in parts)
    if pending:
        lines.append((chunks[-1][0], pending))
    return lines


def stream_latencies(
    client: Client, count: int, gap: float, flush: bool
) -> tuple[list[float], int, int]:
    """Per line: arrival of the line's newline at the client minus the stamp it prints."""
    _, chunks = client.run_collect(stream_code(count, gap, flush))
    lat = [(arrived - float(line)) * 1000 for arrived, line in complete_lines(chunks) if line]
    if len(lat) != count:
        raise BenchError(f"expected {count} stamped lines, got {len(lat)}")
    return lat, len(chunks), len(lat)


def bench_streams(
    clients: dict[str, Client], cfg: dict[str, Any], log: Callable[[str], None]
) -> dict:
    out: dict[str, Any] = {}
    for flush in (False, True):
        key = "stream_flush_ms" if flush else "stream_noflush_ms"
        log(f"  print() {'with' if flush else 'without'} flush ...")
        lat: dict[str, list[float]] = {n: [] for n in NAMES}
        msgs: dict[str, int] = {n: 0 for n in NAMES}
        for order in alternate(cfg["stream_rounds"]):
            for n in order:
                samples, nmsg, _ = stream_latencies(
                    clients[n], cfg["stream_prints"], cfg["stream_gap"], flush
                )
                lat[n].extend(samples)
                msgs[n] += nmsg
        out[key] = {
            n: {**summary(lat[n]), "stream_messages": msgs[n], "samples": lat[n]} for n in NAMES
        }
    return out


def bench_lines(
    clients: dict[str, Client], cfg: dict[str, Any], log: Callable[[str], None]
) -> dict:
    count = cfg["lines"]
    log(f"  {count:,} printed lines ...")
    code = f"for i in range({count}): print(i)"
    expected = [str(i) for i in range(count)]
    times: dict[str, list[float]] = {n: [] for n in NAMES}
    checks: dict[str, list[dict[str, Any]]] = {n: [] for n in NAMES}
    for order in alternate(cfg["lines_rounds"]):
        for n in order:
            secs, chunks = clients[n].run_collect(code, timeout=120)
            got = "".join(text for _, text in chunks).splitlines()
            in_order = got == expected
            lost = len(set(expected) - set(got))
            checks[n].append(
                {
                    "received": len(got),
                    "lost": lost,
                    "extra_or_dup": len(got) - (count - lost),
                    "in_order": in_order,
                    "stream_messages": len(chunks),
                }
            )
            times[n].append(secs)
    return {
        "lines_to_idle_s": {
            n: {
                **summary(times[n]),
                "samples": times[n],
                "lines": count,
                "checks": checks[n],
                "lost": max(c["lost"] for c in checks[n]),
                "all_in_order": all(c["in_order"] for c in checks[n]),
            }
            for n in NAMES
        }
    }


def cold_start_once(kernel_name: str, settle: float) -> dict[str, Any]:
    km = KernelManager(kernel_name=kernel_name)
    client: Client | None = None
    try:
        t0 = time.perf_counter()
        km.start_kernel()
        t_launched = time.perf_counter()
        client = Client(km)
        msg_id = client.send("kernel_info_request", {})
        t_info = t_iopub = None
        for channel, msg, t, _ in client.recv(t0 + TIMEOUT):
            if channel == "iopub" and t_iopub is None:
                t_iopub = t  # iopub_welcome or a status: our subscription is live
            if channel == "shell" and msg["parent_header"].get("msg_id") == msg_id:
                t_info = t
                break
        assert t_info is not None
        # The first cell right away: when can this kernel actually run code?
        # (A kernel may answer kernel_info before its interpreter is ready.)
        # Like any careful client, send it only once iopub is seen to be live,
        # or its output could be published before our subscription arrives.
        if t_iopub is None:
            for channel, _msg, _t, _ in client.recv(t0 + TIMEOUT):
                if channel == "iopub":
                    break
        msg_id = client.execute("1+1")
        t_reply = t_result = None
        for channel, msg, t, _ in client.recv(t0 + TIMEOUT):
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if channel == "shell" and kind == "execute_reply":
                t_reply = t
                # iopub may have subscribed too late for the result: don't wait forever.
                if t_result is None:
                    for _ch, m2, t2, _ in _until(client, t + 2.0):
                        if (
                            m2["parent_header"].get("msg_id") == msg_id
                            and m2["header"]["msg_type"] == "execute_result"
                        ):
                            t_result = t2
                            break
                break
            if kind == "execute_result":
                t_result = t
        assert t_reply is not None
        client.wait_iopub_ready()
        time.sleep(settle)
        mem = tree_memory(kernel_pid(km))
        return {
            "launch_ms": (t_launched - t0) * 1000,
            "first_kernel_info_ms": (t_info - t0) * 1000,
            "first_1plus1_ms": ((max(t_reply, t_result) if t_result else t_reply) - t0) * 1000,
            "first_result_seen": t_result is not None,
            "memory": mem,
        }
    finally:
        if client is not None:
            client.close()
        stop(km)


def _until(client: Client, deadline: float) -> Iterator[tuple[str, dict[str, Any], float, float]]:
    try:
        yield from client.recv(deadline)
    except BenchError:
        return


def bench_cold(cfg: dict[str, Any], log: Callable[[str], None]) -> dict:
    log(f"  {cfg['starts']} cold starts each (+ idle memory after one cell) ...")
    # One start each not counted: page cache, .pyc files.
    for n in NAMES:
        cold_start_once(KERNELS[n], 0)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in NAMES}
    for order in alternate(cfg["starts"]):
        for n in order:
            runs[n].append(cold_start_once(KERNELS[n], cfg["mem_settle"]))
    out: dict[str, Any] = {}
    for key in ("first_kernel_info_ms", "first_1plus1_ms", "launch_ms"):
        out[f"cold_{key}"] = {
            n: {**summary([r[key] for r in runs[n]]), "samples": [r[key] for r in runs[n]]}
            for n in NAMES
        }
    for key in ("rss_mib", "pss_mib", "uss_mib"):
        out[f"memory_{key}"] = {
            n: {
                **summary([r["memory"][key] for r in runs[n]]),
                "samples": [r["memory"][key] for r in runs[n]],
            }
            for n in NAMES
        }
    out["memory_detail"] = {n: runs[n][-1]["memory"]["detail"] for n in NAMES}
    out["cold_first_result_seen"] = {n: [r["first_result_seen"] for r in runs[n]] for n in NAMES}
    return out


# -- report --------------------------------------------------------------------

# (result key, statistic, label, unit) in display order; lower is better for all.
ROWS = [
    ("execute_1plus1_ms", "p50", "1+1 execute round trip p50", "ms"),
    ("execute_1plus1_ms", "p99", "1+1 execute round trip p99", "ms"),
    ("kernel_info_ms", "p50", "kernel_info round trip p50", "ms"),
    ("kernel_info_ms", "p99", "kernel_info round trip p99", "ms"),
    ("stream_noflush_ms", "p50", "print() latency, no flush, p50", "ms"),
    ("stream_noflush_ms", "p99", "print() latency, no flush, p99", "ms"),
    ("stream_flush_ms", "p50", "print(flush=True) latency p50", "ms"),
    ("stream_flush_ms", "p99", "print(flush=True) latency p99", "ms"),
    ("lines_to_idle_s", "p50", "100k printed lines to idle", "s"),
    ("cold_first_kernel_info_ms", "p50", "cold start to 1st kernel_info_reply", "ms"),
    ("cold_first_1plus1_ms", "p50", "cold start to 1st 1+1 result", "ms"),
    ("memory_rss_mib", "p50", "idle memory RSS (process tree)", "MiB"),
    ("memory_pss_mib", "p50", "idle memory PSS (process tree)", "MiB"),
]


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, stat, _, _ in ROWS:
        if key not in results:
            continue
        a = results[key]["pyrepl3"][stat]
        b = results[key]["ipykernel"][stat]
        out[f"{key}.{stat}"] = a / b if b else float("nan")
    return out


def fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "MiB":
        return f"{v:.1f} MiB"
    return f"{v:.1f} ms" if v >= 10 else f"{v:.2f} ms"


def table(results: dict[str, Any], rat: dict[str, float]) -> str:
    rows = [("metric", "pyrepl3", "ipykernel", "pyrepl3/ipykernel")]
    for key, stat, label, unit in ROWS:
        if key not in results:
            continue
        label = (
            label.replace("100k", f"{results[key]['pyrepl3'].get('lines', 0):,}")
            if "lines" in key
            else label
        )
        rows.append(
            (
                label,
                fmt(results[key]["pyrepl3"][stat], unit),
                fmt(results[key]["ipykernel"][stat], unit),
                f"{rat[f'{key}.{stat}']:.2f}x",
            )
        )
    if "lines_to_idle_s" in results:
        r = results["lines_to_idle_s"]
        rows.append(
            (
                "  lines lost / all in order",
                f"{r['pyrepl3']['lost']} / {r['pyrepl3']['all_in_order']}",
                f"{r['ipykernel']['lost']} / {r['ipykernel']['all_in_order']}",
                "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for j, r in enumerate(rows):
        lines.append(
            "  ".join(
                (c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])) for i, c in enumerate(r)
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def chart(results: dict[str, Any], rat: dict[str, float], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = [r for r in ROWS if r[0] in results]
    labels, values, notes = [], [], []
    for key, stat, label, unit in rows:
        a = results[key]["pyrepl3"][stat]
        b = results[key]["ipykernel"][stat]
        if "lines" in key:
            label = label.replace("100k", f"{results[key]['pyrepl3'].get('lines', 0):,}")
        labels.append(label)
        values.append(rat[f"{key}.{stat}"])
        notes.append(f"{fmt(a, unit)} vs {fmt(b, unit)}")

    fig, ax = plt.subplots(figsize=(11, 0.48 * len(rows) + 2.0), dpi=110)
    y = list(range(len(rows)))[::-1]
    colors = ["#2e8b57" if v <= 1 else "#c0392b" for v in values]
    # Bars grow from 1 (parity): left = pyrepl3 better, right = pyrepl3 worse.
    ax.barh(y, [v - 1 for v in values], left=1, color=colors, height=0.62)
    ax.set_xscale("log")
    lo = min(min(values) / 2.5, 0.5)
    hi = max(max(values) * 12, 6)
    ax.set_xlim(lo, hi)
    ax.axvline(1.0, color="#333", linewidth=1)
    ticks = [t for t in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100) if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=10)
    for yi, v, note in zip(y, values, notes, strict=True):
        if abs(v - 1) < 0.05:
            word = "about the same"
        else:
            word = f"{1 / v:.1f}x better" if v < 1 else f"{v:.1f}x worse"
        ax.text(max(v, 1) * 1.08, yi, f"{v:.2f}  {word}  ({note})", va="center", fontsize=8.5)
    ax.text(
        0.0,
        -0.1,
        "green: pyrepl3 faster or smaller;  red: ipykernel faster or smaller;  "
        "labels: ratio, then pyrepl3 vs ipykernel",
        transform=ax.transAxes,
        fontsize=8.5,
        color="#444",
    )
    ax.set_xlabel("pyrepl3 / ipykernel  (log scale; below 1 = pyrepl3 faster or smaller)")
    ax.set_title(
        "pyrepl3 vs ipykernel over Jupyter messaging, measured side by side\n"
        f"ipykernel {meta['ipykernel']}, jupyter_client {meta['jupyter_client']}, "
        f"Python {meta['python']}, {meta['cpus']} CPUs{' (quick run)' if meta['quick'] else ''}",
        fontsize=11,
    )
    ax.grid(axis="x", color="#ddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def strip_samples(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: strip_samples(v) for k, v in obj.items() if k != "samples"}
    return obj


# -- main ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 30 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL

    import ipykernel
    import jupyter_client

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    meta = {
        "quick": args.quick,
        "config": cfg,
        "python": platform.python_version(),
        "ipykernel": ipykernel.__version__,
        "jupyter_client": jupyter_client.__version__,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kernels": KERNELS,
    }
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    install_cold_kernelspec(Path(tempfile.mkdtemp(prefix="pyrepl3-bench-")))

    log("round trips and streams (both kernels running, alternated turn by turn):")
    with started(KERNELS["pyrepl3"]) as pr, started(KERNELS["ipykernel"]) as ip:
        clients = {"pyrepl3": pr[1], "ipykernel": ip[1]}
        results.update(bench_round_trips(clients, cfg, log))
        results.update(bench_streams(clients, cfg, log))
        results.update(bench_lines(clients, cfg, log))
    log("cold starts:")
    results.update(bench_cold(cfg, log))

    meta["loadavg_end"] = os.getloadavg()
    meta["duration_s"] = time.perf_counter() - t_start
    rat = ratios(results)

    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta,
        "ratios_pyrepl3_over_ipykernel": rat,
        "summary": strip_samples(results),
        "raw": results,
    }
    (args.out / "jupyter.json").write_text(json.dumps(doc, indent=1))
    chart(results, rat, meta, args.out / "jupyter.png")

    print(table(results, rat))
    seen = results.get("cold_first_result_seen", {})
    for n, flags in seen.items():
        if not all(flags):
            print(
                f"note: {n}: first execute_result missed on iopub in {flags.count(False)} cold start(s)"
            )
    print(
        f"\n{meta['duration_s']:.0f} s, load average {meta['loadavg_start'][0]:.1f} -> "
        f"{meta['loadavg_end'][0]:.1f}; wrote {args.out / 'jupyter.json'} and {args.out / 'jupyter.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
