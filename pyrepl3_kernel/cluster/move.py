"""Move a kernel to another host: ``POST /api/pyrepl3/kernels/{id}/move``
(``{"host": "..."}``, or ``{}`` for the provisioner's next host) and
``pyrepl3-kernel move KERNEL_ID --to HOST``.

The move is the resume after a host loss, done on purpose and without the
loss: the old kernel is told to stop keeping its state (SIGTERM through the
provisioner's listener: its last save is uploaded to the state store and
its record says it stopped), then jupyter_server restarts the kernel under
the same kernel id with ``KERNEL_REMOTE_HOST`` set to the target, and the new
kernel resumes the state from the store before it answers. The old kernel
is stopped before the new one starts because one kernel id is served by one
KernelManager, and because the state the new kernel must resume is the old
kernel's last: it only exists once the old kernel runs no more cells.
Clients connected to the kernel get the ``restarting`` status a restart
gives them (JupyterLab reconnects on it), then the first cell says where the
kernel came from.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from ..errors import Pyrepl3Error


class MoveError(Pyrepl3Error):
    """The kernel cannot be moved (not remote, no state store, stuck)."""


async def move_kernel(
    mkm: Any, kernel_id: str, host: str | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """Move ``kernel_id`` (a kernel of jupyter_server's MappingKernelManager
    ``mkm``) to ``host``; what happened, with the time it took."""
    km = mkm.get_kernel(kernel_id)
    prov = km.provisioner
    if prov is None or not hasattr(prov, "assigned_host") or not hasattr(prov, "comm_port"):
        raise MoveError(
            f"kernel {kernel_id} was not started by a gateway_provisioners provisioner: "
            "it has no host to move from"
        )
    env = (km._launch_args or {}).get("env") or {}
    if not env.get("PYREPL3_STATE_URL") and not (
        km.kernel_spec and km.kernel_spec.env.get("PYREPL3_STATE_URL")
    ):
        raise MoveError(
            f"kernel {kernel_id} has no state store (PYREPL3_STATE_URL in its kernelspec's env): "
            "its state could not follow it"
        )
    old = prov.assigned_host
    if host and host == old:
        raise MoveError(f"kernel {kernel_id} already runs on {host}")
    hosts = list(getattr(prov, "remote_hosts", None) or [])
    if host and hosts and host not in hosts:
        raise MoveError(f"{host} is not one of the provisioner's remote_hosts ({', '.join(hosts)})")
    started = time.monotonic()
    km.stop_restarter()  # the old kernel's exit is not a death to recover from
    try:
        await prov.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while await prov.poll() is None:
            if time.monotonic() > deadline:
                raise MoveError(
                    f"kernel {kernel_id} on {old} did not stop within {timeout:g} s "
                    "(still uploading its state?); it was not moved"
                )
            await asyncio.sleep(0.1)
        saved = time.monotonic() - started
        previous = env.get("KERNEL_REMOTE_HOST")
        if host:
            env["KERNEL_REMOTE_HOST"] = host
        try:
            await mkm.restart_kernel(kernel_id, now=True)
        except Exception as exc:
            raise MoveError(
                f"kernel {kernel_id} stopped on {old} with its state saved, but could not be "
                f"started on {host or 'the next host'}: {exc}; the restarter starts it again "
                "on another host, from the saved state"
            ) from None
        finally:
            if previous is None:
                env.pop("KERNEL_REMOTE_HOST", None)
            else:
                env["KERNEL_REMOTE_HOST"] = previous
    finally:
        km.start_restarter()
    restarter = getattr(km, "_restarter", None)
    if restarter is not None:
        # The clients' WebSockets still point at the old kernel's ports: the
        # status a restart gives them makes JupyterLab reconnect.
        restarter._fire_callbacks("restart")
    return {
        "kernel_id": kernel_id,
        "from": old,
        "to": km.provisioner.assigned_host,
        "stop_seconds": round(saved, 3),
        "seconds": round(time.monotonic() - started, 3),
    }


def handler_class() -> Any:
    """The jupyter_server handler (imported only where the server runs)."""
    import json

    from jupyter_server.base.handlers import APIHandler
    from tornado import web

    class MoveHandler(APIHandler):
        auth_resource = "kernels"

        @web.authenticated
        async def post(self, kernel_id: str) -> None:
            if not self.authorizer.is_authorized(self, self.current_user, "write", "kernels"):
                raise web.HTTPError(403)
            try:
                body = json.loads(self.request.body or b"{}")
            except ValueError:
                raise web.HTTPError(400, 'the body must be JSON: {"host": "..."}') from None
            host = body.get("host") if isinstance(body, dict) else None
            if host is not None and not isinstance(host, str):
                raise web.HTTPError(400, "host must be a string")
            mkm = self.kernel_manager
            if kernel_id not in mkm:
                raise web.HTTPError(404, f"no kernel {kernel_id}")
            try:
                result = await move_kernel(mkm, kernel_id, host or None)
            except MoveError as exc:
                raise web.HTTPError(409, str(exc)) from None
            self.finish(json.dumps(result))

    return MoveHandler


def request_move(
    server: str, token: str | None, kernel_id: str, host: str | None
) -> dict[str, Any]:
    """The client side, for ``pyrepl3-kernel move``."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{server.rstrip('/')}/api/pyrepl3/kernels/{kernel_id}/move",
        data=json.dumps({"host": host} if host else {}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"token {token}"} if token else {}),
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("message") or exc.reason
        except ValueError:
            reason = exc.reason
        raise MoveError(f"the server refused the move ({exc.code}): {reason}") from None
    except urllib.error.URLError as exc:
        raise MoveError(f"could not reach {server}: {exc.reason}") from None


def cli_move(args: Any) -> int:
    """``pyrepl3-kernel move`` (cli.py hands over here)."""
    import os
    import sys

    token = args.token or os.environ.get("JUPYTER_TOKEN")
    try:
        result = request_move(args.server, token, args.kernel_id, args.to)
    except MoveError as exc:
        print(f"pyrepl3-kernel move: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"moved kernel {result['kernel_id']} from {result['from']} to {result['to']} "
        f"in {result['seconds']:.1f} s (the old kernel saved and stopped in "
        f"{result['stop_seconds']:.1f} s)"
    )
    return 0
