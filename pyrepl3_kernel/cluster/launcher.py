"""``python -m pyrepl3_kernel.cluster.launcher``: a PyREPL3 kernel started by
a gateway_provisioners provisioner (DistributedProvisioner over SSH, or the
Kubernetes and Docker provisioners, whose pods run the image's command).

Why a launcher of our own and not theirs (``launch_ipykernel.py`` with
``--kernel-class-name``): theirs embeds an ``IPKernelApp`` and takes an
ipykernel ``Kernel`` subclass, and PyREPL3's gateway is not one (it
supervises a worker process and outlives it). This module speaks the same
protocol (:mod:`.handshake`) around the same gateway that
``python -m pyrepl3_kernel`` runs, so the provisioner starts, polls,
signals, interrupts, restarts and shuts it down as it does an ipykernel.

What the provisioner's requests do here:

- SIGINT (an interrupt, ``interrupt_mode: signal``): the running cell is
  interrupted (escalated as a local kernel's);
- SIGTERM (``kill``/``terminate``, and a move): the kernel stops *keeping*
  its state: the last save is uploaded to the store, the record says the
  kernel stopped on purpose, and the next kernel of this id resumes it;
- shutdown_request (a shutdown or restart the user asked for): the kernel
  id's state is removed from the store, so a restart starts empty;
- SIGKILL, or the host gone: nothing runs here; the next kernel of this id
  resumes the last state the store has and says the host was lost.

Arguments come from the command line or, for container images whose pods
only get an environment, from ``KERNEL_ID``, ``RESPONSE_ADDRESS``,
``PUBLIC_KEY`` and ``PORT_RANGE`` (or their ``EG_`` forms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import uuid
from typing import Any

from .handshake import Listener, encrypt_payload, parse_port_range, send_connection_info
from .statestore import StateMirror, StateStoreError, describe_error

log = logging.getLogger("pyrepl3.cluster")


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        log.warning("%s is not a number of seconds; using %g", name, default)
        return default
    return value if value > 0 else default


#: How long a kernel waits for its state from the store before it starts
#: without it (a store that does not answer must not keep it from starting).
RESUME_TIMEOUT = _seconds("PYREPL3_STATE_RESUME_TIMEOUT", 600.0)


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def kernel_ip(explicit: str | None = None) -> str:
    """The address to bind the kernel's ports on: ``--ip``, else
    ``PYREPL3_KERNEL_IP``, else the address the SSH connection that started
    us came in on (the one the provisioner will connect to), else all."""
    if explicit:
        return explicit
    configured = os.environ.get("PYREPL3_KERNEL_IP")
    if configured:
        return configured
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    if len(ssh) == 4:
        return ssh[2]
    return "0.0.0.0"  # noqa: S104 (a pod: the server connects to the pod's IP)


def _working_dir() -> None:
    """``KERNEL_WORKING_DIR`` (the notebook's directory, which pods get) when
    it exists on this host, else ``PYREPL3_WORKING_DIR`` (the host's)."""
    for name in ("KERNEL_WORKING_DIR", "PYREPL3_WORKING_DIR"):
        path = os.environ.get(name)
        if path and os.path.isdir(path):
            os.chdir(path)
            return


class RemoteKernel:
    """One gateway, its comm-port listener and its state mirror."""

    def __init__(self, kernel_id: str, ip: str, port_range: tuple[int, int]) -> None:
        self.kernel_id = kernel_id
        self.ip = ip
        self.port_range = port_range
        self.here = f"{socket.gethostname()} ({ip})"
        self.done = asyncio.Event()
        self.keep_state = True
        self.mirror: StateMirror | None = None
        self.gateway: Any = None

    def _ports(self) -> dict[str, Any]:
        """The kernel's ports, chosen before the gateway binds them: the
        server gets them at once, and the kernel fetches its state while the
        server connects (ZMQ retries until the ports are bound)."""
        from .handshake import bind_in_range

        low, high = self.port_range
        info: dict[str, Any] = {"ip": self.ip, "transport": "tcp", "key": uuid.uuid4().hex}
        for channel in ("shell", "iopub", "stdin", "control", "hb"):
            sock = bind_in_range(self.ip, low, high)
            info[f"{channel}_port"] = sock.getsockname()[1]
            sock.close()
        return info

    def _resume(self, local_dir: str) -> str | None:
        """Fetch this kernel id's state from the store; the note for the
        first cell after the resume (None: nothing to resume)."""
        assert self.mirror is not None
        try:
            resumed = self.mirror.restore_into()
        except StateStoreError as exc:
            log.error("%s", exc)
            # What the store holds may be a state this kernel could not read:
            # it must not be overwritten by this kernel's new one.
            self.mirror.hold(f"the saved state could not be read, and is left as it is: {exc}")
            self.mirror.first_note = f"pyrepl3: {exc}; this kernel started without it\n"
            return None
        if resumed is None:
            return None
        log.info(
            "resumed kernel %s: %d files, %d bytes in %.2f s",
            self.kernel_id,
            resumed.files,
            resumed.bytes,
            resumed.seconds,
        )
        return resumed.lost_note(self.here)

    async def serve(self, response_address: str, public_key: str) -> None:
        from ..gateway.kernel import JupyterGateway
        from ..session.supervised import default_autosave_dir

        loop = asyncio.get_running_loop()
        local_dir = default_autosave_dir(self.kernel_id)
        observer: Any = None
        if local_dir is not None:
            try:
                self.mirror = observer = StateMirror.from_env(
                    self.kernel_id, local_dir, host=self.here
                )
            except StateStoreError as exc:
                log.error("state store: %s", exc)
                observer = _OnceNote(f"pyrepl3: the state is NOT being saved: {exc}\n")
        self.gateway = gateway = JupyterGateway(
            self._ports(),
            kernel_id=self.kernel_id,
            autosave_dir=local_dir or "",
            on_shutdown=self._on_shutdown_request,
        )
        gateway.session.cell_observer = observer
        loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(gateway.interrupt()))
        loop.add_signal_handler(signal.SIGTERM, self.done.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the SSH session ending
        listener = Listener(
            self.ip if self.ip != "0.0.0.0" else "",  # noqa: S104
            self.port_range,
        )
        info = dict(gateway.connection_info)
        key = info["key"]
        info["key"] = key.decode() if isinstance(key, bytes) else key
        info.update(
            pid=os.getpid(),
            pgid=os.getpgid(0),
            comm_port=listener.port,
            kernel_id=self.kernel_id,
        )
        listener.start()
        started = False
        try:
            # The connection info goes out first: fetching a large state must
            # not run into the provisioner's launch timeout.
            await loop.run_in_executor(
                None, send_connection_info, response_address, encrypt_payload(info, public_key)
            )
            if self.mirror is not None and local_dir is not None:
                try:
                    resume_note = await asyncio.wait_for(
                        loop.run_in_executor(None, self._resume, local_dir), RESUME_TIMEOUT
                    )
                except asyncio.TimeoutError:
                    resume_note = None
                    self.mirror.abandon_restore()
                    why = f"the saved state could not be fetched within {RESUME_TIMEOUT:g} s"
                    log.error("%s from %s", why, self.mirror.public)
                    self.mirror.hold(f"{why}, and is left as it is")
                    self.mirror.first_note = (
                        f"pyrepl3: {why} from {self.mirror.public}; this kernel started "
                        "without it (PYREPL3_STATE_RESUME_TIMEOUT)\n"
                    )
                if resume_note is not None:
                    gateway.session.resume = resume_note
                with contextlib.suppress(asyncio.TimeoutError):  # said by the next look
                    await asyncio.wait_for(loop.run_in_executor(None, self.mirror.check), 30)
            if not self.done.is_set():
                await gateway.start()
                started = True
                if self.mirror is not None:
                    self.mirror.start()
            await self.done.wait()
        finally:
            # The listener answers the provisioner's polls until the state is
            # uploaded: a move starts the next kernel only once this one is gone.
            try:
                if started:
                    await self._stop()
            finally:
                listener.close()

    def _on_shutdown_request(self, restart: bool) -> None:
        # A shutdown or restart the user asked for: the state goes with it.
        self.keep_state = False
        self.done.set()

    async def _stop(self) -> None:
        gateway, mirror = self.gateway, self.mirror
        loop = asyncio.get_running_loop()
        if mirror is None:
            await gateway.stop()
            return
        if self.keep_state:
            # The worker's last save finishes before it exits; upload it
            # before the gateway removes the local directory.
            await gateway.session.release_worker()
            mirror.stop()
            if not await loop.run_in_executor(None, mirror.wait_for_writers, 120.0):
                log.error("the last save into %s did not finish in 120 s", mirror.local_dir)
            ok = await loop.run_in_executor(None, mirror.flush, 60.0)
            if ok:
                await loop.run_in_executor(None, mirror.mark_stopped)
            else:
                log.error(
                    "the last state could not be saved to %s: %s", mirror.public, mirror.failure
                )
            await gateway.stop()
        else:
            await loop.run_in_executor(None, mirror.clear)
            await gateway.stop()


class _OnceNote:
    """A cell observer that says one thing, in the first cell's output."""

    def __init__(self, text: str) -> None:
        self.text: str | None = text

    def cell_started(self, cell_id: str, code: str) -> None:
        pass

    def cell_finished(self) -> str | None:
        text, self.text = self.text, None
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pyrepl3_kernel.cluster.launcher",
        description="Run a PyREPL3 kernel for a gateway_provisioners provisioner.",
    )
    parser.add_argument("--kernel-id", default=_env("KERNEL_ID"))
    parser.add_argument(
        "--response-address", default=_env("RESPONSE_ADDRESS", "EG_RESPONSE_ADDRESS")
    )
    parser.add_argument("--public-key", default=_env("PUBLIC_KEY", "EG_PUBLIC_KEY"))
    parser.add_argument("--port-range", default=_env("PORT_RANGE", "EG_PORT_RANGE"))
    parser.add_argument(
        "--transport-encryption",
        default=None,
        help="only 'disabled' (or empty) is supported: PyREPL3 does not encrypt ZMQ",
    )
    parser.add_argument("--ip", default=None, help="address to bind the kernel's ports on")
    parser.add_argument("--log-level", default=os.environ.get("PYREPL3_LOG_LEVEL", "INFO"))
    args, _ignored = parser.parse_known_args(argv)  # their launchers' options (spark, ...)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="[pyrepl3 %(name)s %(asctime)s] %(levelname)s %(message)s",
    )
    for name in ("kernel_id", "response_address", "public_key"):
        value = getattr(args, name)
        if not value or value.startswith("{"):
            parser.error(f"--{name.replace('_', '-')} is required (or its environment variable)")
    policy = (args.transport_encryption or "").strip().lower()
    if policy == "required":
        parser.error("transport encryption 'required': PyREPL3 kernels do not support CurveZMQ")
    try:
        port_range = parse_port_range(args.port_range)
    except ValueError as exc:
        parser.error(str(exc))
    _working_dir()
    kernel = RemoteKernel(args.kernel_id, kernel_ip(args.ip), port_range)
    try:
        asyncio.run(kernel.serve(args.response_address, args.public_key))
    except OSError as exc:
        log.error(
            "could not reach the server at %s: %s", args.response_address, describe_error(exc)
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
