"""Kernelspecs that start PyREPL3 through gateway_provisioners: over SSH
(``distributed-provisioner``) and in containers (``kubernetes-provisioner``,
``docker-provisioner``).

Every one runs the same launch command, :mod:`.launcher`, with the
placeholders the provisioner fills in (``{kernel_id}``,
``{response_address}``, ``{public_key}``, ``{port_range}``). For the
container provisioners the command is the image's (see ``docker/Dockerfile``):
their pods get those values as ``KERNEL_ID``, ``RESPONSE_ADDRESS``, ...
and the kernelspec's ``argv`` runs gateway_provisioners' own pod/container
launcher on the server's side.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

DISPLAY_NAME = "PyREPL3"

PROVISIONERS = {
    "ssh": "distributed-provisioner",
    "kubernetes": "kubernetes-provisioner",
    "docker": "docker-provisioner",
}
#: The image built from docker/Dockerfile.
DEFAULT_IMAGE = "pyrepl3-kernel:latest"


def launch_argv(python: str | None = None) -> list[str]:
    """The launcher's command line, with the provisioner's placeholders."""
    return [
        python or sys.executable,
        "-m",
        "pyrepl3_kernel.cluster.launcher",
        "--kernel-id",
        "{kernel_id}",
        "--port-range",
        "{port_range}",
        "--response-address",
        "{response_address}",
        "--public-key",
        "{public_key}",
    ]


def _base(display_name: str, env: Mapping[str, str] | None) -> dict[str, Any]:
    return {
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "env": dict(env or {}),
        "metadata": {},
    }


def distributed_kernelspec(
    *,
    python: str | None = None,
    remote_hosts: Sequence[str] = (),
    load_balancing: str | None = None,
    env: Mapping[str, str] | None = None,
    display_name: str | None = None,
    launch_timeout: int | None = None,
) -> dict[str, Any]:
    """A kernelspec for DistributedProvisioner (``python`` is the
    interpreter on the hosts, where pyrepl3-kernel must be installed)."""
    spec = _base(display_name or f"{DISPLAY_NAME} (SSH)", env)
    config: dict[str, Any] = {}
    if remote_hosts:
        config["remote_hosts"] = list(remote_hosts)
    if load_balancing:
        config["load_balancing_algorithm"] = load_balancing
    if launch_timeout:
        config["launch_timeout"] = launch_timeout
    spec["metadata"]["kernel_provisioner"] = {
        "provisioner_name": PROVISIONERS["ssh"],
        "config": config,
    }
    spec["argv"] = launch_argv(python)
    return spec


def container_kernelspec(
    kind: str,
    *,
    image: str = DEFAULT_IMAGE,
    env: Mapping[str, str] | None = None,
    display_name: str | None = None,
) -> dict[str, Any]:
    """A kernelspec for the Kubernetes or Docker provisioner: the server runs
    gateway_provisioners' container launcher, which starts ``image``; the
    image's command is :mod:`.launcher`."""
    if kind not in ("kubernetes", "docker"):
        raise ValueError(f"unknown container provisioner {kind!r}: use kubernetes or docker")
    import gateway_provisioners

    launchers = os.path.join(os.path.dirname(gateway_provisioners.__file__), "kernel-launchers")
    script = (
        os.path.join(launchers, "kubernetes", "scripts", "launch_kubernetes.py")
        if kind == "kubernetes"
        else os.path.join(launchers, "docker", "scripts", "launch_docker.py")
    )
    spec = _base(display_name or f"{DISPLAY_NAME} ({kind.capitalize()})", env)
    spec["metadata"]["kernel_provisioner"] = {
        "provisioner_name": PROVISIONERS[kind],
        "config": {"image_name": image},
    }
    spec["argv"] = [
        sys.executable,  # the server's: it runs gateway_provisioners' launcher
        script,
        "--kernel-id",
        "{kernel_id}",
        "--port-range",
        "{port_range}",
        "--response-address",
        "{response_address}",
        "--public-key",
        "{public_key}",
    ]
    return spec


def validate(spec: dict[str, Any]) -> list[str]:
    """What is wrong with ``spec`` for gateway_provisioners (empty: nothing).

    The checks are the ones the server makes when it starts a kernel: the
    provisioner is registered, its ``config`` is accepted by the
    provisioner's traits (types and validators), and every placeholder of
    ``argv`` is one the provisioner fills in."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    problems: list[str] = []
    try:
        kspec = KernelSpec(resource_dir="", **spec)
    except Exception as exc:
        return [f"not a kernelspec: {exc}"]
    prov = spec.get("metadata", {}).get("kernel_provisioner", {})
    name = prov.get("provisioner_name")
    factory = KernelProvisionerFactory.instance()
    if not factory.is_provisioner_available(kspec):
        return [f"provisioner {name!r} is not installed (pip install gateway_provisioners)"]
    # The class's traits check the config's names and values without an
    # instance: the container provisioners' constructors need a Kubernetes
    # client or a Docker daemon.
    try:
        from importlib.metadata import entry_points

        (entry,) = entry_points(group="jupyter_client.kernel_provisioners", name=name)
        cls: Any = entry.load()
    except Exception:
        if name not in (PROVISIONERS["kubernetes"], PROVISIONERS["docker"]):
            raise
        # gateway_provisioners.k8s reads the in-cluster configuration when it
        # is imported: outside a cluster, the base of both container
        # provisioners holds their settings.
        from gateway_provisioners.container import ContainerProvisionerBase

        cls = ContainerProvisionerBase
    traits = cls.class_traits(config=True)
    for key, value in prov.get("config", {}).items():
        if key not in traits:
            problems.append(f"provisioner {name!r} has no setting {key!r}")
            continue
        try:
            traits[key].validate(None, value)
        except Exception as exc:
            problems.append(f"provisioner {name!r}: bad {key!r}: {exc}")
    known = {"{kernel_id}", "{response_address}", "{public_key}", "{port_range}"}
    known |= {"{transport_encryption}", "{connection_file}"}
    for arg in spec.get("argv", []):
        if arg.startswith("{") and arg.endswith("}") and arg not in known:
            problems.append(f"argv placeholder {arg} is not filled in by the provisioner")
    return problems


def install(
    provisioner: str,
    *,
    name: str,
    user: bool,
    prefix: str | None,
    remote_hosts: Sequence[str] = (),
    image: str = DEFAULT_IMAGE,
    state_url: str | None = None,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Install a provisioner kernelspec named ``name``; returns its directory."""
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager

    all_env = dict(env or {})
    if state_url:
        all_env["PYREPL3_STATE_URL"] = state_url
    if provisioner == "ssh":
        spec = distributed_kernelspec(python=python, remote_hosts=remote_hosts, env=all_env)
    else:
        spec = container_kernelspec(provisioner, image=image, env=all_env)
    problems = validate(spec)
    if problems:
        raise ValueError("; ".join(problems))
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(spec, f, indent=1)
        return str(KernelSpecManager().install_kernel_spec(tmp, name, user=user, prefix=prefix))


def install_from_cli(args: Any, default_name: str, default_display: str) -> int:
    """``pyrepl3-kernel install --provisioner ...`` (cli.py hands over here)."""
    kind = args.provisioner
    name = args.name if args.name != default_name else f"{default_name}_{kind}"
    env = dict(args.env)
    if args.state_url:
        env["PYREPL3_STATE_URL"] = args.state_url
    if kind == "ssh":
        if args.image:
            return _cli_error("--image is for --provisioner kubernetes or docker")
        spec = distributed_kernelspec(
            python=args.python, remote_hosts=args.remote_hosts or (), env=env
        )
    else:
        if args.remote_hosts:
            return _cli_error("--remote-hosts is for --provisioner ssh")
        spec = container_kernelspec(kind, image=args.image or DEFAULT_IMAGE, env=env)
    if args.display_name != default_display:
        spec["display_name"] = args.display_name
    if args.pool_size is not None or args.warmup_code is not None:
        return _cli_error("--pool-size and --warmup-code are for local kernels (no --provisioner)")
    if getattr(args, "sandbox", None) or getattr(args, "sandbox_option", None):
        return _cli_error("--sandbox is for local kernels (no --provisioner)")
    problems = validate(spec)
    if problems:
        return _cli_error("the kernelspec would not start: " + "; ".join(problems))
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager

    prefix = sys.prefix if args.sys_prefix else args.prefix
    with tempfile.TemporaryDirectory(prefix="pyrepl3-kernelspec-") as tmp:
        os.chmod(tmp, 0o755)
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(spec, f, indent=1)
        try:
            dest = KernelSpecManager().install_kernel_spec(
                tmp, kernel_name=name, user=args.user, prefix=prefix
            )
        except (ValueError, OSError) as exc:
            return _cli_error(str(exc))
    print(
        f"Installed kernel spec {name.lower()!r} ({spec['display_name']}, "
        f"{PROVISIONERS[kind]}) in {dest}"
    )
    if "PYREPL3_STATE_URL" not in env:
        print(
            "pyrepl3-kernel: note: no --state-url: a kernel whose host is lost loses its state",
            file=sys.stderr,
        )
    return 0


def _cli_error(text: str) -> int:
    print(f"pyrepl3-kernel install: error: {text}", file=sys.stderr)
    return 2
