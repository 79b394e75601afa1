"""The sandbox's seccomp filter, as the classic BPF program bubblewrap's
``--seccomp FD`` loads (an array of ``struct sock_filter``).

A small assembler, no library: the system calls are numbered for x86_64
here (checked against libseccomp by the tests); on another machine the
numbers come from libseccomp, if it is installed. A denied call fails with
``EPERM`` (Python: ``PermissionError``), so a cell that tries one gets an
ordinary error and the worker lives on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct

from .profile import SandboxError

#: Denied always: debugging other processes, mounting, the kernel keyring,
#: eBPF, kernel modules, rebooting, new namespaces, swap, the clock, raw
#: handles, io_uring (which bypasses the filter for the calls it runs).
DENIED = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "unshare",
    "setns",
    "syslog",
    "acct",
    "quotactl",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)

#: x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl).
X86_64 = {
    "socket": 41,
    "clone": 56,
    "clone3": 435,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "reboot": 169,
    "swapon": 167,
    "swapoff": 168,
    "unshare": 272,
    "setns": 308,
    "syslog": 103,
    "acct": 163,
    "quotactl": 179,
    "settimeofday": 164,
    "clock_settime": 227,
    "clock_adjtime": 305,
    "adjtimex": 159,
    "iopl": 172,
    "ioperm": 173,
    "open_by_handle_at": 304,
    "name_to_handle_at": 303,
    "lookup_dcookie": 212,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
}

#: ``AUDIT_ARCH_*`` of the machines a filter can be made for.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
#: clone() flags that make new namespaces (a new user namespace would give
#: the code back the capabilities the sandbox took away).
CLONE_NEW_NAMESPACES = 0x7E020000
AF_INET, AF_INET6 = 2, 10
#: x86_64's x32 ABI: the same calls with this bit set.
X32_SYSCALL_BIT = 0x40000000

# classic BPF
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16


def syscall_numbers(machine: str | None = None) -> dict[str, int]:
    """Name -> number of the calls the filter names, for ``machine``
    (default: this one)."""
    machine = machine or platform.machine()
    if machine == "x86_64":
        return dict(X86_64)
    lib = _libseccomp()
    if lib is None or machine not in AUDIT_ARCH:
        raise SandboxError(
            f"no seccomp filter for this machine ({machine}): install libseccomp, or set "
            '"seccomp": false in the sandbox profile'
        )
    numbers = {}
    for name in (*X86_64,):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # a call this machine does not have needs no rule
            numbers[name] = nr
    return numbers


def _libseccomp() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("seccomp")
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    return lib


class _Program:
    """Instructions with symbolic jump targets, resolved by :meth:`assemble`."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int, jt: object = 0, jf: object = 0) -> None:
        self.code.append((code, jt, jf, k))

    def _offset(self, at: int, target: object) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[str(target)] - at - 1
        if not 0 <= offset <= 255:
            raise AssertionError(f"BPF jump to {target} out of range")
        return offset

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.code):
            out += struct.pack("=HBBI", code, self._offset(i, jt), self._offset(i, jf), k)
        return bytes(out)


def build_filter(*, network: str = "none", machine: str | None = None) -> bytes:
    """The compiled filter: the calls in :data:`DENIED`, clone() with
    namespace flags and clone3() (whose flags a filter cannot read; C
    libraries fall back to clone()) refused, and, with ``network="none"``,
    no ``AF_INET``/``AF_INET6`` socket. Calls of another ABI (i386, x32)
    are refused as a whole."""
    machine = machine or platform.machine()
    if machine not in AUDIT_ARCH:
        raise SandboxError(
            f"no seccomp filter for this machine ({machine}): set "
            '"seccomp": false in the sandbox profile'
        )
    numbers = syscall_numbers(machine)
    p = _Program()
    p.op(_LD_W_ABS, _OFF_ARCH)
    p.op(_JEQ_K, AUDIT_ARCH[machine], 0, "deny")
    p.op(_LD_W_ABS, _OFF_NR)
    if machine == "x86_64":
        p.op(_JGE_K, X32_SYSCALL_BIT, "deny", 0)
    for name in DENIED:
        if name in numbers:
            p.op(_JEQ_K, numbers[name], "deny", 0)
    p.op(_JEQ_K, numbers["clone3"], "nosys", 0)
    p.op(_JEQ_K, numbers["clone"], "clone", 0)
    if network == "none":
        p.op(_JEQ_K, numbers["socket"], "socket", 0)
    p.op(_RET_K, RET_ALLOW)
    p.label("clone")
    p.op(_LD_W_ABS, _OFF_ARG0)
    p.op(_JSET_K, CLONE_NEW_NAMESPACES, "deny", 0)
    p.op(_RET_K, RET_ALLOW)
    if network == "none":
        p.label("socket")
        p.op(_LD_W_ABS, _OFF_ARG0)
        p.op(_JEQ_K, AF_INET, "deny", 0)
        p.op(_JEQ_K, AF_INET6, "deny", 0)
        p.op(_RET_K, RET_ALLOW)
    p.label("nosys")
    p.op(_RET_K, RET_ERRNO | errno.ENOSYS)
    p.label("deny")
    p.op(_RET_K, RET_ERRNO | errno.EPERM)
    return p.assemble()


def filter_fd(program: bytes) -> int:
    """A file descriptor holding ``program`` from its start, for
    ``bwrap --seccomp FD`` (the caller passes it on and closes it)."""
    fd = os.memfd_create("pyrepl3-seccomp", 0)
    try:
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
