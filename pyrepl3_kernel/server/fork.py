"""``POST /api/pyrepl3/kernels/{kernel_id}/fork``: fork a live kernel.

The new kernel is started through the server's kernel manager, so
jupyter_server lists it under ``/api/kernels`` and JupyterLab can open a
console or notebook on it; its provisioner (``pyrepl3-pool``) asks the
manager daemon for a fork of the parent's lease instead of a pooled worker
(``PYREPL3_FORK_OF`` in the launch's environment). Only kernels hosted by
the daemon can be forked this way: a kernel started cold (``--no-pool``, or
a pooled launch that fell back) gets 409. See docs/fork.md and docs/rest.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from .proxy import forwarded
from .rest import Pyrepl3Handler

log = logging.getLogger("pyrepl3.server")

#: Daemon error codes and the HTTP status they become.
_STATUS = {"busy": 409, "unknown_lease": 409, "bad_request": 400, "fork_failed": 500}


class ForkHandler(Pyrepl3Handler):
    @web.authenticated
    @authorized
    @forwarded
    async def post(self, kernel_id: str) -> None:
        """A new kernel whose worker is a copy-on-write fork of this
        kernel's: 201 with ``{"id", "name", "forked_from", "report"}``; 404
        for an unknown kernel, 409 while it runs a cell or if it is not
        hosted by the daemon."""
        from ..daemon.client import DaemonError, DaemonUnavailable
        from ..provisioner import FORK_OF_ENV, PoolProvisioner

        self.json_body()  # no fields yet; bad JSON is still a 400
        km = self.kernel_manager
        if kernel_id not in km:
            raise web.HTTPError(404, f"no kernel with id {kernel_id!r}")
        parent: Any = km.get_kernel(kernel_id)
        provisioner = getattr(parent, "provisioner", None)
        lease_id = None
        if isinstance(provisioner, PoolProvisioner) and provisioner._fallback is None:
            lease_id = provisioner.lease_id
        if not lease_id:
            raise web.HTTPError(
                409,
                f"kernel {kernel_id} is not hosted by the pyrepl3 manager daemon (a --no-pool "
                "kernelspec, or a start that fell back to a cold kernel): only daemon-hosted "
                "kernels can be forked over REST",
            )
        env = {**os.environ, FORK_OF_ENV: lease_id}
        try:
            new_id = await km.start_kernel(kernel_name=parent.kernel_name, env=env)
        except DaemonError as exc:
            raise web.HTTPError(_STATUS.get(exc.code, 500), f"the fork failed: {exc}") from None
        except DaemonUnavailable as exc:
            raise web.HTTPError(503, f"the manager daemon is gone: {exc}") from None
        child: Any = km.get_kernel(new_id)
        report = getattr(child.provisioner, "fork_report", None) or {}
        self.set_header("Location", f"/api/kernels/{new_id}")
        self.write_json(
            {
                "id": new_id,
                "name": parent.kernel_name,
                "forked_from": kernel_id,
                "report": report,
            },
            status=201,
        )


_adopting = asyncio.Lock()


async def adopt_forks(km: Any) -> list[str]:
    """Register with ``km`` the kernels ``%fork`` made from its kernels (they
    run in the manager daemon; the daemon's ``forks`` op names them): each
    becomes a kernel of the server, listed under ``/api/kernels``, with its
    id, started by adopting its lease. Returns the ids registered."""
    from ..daemon.client import DaemonError, DaemonUnavailable
    from ..provisioner import ADOPT_ENV, PoolProvisioner

    clients = {}
    for kernel_id in list(getattr(km, "list_kernel_ids", list)()):
        with contextlib.suppress(Exception):
            provisioner = km.get_kernel(kernel_id).provisioner
            if isinstance(provisioner, PoolProvisioner) and provisioner.lease_id:
                client = provisioner._client()
                clients[os.fspath(client.paths.socket)] = (client, kernel_id)
    adopted: list[str] = []
    if not clients:
        return adopted
    async with _adopting:
        ours = set(km.list_kernel_ids())
        for client, _ in clients.values():
            try:
                reply = await asyncio.to_thread(client.call, "forks", 10.0)
            except (DaemonError, DaemonUnavailable) as exc:
                log.debug("pyrepl3: no forks from the daemon: %s", exc)
                continue
            for fork in reply.get("forks") or []:
                if fork.get("forked_from") not in ours or fork.get("kernel_id") in ours:
                    continue
                env = {**os.environ, ADOPT_ENV: str(fork["lease_id"])}
                try:
                    await km.start_kernel(
                        kernel_id=fork["kernel_id"], kernel_name=fork["kernel_name"], env=env
                    )
                except Exception as exc:
                    log.warning("pyrepl3: could not register fork %s: %s", fork["kernel_id"], exc)
                    continue
                adopted.append(fork["kernel_id"])
                ours.add(fork["kernel_id"])
    return adopted
