"""``POST /api/pyrepl3/kernels/{kernel_id}/fork``: fork a live kernel.

The new kernel is started through the server's kernel manager, so
jupyter_server lists it under ``/api/kernels`` and JupyterLab can open a
console or notebook on it; its provisioner (``pyrepl3-pool``) asks the
manager daemon for a fork of the parent's lease instead of a pooled worker
(``PYREPL3_FORK_OF`` in the launch's environment). A standalone pyrepl3
kernel (``--no-pool``, or a pooled launch that fell back to a cold start) is
asked on its control channel (``pyrepl3_fork_request``): it hands its fork
to the manager daemon, and the server registers that kernel as it does a
``%fork`` kernel (its provisioner, ``pyrepl3-pool`` whatever the parent's
kernelspec names, adopts the daemon's lease). See docs/fork.md and
docs/rest.md.
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
            # A standalone kernel: it hands its fork to the daemon itself.
            # Not listed by adopt_forks meanwhile: it registers the fork here.
            async with _adopting:
                fork = await fork_standalone(kernel_id, parent)
                new_id = await register_fork(km, fork["kernel_id"], parent.kernel_name, fork)
            report = fork.get("report") or {}
        else:
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


#: How long a standalone kernel may take to answer its fork request (it may
#: start the daemon first).
FORK_REQUEST_TIMEOUT_S = 90.0
#: The standalone kernel's answers and the HTTP status they become.
_REASON_STATUS = {"busy": 409, "no_host": 409, "failed": 500}


def is_pyrepl3_spec(spec: Any) -> bool:
    """The kernelspec runs a pyrepl3 kernel (``-m pyrepl3_kernel``)."""
    argv = list(getattr(spec, "argv", None) or [])
    return any(arg == "pyrepl3_kernel" or arg.startswith("pyrepl3_kernel.") for arg in argv)


async def fork_standalone(kernel_id: str, parent: Any) -> dict[str, Any]:
    """Ask the standalone kernel ``parent`` to fork (its control channel:
    ``pyrepl3_fork_request``); what it answers about the new kernel (a lease
    of the manager daemon). HTTP errors: 409 while it runs a cell or if it
    is not a pyrepl3 kernel, 500 if the fork failed, 504 with no answer."""
    from ..gateway.fork_magic import FORK_REPLY, FORK_REQUEST

    if not is_pyrepl3_spec(getattr(parent, "kernel_spec", None)):
        raise web.HTTPError(
            409, f"kernel {kernel_id} is not a pyrepl3 kernel: only pyrepl3 kernels can be forked"
        )
    from jupyter_client.session import Session

    # A session (and so a socket identity) of its own: the kernel manager's
    # is the REST bridge's too, and the kernel's ROUTER sockets hand an
    # identity over to its newest peer (this client's, gone after the fork).
    own = Session(key=parent.session.key, signature_scheme=parent.session.signature_scheme)
    client = parent.client(session=own)
    client.start_channels(shell=False, iopub=False, stdin=False, hb=False, control=True)
    try:
        request = client.session.msg(FORK_REQUEST, {})
        client.control_channel.send(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FORK_REQUEST_TIMEOUT_S
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise web.HTTPError(504, f"kernel {kernel_id} did not answer its fork request")
            try:
                reply = await client.get_control_msg(timeout=remaining)
            except Exception:  # queue.Empty: timed out
                continue
            if reply.get("parent_header", {}).get("msg_id") == request["header"]["msg_id"]:
                break
    finally:
        client.stop_channels()
    content = reply.get("content") or {}
    if reply.get("msg_type") != FORK_REPLY:
        raise web.HTTPError(
            409,
            f"kernel {kernel_id} cannot fork (it does not know {FORK_REQUEST}: an older pyrepl3?)",
        )
    if content.get("status") != "ok":
        status = _REASON_STATUS.get(str(content.get("reason")), 500)
        raise web.HTTPError(status, str(content.get("evalue") or "the fork failed"))
    return dict(content)


#: Kernel ids being registered -> the kernelspec their manager must use.
_spec_overrides: dict[str, Any] = {}


def _pool_spec(spec: Any) -> Any:
    """``spec`` with the ``pyrepl3-pool`` provisioner: what registers a
    running lease of the daemon (adopting it) whatever the parent's
    kernelspec names (a ``--no-pool`` one has none)."""
    from jupyter_client.kernelspec import KernelSpec

    fields = spec.to_dict()
    metadata = dict(fields.get("metadata") or {})
    provisioner = metadata.get("kernel_provisioner") or {}
    if provisioner.get("provisioner_name") == "pyrepl3-pool":
        return spec
    metadata["kernel_provisioner"] = {"provisioner_name": "pyrepl3-pool", "config": {}}
    fields["metadata"] = metadata
    return KernelSpec(resource_dir=spec.resource_dir, **fields)


def _honour_spec_overrides(km: Any) -> None:
    """Have ``km``'s kernel managers of the ids in :data:`_spec_overrides`
    use that kernelspec (once per kernel manager): jupyter_client takes the
    provisioner from the kernelspec of the kernel's name."""
    if getattr(km, "_pyrepl3_spec_overrides", False):
        return
    original = km.kernel_manager_factory

    def factory(*args: Any, **kwargs: Any) -> Any:
        manager = original(*args, **kwargs)
        name = os.path.basename(str(kwargs.get("connection_file") or ""))
        if name.startswith("kernel-") and name.endswith(".json"):
            spec = _spec_overrides.get(name[len("kernel-") : -len(".json")])
            if spec is not None:
                manager._kernel_spec = spec
        return manager

    km.kernel_manager_factory = factory
    km._pyrepl3_spec_overrides = True


async def register_fork(km: Any, kernel_id: str, kernel_name: str, fork: dict[str, Any]) -> str:
    """Register the running lease ``fork["lease_id"]`` of the manager daemon
    (a fork) with ``km`` as kernel ``kernel_id``: started by adopting the
    lease, through ``pyrepl3-pool`` even if ``kernel_name``'s kernelspec has
    no provisioner. If that fails, the lease is ended (nothing is left)."""

    lease_id = str(fork["lease_id"])
    try:
        return await _start_adopting(km, kernel_id, kernel_name, lease_id)
    except Exception as exc:
        await asyncio.to_thread(_end_lease, lease_id)
        raise web.HTTPError(500, f"the fork could not be registered: {exc}") from None


async def _start_adopting(km: Any, kernel_id: str, kernel_name: str, lease_id: str) -> str:
    from ..provisioner import ADOPT_ENV

    try:
        spec = km.kernel_spec_manager.get_kernel_spec(kernel_name)
        _spec_overrides[kernel_id] = _pool_spec(spec)
        _honour_spec_overrides(km)
        env = {**os.environ, ADOPT_ENV: lease_id}
        return str(await km.start_kernel(kernel_id=kernel_id, kernel_name=kernel_name, env=env))
    finally:
        _spec_overrides.pop(kernel_id, None)


def _end_lease(lease_id: str) -> None:
    from ..daemon.client import DaemonClient, DaemonError, DaemonUnavailable
    from ..gateway.fork_magic import default_daemon_paths

    with contextlib.suppress(DaemonError, DaemonUnavailable, OSError):
        DaemonClient(default_daemon_paths()).call("release", timeout=30.0, lease_id=lease_id)


_adopting = asyncio.Lock()


async def adopt_forks(km: Any) -> list[str]:
    """Register with ``km`` the kernels ``%fork`` made from its kernels (they
    run in the manager daemon; the daemon's ``forks`` op names them): each
    becomes a kernel of the server, listed under ``/api/kernels``, with its
    id, started by adopting its lease. Returns the ids registered."""
    from ..daemon.client import DaemonClient, DaemonError, DaemonUnavailable
    from ..gateway.fork_magic import default_daemon_paths
    from ..provisioner import PoolProvisioner

    clients = {}
    standalone = False
    for kernel_id in list(getattr(km, "list_kernel_ids", list)()):
        with contextlib.suppress(Exception):
            kernel = km.get_kernel(kernel_id)
            provisioner = kernel.provisioner
            if isinstance(provisioner, PoolProvisioner) and provisioner.lease_id:
                client = provisioner._client()
                clients[os.fspath(client.paths.socket)] = (client, kernel_id)
            elif is_pyrepl3_spec(kernel.kernel_spec):
                standalone = True  # its forks are hosted by the default daemon
    if standalone:
        client = DaemonClient(default_daemon_paths())
        clients.setdefault(os.fspath(client.paths.socket), (client, ""))
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
                try:
                    await _start_adopting(
                        km, fork["kernel_id"], fork["kernel_name"], str(fork["lease_id"])
                    )
                except Exception as exc:
                    log.warning("pyrepl3: could not register fork %s: %s", fork["kernel_id"], exc)
                    continue
                adopted.append(fork["kernel_id"])
                ours.add(fork["kernel_id"])
    return adopted
