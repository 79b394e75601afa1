"""Run docker/Dockerfile's command as a pod would run it (the environment
gateway_provisioners' pod launcher gives: KERNEL_ID, RESPONSE_ADDRESS,
PUBLIC_KEY, PORT_RANGE, plus the image's ENV), against gateway_provisioners'
own ResponseManager; then run a cell, interrupt one through the comm port,
and shut the kernel down. Prints a JSON report. Used by tests/test_cluster.py
(in a process of its own: ResponseManager reads GP_RESPONSE_IP at import)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "docker" / "Dockerfile"


def image_command() -> tuple[list[str], dict[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", text, re.M):
        env.update(dict(pair.split("=", 1) for pair in line.split()))
    cmd[0] = sys.executable  # the image's "python"
    return cmd, env


async def main() -> dict[str, object]:
    from gateway_provisioners.response_manager import ResponseManager
    from jupyter_client.asynchronous import AsyncKernelClient

    rm = ResponseManager.instance()
    kid = str(uuid.uuid4())
    rm.register_event(kid)
    cmd, image_env = image_command()
    env = dict(os.environ)
    env.update(image_env)
    # What `docker run -e` / the pod spec would override here: loopback only.
    env.update(
        KERNEL_ID=kid,
        RESPONSE_ADDRESS=rm.response_address,
        PUBLIC_KEY=rm.public_key,
        PORT_RANGE="0..0",
        PYREPL3_KERNEL_IP="127.0.0.1",
        PYREPL3_AUTOSAVE="0",
    )
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    report: dict[str, object] = {"cmd": cmd[1:]}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                info = await rm.get_connection_info(kid)
                break
            except asyncio.TimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no connection info (launcher exit {proc.poll()})"
                    ) from None
                await asyncio.sleep(0.05)
        report["keys"] = sorted(info)
        comm = (info["ip"], int(info["comm_port"]))
        client = AsyncKernelClient()
        client.load_connection_info(info)
        client.start_channels()
        await client.wait_for_ready(timeout=60)
        outputs: list[str] = []

        def hook(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                outputs.append(msg["content"]["text"])

        reply = await client.execute_interactive("print(6 * 7)", output_hook=hook, timeout=60)
        report["cell"] = [reply["content"]["status"], "".join(outputs).strip()]

        async def send(request: dict) -> None:
            with socket.create_connection(comm, timeout=5) as s:
                s.sendall(json.dumps(request).encode())

        msg_id = client.execute("import time; time.sleep(30)")
        await asyncio.sleep(1.0)
        await send({"signum": 0})  # the provisioner's poll
        await send({"signum": int(signal.SIGINT)})
        while True:
            msg = await client.get_shell_msg(timeout=30)
            if msg["parent_header"].get("msg_id") == msg_id:
                break
        report["interrupt"] = msg["content"].get("ename")
        client.shutdown()
        await send({"shutdown": 1})
        report["exit"] = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
        client.stop_channels()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rm.stop_response_manager()
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
