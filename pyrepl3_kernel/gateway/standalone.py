"""``python -m pyrepl3_kernel -f CONNECTION_FILE``: one kernel, one worker.

This is what a client that launches the kernelspec's argv gets. The process
exits after a shutdown_request (jupyter_client restarts a standalone kernel by
starting a new process on the same ports).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys

from ..curve import CurveKeyError, CurveKeys
from ..processes import alive
from ..session.worker import WorkerProcess


async def _started(session: WorkerProcess) -> WorkerProcess:
    await session.start()
    return session


#: Options ipykernel takes on its command line that clients pass to any kernel
#: bound to the name python3 (nbclient adds --HistoryManager.hist_file=:memory:,
#: ipykernel's tests --profile-dir DIR): IPython configuration.
_TRAIT_OPTION = re.compile(r"^--([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+=.*)$", re.DOTALL)


def ipython_options(extra: list[str]) -> tuple[list[str], list[str]]:
    """(the IPython configuration in ``extra`` as ``Class.trait=value``,
    what is not understood). ``--profile-dir D`` becomes
    ``ProfileDir.location=D``."""
    options: list[str] = []
    unknown: list[str] = []
    args = iter(extra)
    for arg in args:
        match = _TRAIT_OPTION.match(arg)
        if match:
            options.append(match.group(1))
        elif arg == "--profile-dir":
            options.append(f"ProfileDir.location={next(args, '')}")
        elif arg.startswith("--profile-dir="):
            options.append(f"ProfileDir.location={arg.split('=', 1)[1]}")
        else:
            unknown.append(arg)
    return options, unknown


async def serve(connection_file: str, options: list[str] | None = None) -> None:
    with open(connection_file) as f:
        info = json.load(f)
    CurveKeys.of(info)  # unusable keys: fail before a worker is started
    # Start the worker before importing the gateway's heavy dependencies
    # (zmq, jupyter_client): the two interpreters then boot side by side.
    session = WorkerProcess(ipython_options=options)
    first = asyncio.ensure_future(_started(session))
    while session.pid is None and not first.done():
        await asyncio.sleep(0)

    from ..session.workers import ColdWorkers
    from .kernel import JupyterGateway

    done = asyncio.Event()
    gateway = JupyterGateway(
        info,
        workers=ColdWorkers(ipython_options=options, first=first),
        on_shutdown=lambda restart: done.set(),
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(gateway.interrupt()))
    loop.add_signal_handler(signal.SIGTERM, done.set)
    await gateway.start()
    watcher = asyncio.ensure_future(_watch_parent(done))
    try:
        await done.wait()
    finally:
        watcher.cancel()
        await gateway.stop()


async def _watch_parent(done: asyncio.Event, interval: float = 1.0) -> None:
    """Exit when the process that launched us is gone, as ipykernel does:
    jupyter_client names it in JPY_PARENT_PID."""
    try:
        parent = int(os.environ.get("JPY_PARENT_PID", "0"))
    except ValueError:
        return
    if parent <= 1:
        return
    launched_by = os.getppid()
    while True:
        await asyncio.sleep(interval)
        # gone, or we were reparented: our launcher died
        if not alive(parent) or os.getppid() != launched_by:
            logging.getLogger("pyrepl3.gateway").warning(
                "parent process %s is gone; shutting down", parent
            )
            done.set()
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pyrepl3_kernel", description="Run one PyREPL3 Jupyter kernel."
    )
    parser.add_argument("-f", "--connection-file", required=True, help="Jupyter connection file")
    parser.add_argument("--log-level", default="WARNING")
    args, extra = parser.parse_known_args(argv)
    options, unknown = ipython_options(extra)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="[pyrepl3 %(name)s] %(levelname)s %(message)s",
    )
    try:
        asyncio.run(serve(args.connection_file, options))
    except CurveKeyError as exc:  # the connection file's keys: say so, no traceback
        sys.exit(f"{parser.prog}: {args.connection_file}: {exc}")


if __name__ == "__main__":
    main()
