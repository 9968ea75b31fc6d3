"""The seccomp program, evaluated by a small classic-BPF interpreter for both architectures: every
listed interface is denied with its errno, clone only with namespace flags, foreign ABIs fail, and
everything else is allowed. (test_python_sandbox.py checks the same denials in a live run.)"""

import errno
import struct

import pytest

from arpo_fast.rollout.tools import seccomp


def evaluate(program: bytes, nr: int, arch: int, args=(0,) * 6) -> int:
    """What the kernel would return for this syscall: run the filter on a seccomp_data record."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    ops = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = ops[pc]
        if code == 0x20:  # ld word at offset k
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


DENIED = [
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsmount",
    "mount_setattr",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "perf_event_open",
    "userfaultfd",
    "open_by_handle_at",
]
ABSENT = ["clone3", "memfd_create", "shmget", "msgget", "semget"]
EPERM, ENOSYS = seccomp.RET_ERRNO | errno.EPERM, seccomp.RET_ERRNO | errno.ENOSYS


@pytest.fixture(params=sorted(seccomp.ARCHES))
def machine(request):
    return request.param


def _run(machine, name_or_nr, args=(0,) * 6, arch=None):
    program = seccomp.build(machine)
    nr = seccomp.syscall_number(name_or_nr, machine) if isinstance(name_or_nr, str) else name_or_nr
    return evaluate(program, nr, arch if arch is not None else seccomp.ARCHES[machine][0], args)


@pytest.mark.parametrize("name", DENIED)
def test_denied_with_eperm(machine, name):
    assert _run(machine, name) == EPERM


@pytest.mark.parametrize("name", ABSENT)
def test_absent_with_enosys(machine, name):
    assert _run(machine, name) == ENOSYS


@pytest.mark.parametrize(
    "flag", [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000]
)
def test_clone_with_a_namespace_flag_is_denied(machine, flag):
    assert _run(machine, "clone", (flag | 17, 0, 0, 0, 0, 0)) == EPERM


def test_plain_clone_and_other_calls_are_allowed(machine):
    threads = 0x3D0F00  # what glibc passes for pthread_create
    assert _run(machine, "clone", (threads, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW
    assert _run(machine, "clone", (17, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW  # fork
    for nr in (0, 1, 3, 9, 39, 60, 63, 202, 231, 262):  # read, write, mmap, futex, exit... (any)
        if nr not in {seccomp.syscall_number(n, machine) for n in DENIED + ABSENT}:
            assert _run(machine, nr) == seccomp.RET_ALLOW


def test_foreign_abis_fail(machine):
    other = [a for m, (a, _) in seccomp.ARCHES.items() if m != machine][0]
    assert _run(machine, 0, arch=other) == ENOSYS
    assert _run(machine, 0, arch=0x40000003) == ENOSYS  # i386
    if machine == "x86_64":
        assert _run(machine, 0x40000000 | 1) == ENOSYS  # x32 write


def test_a_run_sharing_the_host_gets_no_socket_and_no_message_queue(machine):
    shared = seccomp.build(machine, host_shared=True)
    arch = seccomp.ARCHES[machine][0]
    for name in ("socket", "mq_open", "mq_unlink"):
        nr = seccomp.syscall_number(name, machine)
        assert evaluate(shared, nr, arch) == EPERM
        assert _run(machine, name) == seccomp.RET_ALLOW  # the other modes have their own network
    pair = seccomp.syscall_number("socketpair", machine)
    assert evaluate(shared, pair, arch, (seccomp.AF_UNIX, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW
    for family in (2, 10, 16, 17):  # AF_INET, AF_INET6, AF_NETLINK, AF_PACKET
        assert evaluate(shared, pair, arch, (family, 0, 0, 0, 0, 0)) == EPERM
    for name in DENIED:  # and everything the plain filter denies
        assert evaluate(shared, seccomp.syscall_number(name, machine), arch) == EPERM
    assert (
        evaluate(shared, seccomp.syscall_number("clone", machine), arch, (0x10000000 | 17,) + (0,) * 5)
        == EPERM
    )
    assert (
        evaluate(shared, seccomp.syscall_number("clone", machine), arch, (17,) + (0,) * 5)
        == seccomp.RET_ALLOW
    )


def test_unknown_machines_get_no_filter():
    assert seccomp.filter_program("riscv64") is None
    assert seccomp.filter_program("amd64") == seccomp.build("x86_64")
