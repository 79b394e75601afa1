"""A sandbox profile: what a sandboxed worker may see, write and use.

A profile is plain data (a :class:`Profile`), written as a JSON object in a
kernelspec's ``env`` (``PYREPL3_SANDBOX``), in a launch's environment
(``KERNEL_PYREPL3_SANDBOX``, which jupyter_server passes on from
``POST /api/kernels``), or given to ``Session``/``PoolConfig`` as a
``Profile``, a mapping or ``True`` (the defaults). It is validated where it
is given (install, session, kernel start): an unknown option, a bad value or
a path that does not exist is a :class:`SandboxError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import Pyrepl3Error
from ..units import format_size, parse_size

#: The kernelspec's (or a shell's) variable: the profile as JSON, or ``1``.
ENV_VAR = "PYREPL3_SANDBOX"
#: The same from a launch (jupyter_server passes ``KERNEL_*`` variables of a
#: REST-created kernel on). A kernelspec's profile wins: a launch can put a
#: kernel into a sandbox, never take it out of its kernelspec's.
LAUNCH_ENV_VAR = "KERNEL_PYREPL3_SANDBOX"
#: What ``network`` may be: ``none`` (no network sockets at all: no
#: ``AF_INET``/``AF_INET6`` socket can be made) or ``loopback`` (a private
#: loopback interface, shared with nothing outside the sandbox).
NETWORKS = ("none", "loopback")
#: What ``limits`` may be: ``auto`` (cgroups where they can be made, else
#: rlimits, with a warning), ``cgroup`` (refuse to start without cgroups),
#: ``rlimit`` (per-process resource limits only).
LIMIT_MODES = ("auto", "cgroup", "rlimit")


class SandboxError(Pyrepl3Error, ValueError):
    """A sandbox profile that cannot be used, or a sandbox that cannot start."""


@dataclass(frozen=True)
class Profile:
    """What a sandboxed worker gets. Paths are host paths, each shown at the
    same path inside the sandbox."""

    #: ``none`` or ``loopback`` (see :data:`NETWORKS`).
    network: str = "none"
    #: Extra paths shown read-only (the system, the interpreter and this
    #: package always are).
    read_only: tuple[str, ...] = ()
    #: Extra paths shown writable (the working directory and a private
    #: ``/tmp`` always are).
    writable: tuple[str, ...] = ()
    #: Memory of the whole sandbox (bytes), processes in it, and CPUs
    #: (``1.5``: one and a half cores' time).
    memory: int = 2 * 1024**3
    processes: int = 256
    cpus: float = 1.0
    #: Size of the private ``/tmp`` (a tmpfs, counted in ``memory``).
    tmp_size: int = 512 * 1024**2
    #: The seccomp filter (ptrace, mount, keyctl, bpf, modules, reboot, new
    #: namespaces, ...); off only where it cannot be loaded.
    seccomp: bool = True
    #: See :data:`LIMIT_MODES`.
    limits: str = "auto"
    #: Host directory for named checkpoints, shared by every session of this
    #: profile; without it a sandboxed session keeps them in its own store,
    #: which ends with the session.
    checkpoints: str | None = None
    #: Where the per-worker stores live (autosave, checkpoints); default:
    #: ``<Jupyter runtime dir>/pyrepl3-sandbox``.
    store_root: str | None = None
    #: The bubblewrap program.
    bwrap: str = "bwrap"

    # -- reading --------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Profile:
        """A profile from ``{"network": "loopback", "memory": "1G", ...}``;
        SandboxError names an unknown option or a bad value."""
        if not isinstance(data, Mapping):
            raise SandboxError(f"a sandbox profile is a JSON object, not {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SandboxError(
                f"unknown sandbox option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))} (known: {', '.join(known)})"
            )
        values: dict[str, Any] = {}
        for name, value in data.items():
            values[name] = _convert(name, value)
        profile = cls(**values)
        profile.check()
        return profile

    @classmethod
    def coerce(cls, given: Profile | Mapping[str, Any] | bool | str | None) -> Profile | None:
        """``True``/``"1"``: the defaults; a mapping or JSON text: those
        options; ``None``/``False``/``""``/``"0"``: no sandbox."""
        if given is None or given is False:
            return None
        if isinstance(given, Profile):
            given.check()
            return given
        if given is True:
            return cls.from_mapping({})
        if isinstance(given, str):
            text = given.strip()
            if text in ("", "0"):
                return None
            if text == "1":
                return cls.from_mapping({})
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise SandboxError(f"the sandbox profile is not JSON: {exc}") from None
            return cls.from_mapping(data)
        return cls.from_mapping(given)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Profile | None:
        """The profile a kernel's environment asks for, if any
        (:data:`ENV_VAR`, else :data:`LAUNCH_ENV_VAR`)."""
        for name in (ENV_VAR, LAUNCH_ENV_VAR):
            raw = env.get(name)
            if raw and raw.strip() not in ("", "0"):
                try:
                    return cls.coerce(raw)
                except SandboxError as exc:
                    raise SandboxError(f"{name}: {exc}") from None
        return None

    # -- writing --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from the defaults (what :meth:`to_json`
        writes)."""
        default = Profile()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True) if self.to_dict() else "1"

    def describe(self) -> dict[str, Any]:
        """The profile as a health report or ``status`` shows it."""
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "memory_text": format_size(self.memory),
        }

    # -- checking -------------------------------------------------------------

    def check(self) -> None:
        """SandboxError for a value or path that cannot be used."""
        if self.network not in NETWORKS:
            raise SandboxError(
                f"sandbox network {self.network!r}: use one of {', '.join(NETWORKS)}"
            )
        if self.limits not in LIMIT_MODES:
            raise SandboxError(
                f"sandbox limits {self.limits!r}: use one of {', '.join(LIMIT_MODES)}"
            )
        if self.memory < 64 * 1024**2:
            raise SandboxError(f"sandbox memory {format_size(self.memory)}: at least 64M")
        if self.processes < 8:
            raise SandboxError(f"sandbox processes {self.processes}: at least 8")
        if not 0.01 <= self.cpus <= 1024:
            raise SandboxError(f"sandbox cpus {self.cpus:g}: between 0.01 and 1024")
        for kind, paths in (("read_only", self.read_only), ("writable", self.writable)):
            for path in paths:
                if not os.path.isabs(path):
                    raise SandboxError(f"sandbox {kind} path {path!r} is not absolute")
                if not os.path.exists(path):
                    raise SandboxError(f"sandbox {kind} path {path!r} does not exist")
        if self.checkpoints is not None:
            if not os.path.isabs(self.checkpoints) or not os.path.isdir(self.checkpoints):
                raise SandboxError(
                    f"sandbox checkpoints {self.checkpoints!r} is not an existing "
                    "absolute directory"
                )


def _convert(name: str, value: Any) -> Any:
    """One option's value as the profile holds it; SandboxError if wrong."""
    try:
        if name in ("read_only", "writable"):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError("a list of paths")
            return tuple(os.path.normpath(v) for v in value)
        if name in ("memory", "tmp_size"):
            if isinstance(value, bool):
                raise TypeError("a size such as 512M")
            return parse_size(value) if isinstance(value, str) else int(value)
        if name == "processes":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TypeError("a whole number")
            return int(value)
        if name == "cpus":
            if isinstance(value, bool):
                raise TypeError("a number")
            return float(value)
        if name == "seccomp":
            if not isinstance(value, bool):
                raise TypeError("true or false")
            return value
        if name in ("checkpoints", "store_root"):
            if value is None:
                return None
            if not isinstance(value, str):
                raise TypeError("a path")
            return os.path.normpath(value)
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    except (TypeError, ValueError) as exc:
        raise SandboxError(f"sandbox option {name!r}: {value!r} is not {_what(exc)}") from None


def _what(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, TypeError):
        return text
    return "valid: " + text


def profile_from_cli(spec: str | None, options: list[str]) -> Profile:
    """The profile ``install --sandbox [PROFILE] [--sandbox-option K=V ...]``
    asks for: PROFILE is a JSON object or a JSON file's path (none: the
    defaults); each option's value is read as JSON where it is JSON
    (``["/data"]``, ``1.5``), else as text (``512M``, ``loopback``)."""
    data: dict[str, Any] = {}
    text = (spec or "").strip()
    if text and text != "1":
        if not text.startswith("{"):
            try:
                with open(os.path.expanduser(text), encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise SandboxError(
                    f"cannot read the sandbox profile {spec!r}: {exc.strerror}"
                ) from None
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise SandboxError(f"the sandbox profile {spec!r} is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise SandboxError("a sandbox profile is a JSON object")
        data.update(loaded)
    for option in options:
        key, sep, raw = option.partition("=")
        if not sep or not key:
            raise SandboxError(f"--sandbox-option takes KEY=VALUE, not {option!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        data[key.strip()] = value
    return Profile.from_mapping(data)
