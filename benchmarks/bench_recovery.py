"""Crash recovery, interrupts and monitoring overhead: pyrepl3 against ipykernel.

Usage::

    .venv/bin/python benchmarks/bench_recovery.py [--quick] [--out DIR]

pyrepl3 kernelspecs are installed by this script into a temporary prefix,
with a manager daemon of its own (temporary ``JUPYTER_RUNTIME_DIR``, stopped
at the end); ipykernel is the ``python3`` kernelspec. Every kernel is started
by an ``AsyncIOLoopKernelManager`` whose ``KernelRestarter`` runs (polling
``is_alive()`` every ``time_to_dead`` = 3 s, ``restart_limit`` 5: the
defaults, as in jupyter_server), and driven by one ``BlockingKernelClient``
that is kept for the kernel's whole life.

(a) recovery (Jupyter kernels, pooled and cold, and the native ``Session``): the checkpoint workload (a 1e6 float64 array, a 100k x 5
    DataFrame, a 10k dict, functions, a class with 1000 instances) is
    defined, then a cell calls ``os._exit(1)``. Measured from sending that
    cell: to its ``execute_reply`` (pyrepl3 replies once the new worker runs
    with the state restored), and to the result of the next cell, sent right
    after the reply, which checks the state. ipykernel never replies to the
    crashed cell; the restarter brings a new kernel (same ports), and the
    same client resends the checking cell every 0.1 s until one is answered:
    the time until then, and the state is gone (NameError).
(b) interrupt: ``time.sleep(10)`` interrupted with ``interrupt_kernel()``
    (message mode for pyrepl3, SIGINT for ipykernel), to the
    ``execute_reply`` with KeyboardInterrupt.
(c) monitoring overhead: ``1+1`` round trip (request to reply and result)
    on pyrepl3 kernels with limits off, with ``PYREPL3_MEMORY_LIMIT``
    (sampling during cells), and with every limit set; plus a compute
    cell; and ``1+1`` with the workload in the namespace, autosave on vs
    ``PYREPL3_AUTOSAVE=0`` (each successful cell forks a save).

Writes ``results/recovery.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from queue import Empty
from typing import Any

import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.ioloop import AsyncIOLoopKernelManager

POOLED = "pyrepl3-bench"
COLD = "pyrepl3-bench-cold"
IPYKERNEL = "python3"
NATIVE = "native Session (cold)"
TIMEOUT = 120.0

FULL = {"crashes": 5, "interrupts": 10, "round_trips": 300, "compute": 5}
QUICK = {"crashes": 2, "interrupts": 4, "round_trips": 60, "compute": 2}

WORKLOAD = """\
import numpy as np
import pandas as pd

rng = np.random.default_rng(0)
arr = rng.random(1_000_000)
df = pd.DataFrame(rng.random((100_000, 5)), columns=list("abcde"))
d = {f"key{i}": i for i in range(10_000)}

def f(v):
    return v * 2

def g(v):
    return f(v) + 1

class Item:
    def __init__(self, i):
        self.i = i
        self.name = f"item{i}"

items = [Item(i) for i in range(1000)]
"""
CHECK = "(arr.shape, df.shape, len(d), g(1), type(items[0]) is Item, items[-1].i)"
CHECK_OK = "((1000000,), (100000, 5), 10000, 3, True, 999)"
#: What the autosave costs the worker on the critical path: one fork.
FORK_TIME = """\
import os, statistics, time
samples = []
for _ in range(20):
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    samples.append(time.perf_counter() - t)
    os.waitpid(pid, 0)
fork_ms = {"p50": statistics.median(samples) * 1000, "max": max(samples) * 1000}
"""
COMPUTE = "s = 0\nfor i in range(6_000_000):\n    s += i"

LIMITS_MEMORY = {"PYREPL3_MEMORY_LIMIT": "8G"}
LIMITS_ALL = {
    "PYREPL3_MEMORY_LIMIT": "8G",
    "PYREPL3_MEMORY_SOFT_LIMIT": "6G",
    "PYREPL3_CELL_TIMEOUT": "600",
    "PYREPL3_CELL_CPU_LIMIT": "600",
}


class BenchError(RuntimeError):
    pass


# -- setup ----------------------------------------------------------------------------


def cli(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextmanager
def isolated_env() -> Iterator[Path]:
    """Kernelspecs in a temporary prefix, and a runtime dir (so a daemon)
    and IPython dir of our own; the daemon is stopped at the end."""
    base = Path(tempfile.mkdtemp(prefix="pyrepl3-bench-recovery-"))
    prefix, runtime = base / "prefix", base / "runtime"
    runtime.mkdir(mode=0o700)
    (base / "ipython").mkdir()
    cli("install", "--prefix", str(prefix), "--name", POOLED)
    cli("install", "--prefix", str(prefix), "--name", COLD, "--no-pool")
    names = ("JUPYTER_PATH", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(prefix / "share" / "jupyter"), *filter(None, [saved["JUPYTER_PATH"]])]
    )
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime)
    os.environ["IPYTHONDIR"] = str(base / "ipython")
    try:
        yield runtime
    finally:
        subprocess.run(
            [sys.executable, "-m", "pyrepl3_kernel.cli", "stop", "--runtime-dir", str(runtime)],
            capture_output=True,
            timeout=60,
        )
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(base, ignore_errors=True)


class Loop:
    """An asyncio loop in a thread, for the kernel managers and restarters."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Kernel:
    """A kernel under a running KernelRestarter, and one client for it. The
    client polls shell and iopub together and stamps each message's arrival
    (as bench_jupyter.py does); what a wait skips is kept for later waits."""

    def __init__(self, loop: Loop, name: str, env: dict[str, str] | None = None) -> None:
        self.loop = loop
        self.name = name
        self.restarts: list[float] = []  # when the restarter restarted the kernel
        self.km = AsyncIOLoopKernelManager(kernel_name=name)
        self.loop.run(self.km.start_kernel(env={**os.environ, **(env or {})}))

        def start_restarter() -> None:
            self.km.add_restart_callback(lambda: self.restarts.append(time.monotonic()))
            self.km.start_restarter()

        self.loop.call(start_restarter)
        self.kc = BlockingKernelClient()
        self.kc.load_connection_info(self.km.get_connection_info())
        self.kc.start_channels(stdin=False, hb=False)
        self.kc.wait_for_ready(timeout=TIMEOUT)
        self.shell = self.kc.shell_channel.socket
        self.iopub = self.kc.iopub_channel.socket
        self.poller = zmq.Poller()
        self.poller.register(self.shell, zmq.POLLIN)
        self.poller.register(self.iopub, zmq.POLLIN)
        self.pending: list[tuple[str, dict[str, Any], float]] = []
        self.drain()

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            try:
                self.loop.call(self.km.stop_restarter)
                self.loop.run(self.km.shutdown_kernel(now=True))
            except Exception as exc:
                print(f"warning: shutdown of {self.name}: {exc!r}", file=sys.stderr)

    def _receive(self, timeout: float) -> bool:
        """Move what arrives within ``timeout`` s into ``pending``."""
        events = dict(self.poller.poll(max(0.0, timeout) * 1000))
        for sock, channel in ((self.iopub, "iopub"), (self.shell, "shell")):
            if sock not in events:
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                arrived = time.monotonic()
                _, frames = self.kc.session.feed_identities(frames)
                self.pending.append((channel, self.kc.session.deserialize(frames), arrived))
        return bool(events)

    def drain(self, quiet: float = 0.1) -> None:
        while self._receive(quiet):
            pass
        self.pending.clear()

    def wait(
        self,
        msg_id: str,
        channel: str,
        msg_type: str | None = None,
        timeout: float = TIMEOUT,
        state: str | None = None,
    ) -> tuple[dict[str, Any], float]:
        """The first message of ``msg_id`` on ``channel`` (of ``msg_type``,
        or the status ``state``) and its arrival time."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (ch, msg, arrived) in enumerate(self.pending):
                if ch != channel or msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg_type is not None and msg["msg_type"] != msg_type:
                    continue
                if state is not None and msg["content"].get("execution_state") != state:
                    continue
                del self.pending[i]
                return msg, arrived
            left = deadline - time.monotonic()
            if left <= 0:
                raise Empty
            self._receive(left)

    def reply(self, msg_id: str, timeout: float = TIMEOUT) -> tuple[dict[str, Any], float]:
        return self.wait(msg_id, "shell", timeout=timeout)

    def idle(self, msg_id: str, timeout: float = TIMEOUT) -> None:
        self.wait(msg_id, "iopub", "status", timeout, state="idle")
        self.pending = [p for p in self.pending if p[1]["parent_header"].get("msg_id") != msg_id]

    def ok(self, code: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg_id = self.kc.execute(code)
        reply, _ = self.reply(msg_id, timeout)
        self.idle(msg_id, timeout)
        if reply["content"]["status"] != "ok":
            raise BenchError(f"{self.name}: {code!r} failed: {reply['content']}")
        return dict(reply["content"])

    def value(self, expression: str) -> str:
        msg_id = self.kc.execute("", silent=True, user_expressions={"v": expression})
        reply, _ = self.reply(msg_id)
        self.idle(msg_id)
        result = reply["content"]["user_expressions"]["v"]
        if result.get("status") != "ok":
            raise BenchError(f"{self.name}: {expression!r}: {result}")
        return str(result["data"]["text/plain"])

    def round_trip(self, code: str = "1+1") -> float:
        """Request to having both the execute_reply and the execute_result."""
        started = time.monotonic()
        msg_id = self.kc.execute(code)
        _, t_reply = self.reply(msg_id)
        _, t_result = self.wait(msg_id, "iopub", "execute_result")
        self.idle(msg_id)
        return max(t_reply, t_result) - started


def summary(samples: list[float], scale: float = 1.0) -> dict[str, Any]:
    xs = sorted(x * scale for x in samples)
    return {
        "p50": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "n": len(xs),
        "samples": xs,
    }


# -- (a) recovery -----------------------------------------------------------------------


def autosave_done(
    runtime: Path, marker: str, count: int, timeout: float = 60.0
) -> tuple[float, Path]:
    """Wait until the automatic checkpoint holding ``marker`` covers cell
    ``count``; return when that was seen, and its directory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for manifest in runtime.glob("pyrepl3-autosave/*/auto.json"):
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if marker in data.get("names", {}) and data.get("execution_count", 0) > count:
                return time.monotonic(), manifest.parent
        time.sleep(0.005)
    raise BenchError(f"no automatic checkpoint of cell {count} within {timeout:g} s")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def recovery_pyrepl3(kernel: Kernel, runtime: Path, reps: int) -> dict[str, Any]:
    marker = f"bench_marker_{uuid.uuid4().hex[:8]}"
    kernel.ok(f"{marker} = 1")
    sent = time.monotonic()
    content = kernel.ok(WORKLOAD)
    replied = time.monotonic()
    saved, store = autosave_done(runtime, marker, content["execution_count"])
    out: dict[str, Any] = {
        "workload_cell_s": replied - sent,
        "first_autosave_after_reply_s": saved - replied,
        "autosave_bytes": dir_size(store),
    }
    to_reply: list[float] = []
    to_next: list[float] = []
    incremental: list[float] = []  # a cell that binds one small name: request to its autosave
    for _ in range(reps):
        t0 = time.monotonic()
        crash = kernel.kc.execute("import os\nos._exit(1)")
        reply, t_reply = kernel.reply(crash)
        if reply["content"]["status"] != "error":
            raise BenchError(f"the crash cell did not fail: {reply['content']}")
        check = kernel.kc.execute("", silent=True, user_expressions={"v": CHECK})
        checked, t_next = kernel.reply(check)
        value = checked["content"]["user_expressions"]["v"]
        if value.get("data", {}).get("text/plain") != CHECK_OK:
            raise BenchError(f"state not restored: {value}")
        to_reply.append(t_reply - t0)
        to_next.append(t_next - t0)
        kernel.idle(crash)
        kernel.idle(check)
        time.sleep(1.0)  # the new worker's own save (of the restored state) is done
        before = time.monotonic()
        count = kernel.ok("tick = []")["execution_count"]
        incremental.append(autosave_done(runtime, marker, count)[0] - before)
    out["crash_to_reply_ms"] = summary(to_reply, 1000)
    out["incremental_autosave_ms"] = summary(incremental, 1000)
    out["crash_to_next_result_ms"] = summary(to_next, 1000)
    out["state_restored"] = True
    out["restarter_restarts"] = len(kernel.restarts)
    return out


def recovery_native(loop: Loop, runtime: Path, reps: int) -> dict[str, Any]:
    """The same crash through the native API: a supervised ``Session``, cold
    workers (no pool), from sending the crash cell to its reply (the new
    worker runs with the state restored) and to the result of the next cell."""
    from pyrepl3_kernel import ExecuteMessage, Session

    async def cell(session: Any, code: str, **fields: Any) -> Any:
        reply = None
        async for msg in session.execute(ExecuteMessage(code=code, **fields)):
            if msg.type == "execute_reply":
                reply = msg
        return reply

    async def measure() -> dict[str, Any]:
        session = Session(max_restarts=1000)
        await session.start()
        try:
            marker = f"bench_marker_{uuid.uuid4().hex[:8]}"
            await cell(session, f"{marker} = 1")
            count = (await cell(session, WORKLOAD)).execution_count
            await asyncio.to_thread(autosave_done, runtime, marker, count)
            to_reply: list[float] = []
            to_next: list[float] = []
            for _ in range(reps):
                t0 = time.monotonic()
                reply = await cell(session, "import os\nos._exit(1)")
                t_reply = time.monotonic()
                if reply.ename != "WorkerDied":
                    raise BenchError(f"the crash cell did not fail: {reply}")
                checked = await cell(session, "", silent=True, user_expressions={"v": CHECK})
                t_next = time.monotonic()
                value = checked.user_expressions["v"]
                if value.get("data", {}).get("text/plain") != CHECK_OK:
                    raise BenchError(f"state not restored: {value}")
                to_reply.append(t_reply - t0)
                to_next.append(t_next - t0)
                await asyncio.sleep(1.0)  # the new worker's own save is done
            return {
                "crash_to_reply_ms": summary(to_reply, 1000),
                "crash_to_next_result_ms": summary(to_next, 1000),
                "state_restored": True,
                "restarts": session.restarts,
            }
        finally:
            await session.shutdown()

    return loop.run(measure(), timeout=TIMEOUT * (reps + 1))  # type: ignore[no-any-return]


def recovery_ipykernel(kernel: Kernel, reps: int) -> dict[str, Any]:
    to_answer: list[float] = []
    to_restart: list[float] = []
    replied_to_crash = 0
    state_lost = True
    for _ in range(reps):
        kernel.ok(WORKLOAD)
        restarts = len(kernel.restarts)
        t0 = time.monotonic()
        crash = kernel.kc.execute("import os\nos._exit(1)")
        # The same client asks again and again until the new kernel answers.
        answered = None
        checks: set[str] = set()
        deadline = t0 + 60
        next_send = t0
        while answered is None:
            now = time.monotonic()
            if now > deadline:
                raise BenchError("ipykernel did not come back within 60 s")
            if now >= next_send:
                checks.add(kernel.kc.execute("", user_expressions={"v": CHECK}))
                next_send = now + 0.1
            kernel._receive(0.02)
            for channel, msg, arrived in kernel.pending:
                parent = msg["parent_header"].get("msg_id")
                if channel != "shell":
                    continue
                if parent == crash:
                    replied_to_crash += 1
                elif parent in checks and answered is None:
                    answered = msg
                    to_answer.append(arrived - t0)
            kernel.pending.clear()
        value = answered["content"]["user_expressions"]["v"]
        state_lost = state_lost and value.get("status") == "error"
        if len(kernel.restarts) > restarts:
            to_restart.append(kernel.restarts[-1] - t0)
        time.sleep(0.5)
        kernel.drain(0.3)  # the other checks' replies
    return {
        "crash_to_same_client_answered_ms": summary(to_answer, 1000),
        "crash_to_restarter_restart_ms": summary(to_restart, 1000) if to_restart else None,
        "crashed_cell_replied": replied_to_crash,
        "state_lost": state_lost,
        "restarter_restarts": len(kernel.restarts),
    }


# -- (b) interrupts -------------------------------------------------------------------


def interrupt_latency(kernel: Kernel, reps: int) -> dict[str, Any]:
    samples = []
    for _ in range(reps):
        msg_id = kernel.kc.execute("import time\ntime.sleep(10)")
        kernel.wait(msg_id, "iopub", "execute_input")
        time.sleep(0.3)
        t0 = time.monotonic()
        kernel.loop.run(kernel.km.interrupt_kernel())
        reply, t1 = kernel.reply(msg_id, 15)
        if reply["content"].get("ename") != "KeyboardInterrupt":
            raise BenchError(f"{kernel.name}: not interrupted: {reply['content']}")
        samples.append(t1 - t0)
        kernel.idle(msg_id)
    return {"interrupt_to_reply_ms": summary(samples, 1000)}


# -- (c) monitoring and autosave overhead ---------------------------------------------------


def round_trips(kernels: dict[str, Kernel], n: int) -> dict[str, Any]:
    """``1+1`` on each kernel, alternated (order swapped every turn)."""
    names = list(kernels)
    for name in names:
        for _ in range(20):
            kernels[name].round_trip()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        for name in names if i % 2 == 0 else names[::-1]:
            samples[name].append(kernels[name].round_trip())
    return {name: {"1+1_ms": summary(s, 1000)} for name, s in samples.items()}


def compute_times(kernels: dict[str, Kernel], n: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    for i in range(n):
        for name in list(kernels) if i % 2 == 0 else list(kernels)[::-1]:
            started = time.monotonic()
            kernels[name].ok(COMPUTE)
            samples[name].append(time.monotonic() - started)
    return {name: {"compute_cell_ms": summary(s, 1000)} for name, s in samples.items()}


# -- report -------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    rec = results["a_recovery"]
    lines = ["", "(a) recovery after os._exit(1) in a cell, with the checkpoint workload", ""]
    lines.append(f"{'kernel':<22} {'to reply (p50)':>16} {'to next result (p50)':>22}  state")
    for name in (POOLED, COLD, NATIVE):
        r = rec[name]
        lines.append(
            f"{name:<22} {r['crash_to_reply_ms']['p50']:>13.0f} ms "
            f"{r['crash_to_next_result_ms']['p50']:>19.0f} ms  restored"
        )
    ipk = rec[IPYKERNEL]
    lines.append(
        f"{'ipykernel':<22} {'never':>16} "
        f"{ipk['crash_to_same_client_answered_ms']['p50']:>19.0f} ms  "
        + ("lost" if ipk["state_lost"] else "?")
    )
    w = rec[POOLED]
    lines.append(
        f"  workload cell {w['workload_cell_s'] * 1000:.0f} ms; its autosave done "
        f"{w['first_autosave_after_reply_s'] * 1000:.0f} ms after the reply "
        f"({w['autosave_bytes'] / 2**20:.1f} MiB on disk); one small change's "
        f"autosave {w['incremental_autosave_ms']['p50']:.0f} ms"
    )
    intr = results["b_interrupt"]
    lines += ["", "(b) interrupt of time.sleep(10) to the KeyboardInterrupt reply (p50)", ""]
    for name in (POOLED, IPYKERNEL):
        lines.append(f"{name:<22} {intr[name]['interrupt_to_reply_ms']['p50']:>10.1f} ms")
    mon = results["c_overhead"]
    lines += ["", "(c) overhead: 1+1 round trip p50 / a compute cell (pure-Python loop) p50", ""]
    for name, r in mon.items():
        compute = r.get("compute_cell_ms")
        lines.append(
            f"{name:<28} {r['1+1_ms']['p50']:>8.2f} ms"
            + (f"   {compute['p50']:>8.0f} ms" if compute else "")
        )
    fork = mon.get("workload, autosave on", {}).get("fork_ms")
    if fork:
        lines.append(f"  fork() of the worker holding the workload: p50 {fork['p50']:.2f} ms")
    return "\n".join(lines)


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
    loop = Loop()
    kernels: list[Kernel] = []

    def start(name: str, env: dict[str, str] | None = None) -> Kernel:
        kernel = Kernel(loop, name, env)
        kernels.append(kernel)
        return kernel

    def step(what: str) -> None:
        (args.out / "recovery.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"[{time.time() - started:6.1f} s] {what}", flush=True)

    with isolated_env() as runtime:
        try:
            crash_env = {"PYREPL3_MAX_RESTARTS": "1000"}
            step("(a) recovery")
            rec: dict[str, Any] = {}
            for name in (POOLED, COLD):
                kernel = start(name, crash_env)
                rec[name] = recovery_pyrepl3(kernel, runtime, params["crashes"])
            rec[NATIVE] = recovery_native(loop, runtime, params["crashes"])
            ipk = start(IPYKERNEL)
            rec[IPYKERNEL] = recovery_ipykernel(ipk, params["crashes"])
            results["a_recovery"] = rec
            step("(b) interrupts")
            pooled = kernels[0]
            results["b_interrupt"] = {
                POOLED: interrupt_latency(pooled, params["interrupts"]),
                IPYKERNEL: interrupt_latency(ipk, params["interrupts"]),
            }
            for kernel in kernels:
                kernel.close()
            kernels.clear()
            step("(c) monitoring overhead")
            limits = {
                "limits off": start(POOLED),
                "PYREPL3_MEMORY_LIMIT": start(POOLED, LIMITS_MEMORY),
                "all four limits": start(POOLED, LIMITS_ALL),
            }
            over = round_trips(limits, params["round_trips"])
            for name, value in compute_times(limits, params["compute"]).items():
                over[name].update(value)
            for kernel in kernels:
                kernel.close()
            kernels.clear()
            step("(c) autosave overhead")
            saving = {
                "workload, autosave on": start(POOLED),
                "workload, PYREPL3_AUTOSAVE=0": start(POOLED, {"PYREPL3_AUTOSAVE": "0"}),
            }
            for kernel in saving.values():
                kernel.ok(WORKLOAD)
            over.update(round_trips(saving, params["round_trips"] // 3))
            forked = saving["workload, autosave on"]
            forked.ok(FORK_TIME)
            over["workload, autosave on"]["fork_ms"] = ast.literal_eval(forked.value("fork_ms"))
            results["c_overhead"] = over
            step("done")
        finally:
            for kernel in kernels:
                kernel.close()
            loop.close()
    results["elapsed_s"] = time.time() - started
    (args.out / "recovery.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out / 'recovery.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
