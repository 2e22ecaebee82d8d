"""A seccomp filter that takes the kernel's escape hatches away from agent code.

A deny list, not an allow list: agent code is arbitrary Python (and whatever C libraries it loads
through ctypes), so an allow list would break ordinary programs in ways nobody could predict. What
the list refuses is what a sandboxed process has no business doing and what sandbox escapes and
kernel exploits are usually built from: new namespaces (`unshare`, `setns`, namespace flags on
`clone`), tracing and reading other processes (`ptrace`, `process_vm_*`, `pidfd_getfd`), mounts,
kernel modules, keyrings, BPF, perf, userfaultfd and io_uring; and sockets of any family but
AF_UNIX, so the network namespace is not the only thing between agent code and the network.

`clone3` answers ENOSYS rather than EPERM: its flags live in a struct the filter cannot read, and
ENOSYS makes glibc fall back to `clone`, whose flags it can. Anything else answers EPERM, so agent
code sees an ordinary `PermissionError` instead of dying.

Only x86-64 is covered (the syscall numbers are per architecture); elsewhere `install` returns
False and the caller reports that the filter is missing. Calls made through the 32-bit ABIs (x32,
int 0x80) are refused or kill the process, so they cannot go around the table.
"""

from __future__ import annotations

import ctypes
import os

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000

_X86_64_DENIED = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139, "vhangup": 153,
    "pivot_root": 155, "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
    "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
    "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "migrate_pages": 256,
    "unshare": 272, "move_pages": 279, "perf_event_open": 298, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
}
_SOCKET, _CLONE, _CLONE3 = 41, 56, 435
_AF_UNIX = 1
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET. CLONE_NEWTIME (0x80) is
# left out: on clone() that bit belongs to the exit-signal byte, and only clone3/unshare take it.
_CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h)
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_EPERM, _ENOSYS = 1, 38
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARG0 = 0, 4, 16  # struct seccomp_data; arg0's low word (little endian)

_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2

_Row = tuple[int | str, str | None, str | None, int]
"""An instruction (opcode, jump-if-true label, jump-if-false label, k), or a label row (name, ...)."""


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def supported() -> bool:
    return os.uname().machine == "x86_64"


def program() -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions: jumps name labels until `_resolve` places them."""
    code: list[_Row] = [
        (_LD_W_ABS, None, None, _OFFSET_ARCH),
        (_JEQ, None, "kill", _AUDIT_ARCH_X86_64),
        (_LD_W_ABS, None, None, _OFFSET_NR),
        (_JGE, "eperm", None, _X32_SYSCALL_BIT),
    ]
    code += [(_JEQ, "eperm", None, number) for number in sorted(_X86_64_DENIED.values())]
    code += [
        (_JEQ, "enosys", None, _CLONE3),
        (_JEQ, "socket", None, _SOCKET),
        (_JEQ, "clone", None, _CLONE),
        (_RET, None, None, _RET_ALLOW),
        ("socket", None, None, 0),
        (_LD_W_ABS, None, None, _OFFSET_ARG0),
        (_JEQ, "allow", "eperm", _AF_UNIX),
        ("clone", None, None, 0),
        (_LD_W_ABS, None, None, _OFFSET_ARG0),
        (_JSET, "eperm", "allow", _CLONE_NAMESPACE_FLAGS),
        ("allow", None, None, 0),
        (_RET, None, None, _RET_ALLOW),
        ("eperm", None, None, 0),
        (_RET, None, None, _RET_ERRNO | _EPERM),
        ("enosys", None, None, 0),
        (_RET, None, None, _RET_ERRNO | _ENOSYS),
        ("kill", None, None, 0),
        (_RET, None, None, _RET_KILL_PROCESS),
    ]
    return _resolve(code)


def _resolve(code: list[_Row]) -> list[tuple[int, int, int, int]]:
    """Turn label rows into positions and label jumps into the relative offsets BPF wants."""
    labels: dict[str, int] = {}
    instructions: list[tuple[int, str | None, str | None, int]] = []
    for opcode, jt, jf, k in code:
        if isinstance(opcode, str):
            labels[opcode] = len(instructions)
        else:
            instructions.append((opcode, jt, jf, k))
    resolved = []
    for index, (opcode, jt, jf, k) in enumerate(instructions):
        offsets = [0 if label is None else labels[label] - index - 1 for label in (jt, jf)]
        assert all(0 <= offset <= 255 for offset in offsets), "BPF jumps are forward and fit a byte"
        resolved.append((opcode, offsets[0], offsets[1], k))
    return resolved


def install() -> bool:
    """Load the filter into this process (and every process it starts); False where unsupported.

    Sets no_new_privs first, which the kernel requires of an unprivileged process and which also
    stops set-uid binaries from giving privileges back.
    """
    if not supported():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    instructions = program()
    filters = (_SockFilter * len(instructions))(*(_SockFilter(*row) for row in instructions))
    prog = _SockFprog(len(instructions), filters)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    return True
