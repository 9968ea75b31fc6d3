"""A seccomp filter for model-written code: a small classic-BPF program packed with ``struct``.

It denies the kernel interfaces a sandboxed program has no use for and that widen the attack
surface: new namespaces (``unshare``, ``setns``, ``clone`` with namespace flags), mounting,
io_uring, keyrings, eBPF, ptrace and cross-process memory access, perf events, userfaultfd, and two
ways of holding memory outside every file-size and address-space limit (``memfd_create`` and System
V IPC). ``clone3`` takes its flags in memory that seccomp cannot read, so it fails with ``ENOSYS``:
glibc then falls back to ``clone``, whose flags are checked. Syscalls of another ABI (i386 or x32 on
x86_64) fail with ``ENOSYS`` too. Everything else is allowed. Where a run shares the host's network
and file system (the ``uid`` mode), ``socket``, ``mq_open`` and ``mq_unlink`` are denied as well, and
``socketpair`` is allowed for ``AF_UNIX`` only.

bubblewrap loads the program with ``--seccomp FD``; the other sandbox modes install it with
``prctl(PR_SET_SECCOMP)`` after ``PR_SET_NO_NEW_PRIVS`` (see ``launcher.py``). Only x86_64 and
aarch64 have syscall tables here; elsewhere :func:`filter_program` returns ``None``.
"""

from __future__ import annotations

import errno
import platform
import struct
from typing import Optional

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR, _ARCH, _ARG0_LOW = 0, 4, 16

_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K

RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000

# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (CLONE_NEWTIME shares its bit with
# clone()'s exit-signal byte, and a time namespace alone grants nothing)
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# syscall numbers: (x86_64, aarch64); io_uring, the new mount API and clone3 share numbers
_DENIED = {
    "unshare": (272, 97),
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "bpf": (321, 280),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "open_by_handle_at": (304, 265),
}
# fail as "not implemented" so that callers fall back (glibc: clone3 -> clone; shm_open -> /dev/shm)
_ABSENT = {
    "clone3": (435, 435),
    "memfd_create": (319, 279),
    "shmget": (29, 194),
    "msgget": (68, 186),
    "semget": (64, 190),
}
_CLONE = (56, 220)
# where the run shares the host's network and file system (the uid mode): no socket can be made, so
# neither a listener on the host's loopback nor a Unix socket in its file system can be reached, and
# no POSIX message queue (which lives outside every folder a sweep can see) can be opened
_HOST_CHANNELS = {
    "socket": (41, 198),
    "mq_open": (240, 180),
    "mq_unlink": (241, 181),
}
_SOCKETPAIR = (53, 199)
"""Allowed for AF_UNIX only: a connected pair reaches nothing outside the run (multiprocessing's
pipes, asyncio's wake-up pair)."""
AF_UNIX = 1

ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}
"""machine name -> (AUDIT_ARCH_* value, column in the tables above)"""
_X32_BIT = 0x40000000


def syscall_number(name: str, machine: str) -> int:
    """The number of ``name`` on ``machine`` (x86_64 or aarch64), for tests and callers."""
    column = ARCHES[machine][1]
    table = {**_DENIED, **_ABSENT, **_HOST_CHANNELS, "clone": _CLONE, "socketpair": _SOCKETPAIR}
    return table[name][column]


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build(machine: str, host_shared: bool = False) -> bytes:
    """The filter program for ``machine``: a packed ``struct sock_filter`` array. ``host_shared``
    (a run that shares the host's network and file system): sockets and message queues denied too,
    socket pairs allowed for AF_UNIX only."""
    audit_arch, column = ARCHES[machine]
    prog = [
        _op(_LD_ABS, _ARCH),
        _op(_JEQ, audit_arch, jt=1),
        _op(_RET, RET_ERRNO | errno.ENOSYS),
        _op(_LD_ABS, _NR),
    ]
    if machine == "x86_64":  # x32 syscalls carry this bit and bypass the table below
        prog += [_op(_JGE, _X32_BIT, jf=1), _op(_RET, RET_ERRNO | errno.ENOSYS)]
    tables = [(_DENIED, errno.EPERM), (_ABSENT, errno.ENOSYS)]
    if host_shared:
        tables.append((_HOST_CHANNELS, errno.EPERM))
    for numbers, err in tables:
        for nr in sorted({n[column] for n in numbers.values()}):
            prog += [_op(_JEQ, nr, jf=1), _op(_RET, RET_ERRNO | err)]
    if host_shared:  # socketpair: its domain (first argument) must be AF_UNIX
        prog += [
            _op(_JEQ, _SOCKETPAIR[column], jf=4),
            _op(_LD_ABS, _ARG0_LOW),
            _op(_JEQ, AF_UNIX, jf=1),
            _op(_RET, RET_ALLOW),
            _op(_RET, RET_ERRNO | errno.EPERM),
        ]
    # clone: refused when its flags (first argument, low 32 bits) ask for a new namespace
    prog += [
        _op(_JEQ, _CLONE[column], jf=3),
        _op(_LD_ABS, _ARG0_LOW),
        _op(_JSET, CLONE_NAMESPACES, jf=1),
        _op(_RET, RET_ERRNO | errno.EPERM),
        _op(_RET, RET_ALLOW),
    ]
    return b"".join(prog)


def filter_program(machine: Optional[str] = None, host_shared: bool = False) -> Optional[bytes]:
    """The filter for this machine (or ``machine``), or None where no table exists."""
    machine = machine or platform.machine()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)
    return build(machine, host_shared) if machine in ARCHES else None
