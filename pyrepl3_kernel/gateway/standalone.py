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
import signal
import sys

from .kernel import JupyterGateway


async def serve(connection_file: str) -> None:
    with open(connection_file) as f:
        info = json.load(f)
    done = asyncio.Event()
    gateway = JupyterGateway(info, on_shutdown=done.set)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(gateway.interrupt()))
    loop.add_signal_handler(signal.SIGTERM, done.set)
    await gateway.start()
    try:
        await done.wait()
    finally:
        await gateway.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pyrepl3_kernel", description="Run one PyREPL3 Jupyter kernel."
    )
    parser.add_argument("-f", "--connection-file", required=True, help="Jupyter connection file")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="[pyrepl3 %(name)s] %(levelname)s %(message)s",
    )
    asyncio.run(serve(args.connection_file))


if __name__ == "__main__":
    main()
