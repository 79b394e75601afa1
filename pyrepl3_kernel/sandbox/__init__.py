"""Sandboxed sessions: a worker inside bubblewrap (own PID, mount, IPC, UTS
and network namespaces; the system read-only; its working directory, a
private /tmp and its own store writable; cgroup limits; a seccomp filter).
See docs/security.md."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .launch import SandboxLaunch
from .profile import ENV_VAR, LAUNCH_ENV_VAR, Profile, SandboxError
from .stores import adopt_store, discard_store

__all__ = [
    "ENV_VAR",
    "LAUNCH_ENV_VAR",
    "Profile",
    "SandboxError",
    "SandboxLaunch",
    "adopt_store",
    "check_configure",
    "discard_store",
]


def check_configure(
    profile: Profile | None,
    launch: SandboxLaunch | None,
    cwd: str | None,
    env: Mapping[str, str] | None,
) -> None:
    """SandboxError if a started worker (of ``profile``, sandboxed by
    ``launch``) cannot serve a launch with ``cwd`` and ``env``: a launch
    that asks for another sandbox (or one where the worker has none), or a
    working directory the worker's sandbox does not show writable. A warm
    worker is never handed to a launch it does not fit."""
    wanted = Profile.from_env(env) if env is not None else profile
    if wanted != profile:
        have = "no sandbox" if profile is None else f"sandbox {profile.to_json()}"
        want = "no sandbox" if wanted is None else f"sandbox {wanted.to_json()}"
        raise SandboxError(
            f"this worker was started with {have}; the launch asks for {want}: it needs a "
            "worker started for it"
        )
    if launch is None or cwd is None:
        return
    target = os.path.realpath(cwd)
    shown = [launch.cwd, *launch.profile.writable]
    if not any(_within(target, os.path.realpath(p)) for p in shown):
        raise SandboxError(
            f"this sandboxed worker shows {launch.cwd!r} as its working directory; a launch "
            f"in {cwd!r} needs a worker started there"
        )


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def cli_profile_env(spec: str | None, options: list[str]) -> tuple[str, str]:
    """``(PYREPL3_SANDBOX, profile JSON)`` for a kernelspec's ``env``;
    SandboxError for a profile that cannot be used here (bubblewrap missing
    included: the spec's kernels would not start)."""
    from .launch import bwrap_path
    from .profile import profile_from_cli

    profile = profile_from_cli(spec, options)
    bwrap_path(profile)
    return ENV_VAR, profile.to_json()


def pool_cwd(env: Mapping[str, str], cwd: str | None) -> str | None:
    """The working directory warm workers for a launch with ``env`` and
    ``cwd`` must be started in: None unless the launch is sandboxed (a
    sandbox shows its working directory from its start)."""
    if Profile.from_env(env) is None:
        return None
    return os.path.abspath(cwd or os.getcwd())
