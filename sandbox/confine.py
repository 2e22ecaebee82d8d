"""What the worker does to itself before it runs agent code: its own root, a lower uid, rlimits.

`enter_jail` is bubblewrap's job done by hand, for machines without bubblewrap: the worker starts
as root (real root, or root of a user namespace) in fresh mount, PID, network, IPC and UTS
namespaces made by util-linux `unshare`, builds a root that holds only read-only binds of the
paths the client names (the system's /usr, the Python installation), a minimal /dev, its own
/proc and a size-capped tmpfs working directory, and chroots into it. It then forks: the parent
stays behind as the namespace's init (it only reaps children), the child goes on as the worker.
Both drop to the sandbox uid and lose every capability, so no process in the sandbox holds a
privilege.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from dataclasses import dataclass

WORKDIR = "/home/sandbox"
"""The agent's working directory and HOME: a fresh tmpfs, gone with the sandbox."""

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
# mount flags a user namespace must keep when it remounts a bind (statvfs f_flag bits)
_LOCKED_FLAGS = {os.ST_NOSUID: _MS_NOSUID, os.ST_NODEV: _MS_NODEV, os.ST_NOEXEC: _MS_NOEXEC,
                 os.ST_NOATIME: 1024, os.ST_NODIRATIME: 2048, os.ST_RELATIME: 1 << 21}
_DEVICES = ("null", "zero", "full", "random", "urandom")
_PR_CAPBSET_DROP, _LINUX_CAPABILITY_VERSION_3 = 24, 0x20080522


@dataclass(frozen=True)
class Limits:
    """The worker's rlimits. Each is per process, as the kernel counts them."""

    memory_mb: int
    cpu_seconds: int
    max_processes: int
    max_file_mb: int
    max_open_files: int


def apply_limits(limits: Limits) -> None:
    """Set soft and hard limits; an unprivileged process can lower them later but never raise them."""
    mb = 1024 * 1024
    # The hard CPU limit is one second above the soft one: SIGXCPU at the soft limit kills the
    # worker, and SIGKILL at the hard one catches code that catches SIGXCPU.
    pairs = {
        resource.RLIMIT_AS: (limits.memory_mb * mb, limits.memory_mb * mb),
        resource.RLIMIT_CPU: (limits.cpu_seconds, limits.cpu_seconds + 1),
        resource.RLIMIT_NPROC: (limits.max_processes, limits.max_processes),
        resource.RLIMIT_FSIZE: (limits.max_file_mb * mb, limits.max_file_mb * mb),
        resource.RLIMIT_NOFILE: (limits.max_open_files, limits.max_open_files),
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, pair in pairs.items():
        resource.setrlimit(which, pair)
    # Past RLIMIT_FSIZE a write fails with EFBIG (an OSError the agent's code sees) instead of
    # SIGXFSZ killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def drop_privileges(uid: int | None) -> None:
    """Give up every privilege for good: become `uid` (when given) and empty the capability sets.

    Leaving uid 0 clears the effective and permitted capabilities, so the worker can no longer
    chroot, mount, change ids or read files by privilege; and RLIMIT_NPROC, which the kernel does
    not enforce for root, starts to count. Without a uid to go to (root of a user namespace made by
    an unprivileged user) the capabilities are dropped explicitly instead: that root could
    otherwise climb out of a chroot. The inheritable set (which bubblewrap fills with the
    capabilities it left us) is emptied too, and the bounding set where we may.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sys/kernel/cap_last_cap", encoding="utf-8") as last:
        for capability in range(int(last.read()) + 1):
            libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)  # fails without CAP_SETPCAP: then it stays
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    empty = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; two 32-bit words each
    if libc.capset(header, empty) != 0:
        raise OSError(ctypes.get_errno(), "capset: cannot drop capabilities")


def enter_jail(root: str, binds: list[str], work_mb: int, uid: int | None) -> None:
    """Build the sandbox root under `root`, chroot into it, and fork off the namespace's init.

    Returns in the worker process (PID 2 of the namespace), with every privilege dropped (see
    `drop_privileges`). The init process never returns: it reaps children until the worker exits, then exits
    with the worker's status (128 + signal for a signal, as bubblewrap does).
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        encode = (lambda text: None if text is None else text.encode())
        if libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")

    def bind_read_only(source: str, target: str) -> None:
        mount(source, target, None, _MS_BIND | _MS_REC)
        kept = sum(bit for flag, bit in _LOCKED_FLAGS.items() if os.statvfs(source).f_flag & flag)
        mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | kept)

    # Nothing mounted here may reach the host's mount table.
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    for path in binds:
        inside = root + path
        os.makedirs(os.path.dirname(inside), mode=0o755, exist_ok=True)
        if os.path.islink(path):  # /bin -> usr/bin on merged-/usr systems
            os.symlink(os.readlink(path), inside)
        elif os.path.isdir(path):
            os.makedirs(inside, mode=0o755, exist_ok=True)
            bind_read_only(path, inside)
        elif os.path.exists(path):
            open(inside, "wb").close()
            bind_read_only(path, inside)
    os.makedirs(root + "/dev", mode=0o755)
    mount("tmpfs", root + "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=0755,size=64k")
    for device in _DEVICES:
        open(f"{root}/dev/{device}", "wb").close()
        mount(f"/dev/{device}", f"{root}/dev/{device}", None, _MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/proc", mode=0o555)
    mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.makedirs(root + WORKDIR, mode=0o755)
    owner = "" if uid is None else f",uid={uid},gid={uid}"
    mount("tmpfs", root + WORKDIR, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=0700,size={work_mb}m{owner}")
    mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    os.chroot(root)
    os.chdir(WORKDIR)

    worker = os.fork()
    drop_privileges(uid)
    if worker == 0:
        return
    _reap_until(worker)


def _reap_until(worker: int) -> None:
    """The namespace's init: reap whatever is orphaned to us, and leave when the worker does.

    When this process exits the kernel kills everything left in the namespace.
    """
    for fd in range(3, 256):  # the protocol pipes belong to the worker alone
        try:
            os.close(fd)
        except OSError:
            pass
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == worker:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
