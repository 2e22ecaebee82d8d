"""Adversarial tests: one per property the sandbox promises (see the `sandbox` package docstring).

Each runs real hostile code in a real worker, under every isolation backend this machine has, and
checks the outcome from the host side wherever it can (the listener saw nothing, the file is
absent, /proc says so), not only what the sandbox reports of itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.sandbox.conftest import process_state
from training_core.sandboxed import SandboxedFunctions, SandboxError, SandboxLimits

HOSTILE = r'''
import ctypes, errno, os, signal, socket, sys, time


def outcome(action):
    """What happened: 'ok: ...' or the exception's name, so the host can check every attempt."""
    try:
        return "ok: " + repr(action())[:200]
    except BaseException as error:
        return type(error).__name__


def connect(port, abstract_name, **kwargs):
    def tcp(host):
        return socket.create_connection((host, port), timeout=2)

    def udp():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return s.sendto(b"x", ("1.1.1.1", 53))

    def unix_abstract():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(b"\0" + abstract_name.encode())
        return s

    def interfaces():
        with open("/proc/net/dev") as dev:
            return [line.split(":")[0].strip() for line in dev.readlines()[2:]]

    return {"loopback": outcome(lambda: tcp("127.0.0.1")), "internet": outcome(lambda: tcp("1.1.1.1")),
            "udp": outcome(udp), "ipv6": outcome(lambda: socket.socket(socket.AF_INET6)),
            "unix_abstract": outcome(unix_abstract), "interfaces": interfaces()}


def read_files(paths, directories, **kwargs):
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    found = {path: outcome(lambda path=path: read(path)) for path in paths}
    found.update({"listdir " + d: outcome(lambda d=d: os.listdir(d)) for d in directories})
    found["etc"] = sorted(os.listdir("/etc"))
    found["up from the work directory"] = outcome(lambda: read("../../" + paths[0]))
    return found


def write_files(paths, **kwargs):
    def write(path):
        with open(path, "w") as f:
            f.write("written by agent code")
        return path

    found = {path: outcome(lambda path=path: write(path)) for path in paths}
    found["work directory"] = outcome(lambda: write("inside.txt"))
    found["home"] = outcome(lambda: write(os.path.expanduser("~/home.txt")))
    return found


def fill_disk(max_file_mb, **kwargs):
    def big_file():
        with open("big.bin", "wb") as f:
            for _ in range(max_file_mb + 1):
                f.write(b"x" * 2**20)

    def many_files():
        for i in range(10_000):
            with open(f"part{i}.bin", "wb") as f:
                f.write(b"x" * (max_file_mb * 2**20 // 2))

    def error_code(action):
        try:
            action()
        except OSError as error:
            return errno.errorcode[error.errno]
        return "no error"

    return {"big file": error_code(big_file), "many files": error_code(many_files)}


def fork_bomb(**kwargs):
    children = 0
    try:
        while True:
            if os.fork() == 0:
                time.sleep(10_000)  # hold the slot
                os._exit(0)
            children += 1
    except OSError as error:
        return [children, type(error).__name__]


def classic_fork_bomb(**kwargs):
    while True:
        os.fork()


def allocate_at_once(mb, **kwargs):
    return len(bytearray(mb * 2**20))


def allocate_bit_by_bit(**kwargs):
    chunks = []
    while True:
        chunks.append(bytearray(16 * 2**20))


def spin(**kwargs):
    while True:
        pass


def spin_ignoring_sigxcpu(**kwargs):
    signal.signal(signal.SIGXCPU, signal.SIG_IGN)
    while True:
        pass


def sleep_forever(**kwargs):
    time.sleep(10**9)


def flood(mb, **kwargs):
    line = "FLOOD" * 20_000 + "\n"
    for _ in range(mb):
        print(line * 10, end="")
        sys.stderr.write(line * 10)
        os.write(1, line.encode() * 10)
        os.write(2, line.encode() * 10)
    return "still talking"


def environment(client_pid, **kwargs):
    def environ_of(pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().decode(errors="replace")

    others = {pid: outcome(lambda pid=pid: environ_of(pid)) for pid in os.listdir("/proc") if pid.isdigit()}
    return {"environ": dict(os.environ), "self": outcome(lambda: environ_of("self")),
            "client": outcome(lambda: environ_of(client_pid)),
            "others": others}


def signal_parent(client_pid, launcher_pid, **kwargs):
    return {"parent": outcome(lambda: os.kill(os.getppid(), signal.SIGTERM)),
            "parent kill": outcome(lambda: os.kill(os.getppid(), signal.SIGKILL)),
            "client": outcome(lambda: os.kill(client_pid, signal.SIGTERM)),
            "launcher": outcome(lambda: os.kill(launcher_pid, signal.SIGTERM)),
            "client group": outcome(lambda: os.killpg(client_pid, signal.SIGTERM)),
            "everyone": outcome(lambda: os.kill(-1, signal.SIGTERM)),
            "parent pid": os.getppid()}


def raw_syscalls(**kwargs):
    libc = ctypes.CDLL(None, use_errno=True)

    def call(function, *args):
        ctypes.set_errno(0)
        result = function(*args)
        return [result, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())]

    CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS = 0x10000000, 0x40000000, 0x00020000
    netns = os.open("/proc/1/ns/net", os.O_RDONLY) if os.access("/proc/1/ns/net", os.R_OK) else -1
    pair = socket.socketpair()  # AF_UNIX stays allowed: the filter is a deny list, not a wall
    return {
        "unshare user": call(libc.unshare, CLONE_NEWUSER),
        "unshare net": call(libc.unshare, CLONE_NEWNET),
        "unshare mount": call(libc.unshare, CLONE_NEWNS),
        "setns": call(libc.setns, netns, 0),
        "socket inet": call(libc.socket, 2, 1, 0),
        "socket packet": call(libc.socket, 17, 3, 0),
        "socket netlink": call(libc.socket, 16, 3, 0),
        "ptrace attach parent": call(libc.ptrace, 16, os.getppid(), None, None),
        "ptrace traceme": call(libc.ptrace, 0, 0, None, None),
        "mount": call(libc.mount, b"none", b"/home/sandbox", b"tmpfs", 0, None),
        "chroot": call(libc.chroot, b"/home/sandbox"),
        "clone newuser": call(libc.syscall, 56, CLONE_NEWUSER | 17, 0, 0, 0, 0),
        "clone3": call(libc.syscall, 435, 0, 0),
        "bpf": call(libc.syscall, 321, 0, 0, 0),
        "keyctl": call(libc.syscall, 250, 0, 0, 0),
        "process_vm_readv": call(libc.syscall, 310, os.getppid(), 0, 0, 0, 0, 0),
        "socketpair": pair[0].family.name,
    }


def ok(**kwargs):
    return os.getpid()
'''
SECCOMP = os.uname().machine == "x86_64"
"""The seccomp filter exists for x86-64 only (see `sandbox/seccomp.py`)."""
FUNCTIONS = ["connect", "read_files", "write_files", "fill_disk", "fork_bomb", "classic_fork_bomb",
             "allocate_at_once", "allocate_bit_by_bit", "spin", "spin_ignoring_sigxcpu", "sleep_forever",
             "flood", "environment", "signal_parent", "raw_syscalls", "ok"]


def sandbox(isolation: str, **options: object) -> SandboxedFunctions:
    return SandboxedFunctions(HOSTILE, FUNCTIONS, isolation=isolation, **options)  # type: ignore[arg-type]


def assert_sandbox_ends_empty(sb: SandboxedFunctions) -> None:
    """After close, nothing of the sandbox is left running on the host."""
    sb.close()
    wait_until(lambda: not sb.processes(), timeout=10, interval=0.02)


def test_agent_code_cannot_reach_the_network(isolation: str) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = f"weightsmith-test-{os.getpid()}-{isolation}"
    abstract.bind(b"\0" + abstract_name.encode())
    abstract.listen()
    abstract.setblocking(False)
    with listener, abstract, sandbox(isolation) as sb:
        found = sb.call("connect", port=listener.getsockname()[1], abstract_name=abstract_name)
        for server in (listener, abstract):
            with pytest.raises(BlockingIOError):
                server.accept()  # nobody ever connected
    if SECCOMP:
        for attempt in ("loopback", "internet", "udp", "ipv6"):
            assert found[attempt] == "PermissionError", (attempt, found[attempt])  # seccomp: no inet sockets
    else:  # the namespace alone: sockets open, but lead nowhere
        for attempt in ("loopback", "internet", "udp"):
            assert not found[attempt].startswith("ok"), (attempt, found[attempt])
    assert found["unix_abstract"] == "ConnectionRefusedError"  # the host's abstract sockets are another namespace's
    assert found["interfaces"] == ["lo"]
    assert_sandbox_ends_empty(sb)


def test_agent_code_cannot_read_files_outside_its_work_directory(isolation: str, tmp_path: Path) -> None:
    home = tmp_path / "service-home"
    home.mkdir()
    database = home / "weightsmith.db"
    database.write_text("SERVICE-DATABASE-CONTENT", encoding="utf-8")
    database.chmod(0o644)  # what a database file gets under the default umask: world-readable
    key = tmp_path / "agent.key"
    key.write_text("AGENT-KEY-CONTENT", encoding="utf-8")
    key.chmod(0o600)
    public_key = tmp_path / "public.key"
    public_key.write_text("WORLD-READABLE-KEY", encoding="utf-8")
    public_key.chmod(0o644)
    outside = [str(database), str(key), str(public_key), "/etc/shadow", "/etc/passwd", "/root/.bash_history",
               "/root/.ssh/id_ed25519", str(Path(__file__).resolve())]
    with sandbox(isolation) as sb:
        found = sb.call("read_files", paths=[*outside, "/proc/1/environ"],
                        directories=[str(tmp_path), str(home), "/work", "/root"])
    flat = json.dumps(found)
    for secret in ("SERVICE-DATABASE-CONTENT", "AGENT-KEY-CONTENT", "WORLD-READABLE-KEY", "root:", "password"):
        assert secret not in flat
    for path in outside:
        assert found[path] == "FileNotFoundError", (path, found[path])  # not in the sandbox's view at all
    for directory in (str(tmp_path), str(home)):
        assert found["listdir " + directory] == "FileNotFoundError", (directory, found["listdir " + directory])
    # /work holds checkouts; it is visible only where the Python installation (a checkout's .venv)
    # lives under it, and then it shows just the way there
    assert found["listdir /work"] in ("FileNotFoundError", *_only_the_way_to(sys.prefix, "/work")), \
        found["listdir /work"]
    # /root exists only where the Python installation lives under it (pyenv); then it holds just that
    assert found["listdir /root"] in ("FileNotFoundError", "ok: ['.pyenv']"), found["listdir /root"]
    # the namespace's init: another uid under bubblewrap; in the jail, the same scrubbed environment
    assert found["/proc/1/environ"] == "PermissionError" or found["/proc/1/environ"].startswith("ok: b'PATH=")
    assert set(found["etc"]) <= {"ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime"}
    assert found["up from the work directory"] == "FileNotFoundError"
    assert_sandbox_ends_empty(sb)


def test_agent_code_cannot_write_outside_its_work_directory(isolation: str, tmp_path: Path) -> None:
    import sandbox as sandbox_package

    marker = f"weightsmith-sandbox-test-{os.getpid()}-{isolation}"
    package_dir = Path(sandbox_package.__file__).parent
    stdlib = Path(socket.__file__).parent  # the interpreter's own library, shown read-only
    targets = [str(tmp_path / marker), f"/tmp/{marker}", f"/{marker}", f"/usr/{marker}", f"/etc/{marker}",
               f"/dev/shm/{marker}", f"/opt/weightsmith/sandbox/{marker}", str(package_dir / marker),
               str(stdlib / marker), f"/proc/{marker}"]
    with sandbox(isolation) as sb:
        found = sb.call("write_files", paths=targets)
    for target in targets:
        assert not found[target].startswith("ok"), (target, found[target])
        assert found[target] in ("FileNotFoundError", "PermissionError", "OSError"), (target, found[target])
    for host_path in (tmp_path / marker, Path("/tmp") / marker, Path("/") / marker, package_dir / marker,
                      stdlib / marker):
        assert not host_path.exists()
    assert found["work directory"] == "ok: 'inside.txt'"
    assert found["home"] == "ok: '/home/sandbox/home.txt'"
    assert_sandbox_ends_empty(sb)


def test_agent_code_cannot_fill_the_disk(isolation: str) -> None:
    limits = SandboxLimits(max_file_mb=2, work_mb=8)
    with sandbox(isolation, limits=limits) as sb:
        found = sb.call("fill_disk", max_file_mb=limits.max_file_mb)
    assert found == {"big file": "EFBIG", "many files": "ENOSPC"}  # RLIMIT_FSIZE, then the tmpfs size
    assert_sandbox_ends_empty(sb)


def test_a_fork_bomb_stops_at_the_process_limit(isolation: str) -> None:
    limits = SandboxLimits(max_processes=12)
    with sandbox(isolation, limits=limits) as sb:
        children, error = sb.call("fork_bomb")
        assert error == "BlockingIOError"  # EAGAIN from RLIMIT_NPROC
        assert 0 < children < limits.max_processes
        assert len(sb.processes()) <= limits.max_processes + 1  # + the namespace's init
        with pytest.raises(SandboxError) as raised:
            sb.call("classic_fork_bomb")
        assert raised.value.kind == "raised" and "BlockingIOError" in raised.value.message
        assert sb.call("ok") == 2  # the worker still serves, as PID 2 of its namespace
    assert_sandbox_ends_empty(sb)  # the children, sleeping in their own slots, died with it


def test_a_memory_bomb_fails_inside_the_sandbox(isolation: str) -> None:
    with sandbox(isolation, limits=SandboxLimits(memory_mb=256)) as sb:
        worker = sb.host_pid
        for function, kwargs in (("allocate_at_once", {"mb": 1024}), ("allocate_bit_by_bit", {})):
            with pytest.raises(SandboxError) as raised:
                sb.call(function, **kwargs)
            assert (raised.value.function, raised.value.kind) == (function, "raised")
            assert raised.value.message.startswith("MemoryError")
        assert sb.call("allocate_at_once", mb=64) == 64 * 2**20  # what fits still works
        assert sb.host_pid == worker and sb.starts == 1
    assert_sandbox_ends_empty(sb)


def test_a_cpu_loop_is_killed_at_the_cpu_limit(isolation: str) -> None:
    with sandbox(isolation, limits=SandboxLimits(cpu_seconds=1), call_timeout=60) as sb:
        for function, signal_name in (("spin", "SIGXCPU"), ("spin_ignoring_sigxcpu", "SIGKILL")):
            started = time.monotonic()
            with pytest.raises(SandboxError) as raised:
                sb.call(function)
            assert (raised.value.function, raised.value.kind) == (function, "killed")
            assert signal_name in raised.value.message
            assert time.monotonic() - started < 30  # the CPU limit, long before the wall-clock timeout
        assert sb.call("ok") == 2 and sb.starts == 3  # a fresh worker each time
    assert_sandbox_ends_empty(sb)


def test_sleeping_forever_times_out_and_leaves_nothing_behind(isolation: str) -> None:
    with sandbox(isolation, call_timeout=1.0) as sb:
        sb.call("fork_bomb")  # children sleeping in the namespace too
        started = time.monotonic()
        with pytest.raises(SandboxError) as raised:
            sb.call("sleep_forever")
        assert (raised.value.function, raised.value.kind) == ("sleep_forever", "timeout")
        assert 1.0 <= time.monotonic() - started < 10
        wait_until(lambda: not sb.processes(), timeout=10, interval=0.02)  # worker, init and children all gone
        assert sb.call("ok") == 2 and sb.starts == 2
    assert_sandbox_ends_empty(sb)


def test_flooding_stdout_and_stderr_reaches_neither_the_protocol_nor_the_host(
        isolation: str, capfd: pytest.CaptureFixture[str]) -> None:
    with sandbox(isolation, call_timeout=60) as sb:
        assert sb.call("flood", mb=50) == "still talking"
        assert sb.call("ok") == 2 and sb.starts == 1
    captured = capfd.readouterr()
    assert "FLOOD" not in captured.out and "FLOOD" not in captured.err
    assert_sandbox_ends_empty(sb)


def test_agent_code_cannot_read_the_parent_environment(isolation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTSMITH_SECRET", "parent-secret-value")
    monkeypatch.setenv("WEIGHTSMITH_DATABASE_URL", "postgresql://service:password@db/weightsmith")
    with sandbox(isolation) as sb:
        found = sb.call("environment", client_pid=os.getpid())
    flat = json.dumps(found)
    assert "parent-secret-value" not in flat and "password" not in flat
    assert set(found["environ"]) - {"PWD"} == {"PATH", "LANG", "HOME"}  # bubblewrap adds PWD
    assert found["client"] == "FileNotFoundError"  # the client is not in the sandbox's PID namespace
    assert set(found["others"]) <= {"1", "2"}  # it sees its init and itself, nothing of the host
    assert_sandbox_ends_empty(sb)


def test_agent_code_cannot_signal_the_parent_or_the_client(isolation: str) -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with sandbox(isolation) as sb:
            worker = sb.host_pid
            found = sb.call("signal_parent", client_pid=os.getpid(), launcher_pid=sb.launcher_pid)
            assert sb.call("ok") == 2 and sb.host_pid == worker and sb.starts == 1  # init and worker alive
            assert len(sb.processes()) == 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == []
    assert found["parent pid"] == 1  # its parent is the namespace's init
    # Under bubblewrap the init is another uid (EPERM); in the unshare jail it is the same uid, and
    # the kernel drops signals to a namespace's init that it has no handler for: sent, and ignored.
    assert found["parent"] in ("PermissionError", "ok: None")
    assert found["parent kill"] in ("PermissionError", "ok: None")
    for target in ("client", "launcher", "client group"):
        assert found[target] == "ProcessLookupError", (target, found[target])  # not in its PID namespace
    assert found["everyone"] in ("ok: None", "ProcessLookupError")  # reaches at most its own processes
    assert_sandbox_ends_empty(sb)


@pytest.mark.skipif(not SECCOMP, reason="the seccomp filter exists for x86-64 only "
                    "(documented in the sandbox package); elsewhere these syscalls are not filtered")
def test_agent_code_cannot_call_dangerous_syscalls_through_ctypes(isolation: str) -> None:
    with sandbox(isolation) as sb:
        assert sb.host_pid is not None
        state = process_state(sb.host_pid)
        found = sb.call("raw_syscalls")
    assert state["Seccomp"] == "2" and state["NoNewPrivs"] == "1"
    assert state["CapEff"] == state["CapPrm"] == "0000000000000000"
    if os.geteuid() == 0:
        assert state["Uid"].split() == [str(sb.uid)] * 4 and sb.uid is not None and sb.uid > 0
    expected = {name: [-1, "EPERM"] for name in found if name not in ("clone3", "socketpair")}
    expected["clone3"] = [-1, "ENOSYS"]  # so glibc falls back to clone, whose flags the filter reads
    expected["socketpair"] = "AF_UNIX"
    assert found == expected
    assert_sandbox_ends_empty(sb)


def _only_the_way_to(installation: str, directory: str) -> list[str]:
    """What listing `directory` may show when the Python installation lies beneath it: the one entry
    on the way there."""
    try:
        step = Path(os.path.realpath(installation)).relative_to(directory).parts[0]
    except (ValueError, IndexError):
        return []
    return [f"ok: [{step!r}]"]
