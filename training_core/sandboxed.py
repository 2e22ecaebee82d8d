"""Call functions an agent wrote (GRPO rewards, eval graders, data filters) inside the sandbox.

    with SandboxedFunctions(code, ["score"], limits=SandboxLimits(cpu_seconds=30), call_timeout=5.0) as sb:
        rewards = reward_scores(sb.call("score", completions=completions, prompts=prompts), len(completions), "score")

One long-lived worker (`python -m sandbox`, see the `sandbox` package for what its isolation covers
and what it does not) loads the code once and serves every call, so a GRPO step pays one JSON
round trip per call, not one process start. This side owns what the worker cannot be trusted
with: the wall-clock timeout of each call and the kill. Every failure is a `SandboxError` naming
the function and its kind:

- `syntax`, `missing`, `raised` (at load: the code does not compile, lacks a named function, or its
  module body raised; in a call: the function raised), `bad_output` (not JSON, or not the shape a
  helper such as `reward_scores` wants);
- `timeout` (no answer within `call_timeout`), `killed` (the worker died: CPU limit, a signal,
  exit), `out_of_memory` (the sandbox's processes together reached `memory_mb` and the kernel killed
  one of them: the call fails even if the function went on to return), `protocol` (the worker
  answered something that is not a reply);
- `unavailable` (this machine can create no isolation; agent code is then never run at all).

After a timeout or a death the worker is gone; the next call starts a fresh one (one start, about
a tenth of a second), so one bad input costs one call, not the whole object. A worker is also
replaced before its lifetime CPU budget (RLIMIT_CPU) is half spent, so every call gets at least
half of `cpu_seconds`.

Each worker runs in a control group of its own (`cgroups.py`) where the machine allows one: its
whole tree together gets `memory_mb`, `max_processes` and `cpu_cores`, on top of the per-process
rlimits. `cgroups.available().reason` says when it does not.

Isolation backends, chosen by `isolation="auto"` in this order: `bwrap` (bubblewrap: a read-only
root holding only the system's /usr and the Python installation) and `unshare` (util-linux
unshare, with the worker building the same root itself). The `sandbox` package and this module
import nothing of each other; this side only knows how to start `python -m sandbox`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Self

from training_core import cgroups

WORKDIR = "/home/sandbox"
"""The agent's working directory and HOME inside the sandbox (a size-capped tmpfs)."""
PACKAGE_MOUNT = "/opt/weightsmith"
"""Where bubblewrap shows the `sandbox` package, read-only, so `python -m sandbox` finds it."""
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
"""System paths shown read-only: programs, shared libraries and what the dynamic loader reads."""
ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": WORKDIR}
"""The whole environment the worker gets: no service keys, no database URL, nothing inherited."""
UID_BASE, UID_SPAN = 1_900_000_000, 100_000_000
"""Sandbox uids (when started as root) are drawn from here: ids no account or container uses, one
per worker, so RLIMIT_NPROC (counted per uid) is the worker's own and workers cannot touch each
other's processes."""
MAX_REPLY_BYTES = 64 * 1024 * 1024
KINDS = ("syntax", "missing", "raised", "bad_output", "timeout", "killed", "out_of_memory", "protocol",
         "unavailable")


class SandboxError(Exception):
    """Agent code failed, or could not be run: names the function (None for the code as a whole)."""

    def __init__(self, function: str | None, kind: str, message: str) -> None:
        self.function, self.kind, self.message = function, kind, message
        subject = f"sandboxed function {function!r}" if function else "sandboxed code"
        super().__init__(f"{subject} failed ({kind}): {message}")


@dataclass(frozen=True)
class SandboxLimits:
    """Hard limits of the worker (see `sandbox` for what each covers). Memory, processes and CPU
    count twice: per process (rlimits) and, where the machine has control groups, for the whole
    sandbox together."""

    memory_mb: int = 1024
    """Memory in MiB, twice: the address space of each process (RLIMIT_AS: allocations past it raise
    MemoryError), and the memory of all the sandbox's processes together, files in its working
    directory included (control group: past it the kernel kills a process and the call fails with
    `out_of_memory`)."""
    cpu_seconds: int = 60
    """CPU time (RLIMIT_CPU) of the worker over its life; each call is guaranteed at least half."""
    max_processes: int = 32
    """Processes and threads at once, all told: in the sandbox's control group, which holds the
    launcher and the namespace's init besides the worker (so at least 3), and for the sandbox's uid
    (RLIMIT_NPROC). A fork past it fails with EAGAIN."""
    max_file_mb: int = 16
    """Largest file the code may write (RLIMIT_FSIZE), in MiB: writes past it fail with EFBIG."""
    max_open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    work_mb: int = 64
    """Size of the working directory (a tmpfs, so it counts against the machine's memory), in MiB."""
    cpu_cores: int = 1
    """CPU time of the whole sandbox per wall-clock second, in cores, however many threads it runs
    (control group quota)."""

    def __post_init__(self) -> None:
        wrong = [f"{field.name}={getattr(self, field.name)!r} (must be a positive integer)"
                 for field in fields(self)
                 if isinstance(getattr(self, field.name), bool) or not isinstance(getattr(self, field.name), int)
                 or getattr(self, field.name) < 1]
        if not wrong and self.max_processes < 3:
            wrong.append(f"max_processes={self.max_processes} (the launcher, the namespace's init and the worker "
                         "count: at least 3)")
        if wrong:
            raise ValueError(f"invalid sandbox limits: {', '.join(wrong)}")


def reward_scores(result: Any, n: int, function: str) -> list[float | None]:
    """Check a reward function's result: one score per completion, as TRL wants it.

    A score is an int or float (bools count as 1.0 and 0.0) or None. None follows TRL: "this
    function does not apply to that completion", and TRL turns it into NaN and leaves it out of the
    sum over reward functions. NaN or infinity themselves are refused: they are nearly always a bug
    (0/0 on an empty completion), and they would poison the group's mean and spread silently.
    """
    if not isinstance(result, list) or len(result) != n:
        got = f"a list of {len(result)}" if isinstance(result, list) else f"a {type(result).__name__}"
        raise SandboxError(function, "bad_output",
                           f"returned {got}; a reward function returns a list of {n} numbers, one per completion")
    scores: list[float | None] = []
    for index, value in enumerate(result):
        if value is None:
            scores.append(None)
            continue
        if not isinstance(value, int | float):
            raise SandboxError(function, "bad_output", f"score {index} is a {type(value).__name__} "
                               f"({str(value)[:40]!r}); scores are numbers, or None where the reward does not apply")
        try:
            score = float(value)
        except OverflowError:
            score = math.inf
        if not math.isfinite(score):
            raise SandboxError(function, "bad_output", f"score {index} is {value!r}; scores must be finite numbers")
        scores.append(score)
    return scores


def isolation_problems() -> dict[str, str | None]:
    """Each isolation backend, best first, with None if it works here or else what stops it
    (probed once per process and PATH)."""
    return {backend: _probe(backend, os.environ.get("PATH")) for backend in ("bwrap", "unshare")}


def available_isolation() -> tuple[str, ...]:
    """The isolation backends that work on this machine, best first."""
    return tuple(backend for backend, problem in isolation_problems().items() if problem is None)


class SandboxedFunctions:
    """A sandboxed worker that has loaded `code` and serves calls to the named `functions`.

    Use it as a context manager, or call `start()` and `close()`. One caller at a time: calls are
    serialised.
    """

    def __init__(self, code: str, functions: list[str], limits: SandboxLimits | None = None,
                 call_timeout: float = 5.0, start_timeout: float = 30.0, isolation: str = "auto") -> None:
        if not functions:
            raise ValueError("functions: name at least one function that the code defines")
        if isolation not in ("auto", "bwrap", "unshare"):
            raise ValueError(f"isolation={isolation!r}: use 'auto', 'bwrap' or 'unshare'")
        self.code, self.functions = code, list(functions)
        self.limits = limits or SandboxLimits()
        self.call_timeout, self.start_timeout = call_timeout, start_timeout
        self.requested_isolation = isolation
        self.isolation: str | None = None
        """The backend in use, once started."""
        self.host_pid: int | None = None
        """The worker's pid as the host sees it (its own view is a fresh PID namespace)."""
        self.uid: int | None = None
        """The uid the worker runs as on the host; None when not started as root (no uid to drop to)."""
        self.control_group: cgroups.ControlGroup | None = None
        """The running worker's control group; None between workers or where the machine has none."""
        self.last_usage: cgroups.GroupUsage | None = None
        """The figures of the last worker's control group, read as it was removed."""
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._namespace: str | None = None
        self._jail_root: str | None = None
        self._stderr: Any = None
        self._buffer = bytearray()
        self._next_id = 0
        self._cpu_used = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker and load the code; raises SandboxError if the code does not load."""
        with self._lock:
            if self._process is None:
                self._start()

    def call(self, function: str, /, **kwargs: Any) -> Any:
        """Call `function(**kwargs)` in the sandbox and return its (JSON) result."""
        if function not in self.functions:
            raise SandboxError(function, "missing", f"not among the loaded functions ({', '.join(self.functions)})")
        with self._lock:
            try:
                request = json.dumps({"op": "call", "id": self._next_id + 1, "function": function, "kwargs": kwargs})
            except (TypeError, ValueError) as error:
                raise SandboxError(function, "protocol", f"its arguments are not JSON: {error}") from None
            if self._process is not None and self._cpu_used > self.limits.cpu_seconds / 2:
                self._kill()  # a fresh worker has its whole CPU budget again
            if self._process is None:
                self._start()
            self._next_id += 1
            reply = self._exchange(request, function, self.call_timeout)
            if reply.get("id") != self._next_id:
                self._kill()
                raise SandboxError(function, "protocol", f"the worker answered call {reply.get('id')!r} "
                                   f"to call {self._next_id}; something wrote on its reply channel")
            if isinstance(reply.get("cpu"), int | float):
                self._cpu_used = reply["cpu"]
            if self.control_group is not None and self.control_group.oom_kills():
                # A process of the sandbox was killed for memory: whatever the function returned was
                # computed without it, and the worker may be the next to go.
                self._kill()
                raise SandboxError(function, "out_of_memory", self._out_of_memory())
            if reply["ok"]:
                return reply.get("result")
            error = reply["error"]
            raise SandboxError(function, str(error.get("kind")), str(error.get("message")))

    @property
    def launcher_pid(self) -> int | None:
        """The host pid of the launcher (setpriv, then bwrap or unshare) while a worker runs."""
        return None if self._process is None else self._process.pid

    def processes(self) -> list[int]:
        """Host pids of the live processes in the (latest) worker's PID namespace; zombies, already
        dead and waiting for the host's init to reap them, are left out."""
        if self._namespace is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") != self._namespace:
                        continue
                    with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                        state = stat.read().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue  # exited while we looked
                if state not in ("Z", "X"):
                    found.append(int(entry))
        return found

    def close(self) -> None:
        """Kill the worker and everything it started; safe to call twice."""
        with self._lock:
            self._kill()

    # -- the worker's life -------------------------------------------------------------------

    def _start(self) -> None:
        backend = self._choose_backend()
        self.uid = UID_BASE + secrets.randbelow(UID_SPAN) if os.geteuid() == 0 else None
        if backend == "unshare":
            self._jail_root = tempfile.mkdtemp(prefix="weightsmith-sandbox-")
        command, cwd = _command(backend, self.limits, self.uid, self._jail_root)
        if cgroups.available().version is not None:
            try:
                self.control_group = cgroups.create("sandbox", self.limits.memory_mb * 2**20,
                                                    self.limits.max_processes, float(self.limits.cpu_cores))
            except cgroups.CgroupError as error:
                self._kill()
                raise SandboxError(None, "unavailable", f"cannot limit the sandbox's totals: {error}") from None
            command = self.control_group.wrap(command)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the worker
        # close_fds (the default) matters: an inherited descriptor, to the service database say,
        # would go around every wall this sandbox builds.
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=self._stderr, cwd=cwd, env=ENVIRONMENT,
                                             start_new_session=True, close_fds=True)
        except OSError as error:
            self._kill()
            raise SandboxError(None, "unavailable", f"cannot start {command[0]}: {error}") from None
        assert self._process.stdin is not None and self._process.stdout is not None
        os.set_blocking(self._process.stdin.fileno(), False)
        os.set_blocking(self._process.stdout.fileno(), False)
        self.isolation, self._buffer, self._cpu_used, self.starts = backend, bytearray(), 0.0, self.starts + 1
        load = json.dumps({"op": "load", "code": self.code, "functions": self.functions})
        reply = self._exchange(load, None, self.start_timeout)
        if not reply["ok"]:
            self._kill()
            error = reply["error"]
            raise SandboxError(error.get("function"), str(error.get("kind")), str(error.get("message")))
        if isinstance(reply.get("cpu"), int | float):
            self._cpu_used = reply["cpu"]
        self._namespace, self.host_pid = self._find_worker()

    def _choose_backend(self) -> str:
        wanted = ("bwrap", "unshare") if self.requested_isolation == "auto" else (self.requested_isolation,)
        problems = []
        for backend in wanted:
            problem = _probe(backend, os.environ.get("PATH"))
            if problem is None:
                return backend
            problems.append(f"{backend}: {problem}")
        raise SandboxError(None, "unavailable", "no isolation can be created on this machine, so agent code is "
                           f"not run ({'; '.join(problems)}). Install bubblewrap (apt-get install bubblewrap) "
                           "and allow user namespaces, or run the service as root")

    def _find_worker(self) -> tuple[str | None, int | None]:
        """The worker's PID namespace and host pid: the launcher's child is the namespace's init, whose
        child is the worker (bubblewrap and our own jail are built alike)."""
        assert self._process is not None
        init = _children(self._process.pid)
        worker = _children(init[0]) if init else []
        try:
            return os.readlink(f"/proc/{init[0]}/ns/pid"), (worker[0] if worker else None)
        except (OSError, IndexError):
            return None, None

    def _exchange(self, request: str, function: str | None, timeout: float) -> dict[str, Any]:
        """Send one request line and read one reply line within `timeout` seconds."""
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        pending = request.encode("utf-8") + b"\n"
        deadline = time.monotonic() + timeout
        buffer = self._buffer
        newline = buffer.find(b"\n")
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            selector.register(process.stdin, selectors.EVENT_WRITE)
            while newline < 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._kill()
                    what = "did not return" if function else "the code did not load"
                    raise SandboxError(function, "timeout", f"{what} within {timeout:g} s; the worker was killed")
                for key, _ in selector.select(remaining):
                    if key.fileobj is process.stdin:
                        try:
                            pending = pending[os.write(process.stdin.fileno(), pending):]
                        except BrokenPipeError:
                            pending = b""  # the worker is gone: its end of stdout says so next
                        if not pending:
                            selector.unregister(process.stdin)
                        continue
                    chunk = os.read(process.stdout.fileno(), 1 << 16)
                    if not chunk:
                        raise self._death(function)
                    buffer += chunk
                    newline = buffer.find(b"\n", len(buffer) - len(chunk))
                    if newline < 0 and len(buffer) > MAX_REPLY_BYTES:
                        self._kill()
                        raise SandboxError(function, "protocol", f"a reply passed {MAX_REPLY_BYTES} bytes")
        line = bytes(buffer[:newline])
        del buffer[:newline + 1]
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool) or \
                    (not reply["ok"] and not isinstance(reply.get("error"), dict)):
                raise ValueError("not a reply object")
        except ValueError as error:
            self._kill()
            raise SandboxError(function, "protocol", f"the worker sent {line[:80]!r}, not a reply ({error})") from None
        return reply

    def _death(self, function: str | None) -> SandboxError:
        """The worker closed its end: wait for its launcher's status and say what killed it."""
        assert self._process is not None
        try:
            self._process.wait(timeout=5.0)  # the launcher exits right after the namespace's init
        except subprocess.TimeoutExpired:
            pass
        self._stderr.seek(0)
        log = self._stderr.read()[-1500:].decode("utf-8", "replace").strip()
        out_of_memory = self.control_group is not None and self.control_group.oom_kills() > 0
        status = self._kill()
        if out_of_memory:
            return SandboxError(function, "out_of_memory", self._out_of_memory())
        signum = -status if status < 0 else status - 128 if status > 128 else None
        if signum == signal.SIGXCPU:
            cause = f"used up its CPU limit of {self.limits.cpu_seconds} s (SIGXCPU)"
        elif signum == signal.SIGKILL:
            cause = "was killed by SIGKILL (the hard CPU limit, or the machine's out-of-memory killer)"
        elif signum is not None and signum in signal.valid_signals():
            cause = f"died from {signal.Signals(signum).name}"
        else:
            cause = f"exited with status {status}"
        subject = "the worker" if function is None else f"the worker running {function!r}"
        return SandboxError(function, "killed", f"{subject} {cause}" + (f": {log}" if log else ""))

    def _out_of_memory(self) -> str:
        """What the out-of-memory error says; call after `_kill`, which reads the group's figures."""
        usage = self.last_usage
        killed = f"{usage.oom_kills} process(es)" if usage else "a process"
        return (f"the sandbox's processes together reached memory_mb={self.limits.memory_mb} MiB (the limit "
                f"covers all of them, files in the working directory included), and the kernel killed "
                f"{killed}; the worker was replaced. Use less memory, or fewer processes at once")

    def _kill(self) -> int:
        """SIGKILL the launcher's process group and return its exit status.

        The launcher's death takes the namespace's init with it (bubblewrap's --die-with-parent,
        unshare's --kill-child), and the kernel then kills every process left in the PID namespace,
        whatever session or process group agent code moved it to.
        """
        process, self._process = self._process, None
        status = 0
        if process is not None:
            if process.returncode is None:  # not yet reaped, so its pid cannot have been reused
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            status = process.wait()
            for pipe in (process.stdin, process.stdout):
                try:
                    pipe.close()  # type: ignore[union-attr]
                except OSError:
                    pass
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.control_group is not None:
            # After the launcher: its death takes the namespace down, so the group is all but empty.
            self.last_usage = self.control_group.remove()
            self.control_group = None
        if self._jail_root is not None:
            shutil.rmtree(self._jail_root, ignore_errors=True)
            self._jail_root = None
        return status


def _command(backend: str, limits: SandboxLimits, uid: int | None, jail_root: str | None) -> tuple[list[str], str]:
    """The launcher's command line and working directory."""
    # The interpreter through its directory's real path (the sandbox shows real paths only), but not
    # resolved itself: Python finds its virtualenv from the path it was started by.
    python = os.path.join(os.path.realpath(os.path.dirname(sys.executable)), os.path.basename(sys.executable))
    worker = [python, "-E", "-s", "-B", "-m", "sandbox", "--memory-mb", str(limits.memory_mb),
              "--cpu-seconds", str(limits.cpu_seconds), "--max-processes", str(limits.max_processes),
              "--max-file-mb", str(limits.max_file_mb), "--max-open-files", str(limits.max_open_files)]
    if os.uname().machine == "x86_64":
        worker.append("--require-seccomp")  # the filter exists here, so failing to load it is an error
    if uid is not None:
        worker += ["--uid", str(uid)]
    # Tie the launcher to us: if this process dies, the launcher gets SIGKILL and takes the
    # sandbox with it. The kernel sends it when the *thread* that started the worker exits.
    prefix = [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
    package = _package_dir()
    if backend == "bwrap":
        return prefix + _bwrap_arguments(limits, uid is not None, package) + worker + ["--workdir", WORKDIR], "/"
    flags = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child"]
    if uid is None:
        flags = ["--user", "--map-root-user"] + flags
    binds = [argument for path in _visible_paths() for argument in ("--jail-bind", path)]
    assert jail_root is not None
    return (prefix + [_which("unshare"), *flags, "--"] + worker
            + ["--jail", jail_root, *binds, "--work-mb", str(limits.work_mb)], os.path.dirname(package))


def _bwrap_arguments(limits: SandboxLimits, as_root: bool, package: str) -> list[str]:
    arguments = [_which("bwrap"), "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                 "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if as_root:
        # Real root runs bubblewrap without a user namespace; the worker keeps just what it needs
        # to hand its working directory to the sandbox uid and become that uid.
        arguments += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_CHOWN"]
    else:
        arguments += ["--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534"]
    arguments.append("--clearenv")
    for name, value in ENVIRONMENT.items():
        arguments += ["--setenv", name, value]
    made: set[str] = {"/"}

    def parents(path: str) -> list[str]:
        # bubblewrap makes missing parents mode 0700, which the sandbox uid could not traverse.
        out = []
        parent = os.path.dirname(path)
        while parent not in made:
            made.add(parent)
            out = ["--perms", "0755", "--dir", parent] + out
            parent = os.path.dirname(parent)
        return out

    for path in _visible_paths():
        if os.path.islink(path):
            arguments += parents(path) + ["--symlink", os.readlink(path), path]
        else:
            arguments += parents(path) + ["--ro-bind", path, path]
        made.add(path)
    target = f"{PACKAGE_MOUNT}/sandbox"
    arguments += parents(target) + ["--ro-bind", package, target]
    arguments += ["--dev", "/dev", "--proc", "/proc", *parents(WORKDIR),
                  "--perms", "0700", "--size", str(limits.work_mb * 1024 * 1024), "--tmpfs", WORKDIR,
                  "--remount-ro", "/", "--chdir", PACKAGE_MOUNT]
    return arguments


def _visible_paths() -> list[str]:
    """Everything the sandbox shows of the host, read-only: system paths and the Python installation.

    The Python prefixes are the real paths (a virtualenv and the interpreter it points to), never a
    parent such as a repository root, which may hold a service home.
    """
    paths = [path for path in SYSTEM_PATHS if os.path.lexists(path)]
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        real = os.path.realpath(prefix)
        if not any(real == kept or real.startswith(kept + "/") for kept in paths):
            paths.append(real)
    return paths


def _package_dir() -> str:
    spec = importlib.util.find_spec("sandbox")  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SandboxError(None, "unavailable", "the 'sandbox' package is not installed next to training_core")
    return os.path.realpath(next(iter(spec.submodule_search_locations)))


def _which(program: str) -> str:
    return shutil.which(program) or program


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="utf-8") as file:
            return [int(child) for child in file.read().split()]
    except OSError:
        return []


@functools.cache
def _probe(backend: str, path: str | None) -> str | None:
    """None if `backend` can build a sandbox here, else what went wrong (once per process and PATH,
    since PATH decides which programs are found)."""
    program = "bwrap" if backend == "bwrap" else "unshare"
    if shutil.which(program) is None:
        return f"{program} is not installed"
    as_root = os.geteuid() == 0
    if backend == "bwrap":
        command = _bwrap_arguments(SandboxLimits(), as_root, _package_dir()) + ["true"]
    else:
        command = [_which("unshare"), *([] if as_root else ["--user", "--map-root-user"]),
                   "--net", "--pid", "--mount", "--fork", "true"]
    try:
        done = subprocess.run(command, capture_output=True, env=ENVIRONMENT, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    if done.returncode != 0:
        return done.stderr.decode("utf-8", "replace").strip()[-300:] or f"exit status {done.returncode}"
    return None
