"""Control groups: one memory, process-count and CPU ceiling for a whole tree of processes.

    support = cgroups.available()            # once at start: log support.reason either way
    group = cgroups.create("job", memory_bytes=8 << 30, max_processes=256, cpu_quota=2.0)
    process = subprocess.Popen(group.wrap(command), ...)
    ...
    usage = group.remove()                   # kills what is left, removes the group
    if usage.oom_kills: ...                  # the tree ran out of its memory

rlimits count per process, so five children may each take the whole of a per-process limit; a
control group counts the tree: every process the child starts, however it forks, is in the group
and in its totals (memory, page cache and tmpfs files included), and none of them can leave it
without privileges the sandbox drops.

Where a group is made:

- **cgroup v2** when this process's cgroup hands the memory and pids controllers down (real
  root, or a delegated subtree such as systemd's `Delegate=yes`). v2 lets a cgroup with
  processes in it give no controllers to its children, so a process alone in its cgroup first
  moves itself into a leaf of it (`weightsmith-self`) and the new groups are made beside that leaf.
- **cgroup v1** otherwise, when the memory and pids hierarchies are mounted and writable (root): a
  directory under this process's own cgroup in each of them (and under cpu for the quota).
- **none** otherwise; `available().reason` says why in one line, and nothing here limits totals.

Groups are made under this process's own cgroup, so a limit an operator put on the service still
bounds every sandbox and job below it. A group is named after its owner (pid and start time):
`create` first removes the groups of owners that have died (a crash leaves them behind), killing
anything still in them.

A child enters its group before it runs anything: `wrap` puts `/bin/sh` in front of the command,
which writes its own pid into the group and then execs the command, so every descendant is born
inside. (`preexec_fn` would do the same, but it is unsafe in a process with threads, which
training processes always have; writing the pid after `Popen` returns races with the child's
first fork.)
"""

from __future__ import annotations

import errno
import functools
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu")
"""What a group limits: memory and pids are required, cpu (the quota) is used where present."""
PREFIX = "weightsmith-"
SELF_LEAF = "weightsmith-self"
"""Under cgroup v2, the leaf a process moves itself into so that its cgroup can hold groups."""
CPU_PERIOD_US = 100_000
_OWNED = re.compile(r"^weightsmith-[a-z]+-(\d+)-(\d+)-[0-9a-f]+$")
_JOIN = ('for f do [ "$f" = -- ] && break; echo $$ > "$f" || '
         '{ echo "cannot enter control group $f" >&2; exit 125; }; shift; done; shift; exec "$@"')


class CgroupError(Exception):
    """A control group could not be made or entered; the message says which file and why."""


@dataclass(frozen=True)
class CgroupSupport:
    """What this machine lets this process do with control groups."""

    version: str | None
    """"v2", "v1", or None when no group can be made here."""
    controllers: tuple[str, ...]
    """The controllers a group gets: memory and pids, and cpu where it is available."""
    reason: str
    """One line for the service's log: what is used, or why nothing is."""
    parents: tuple[tuple[Path, frozenset[str]], ...] = ()
    """Where groups are made, with the controllers each directory carries: one per v1 hierarchy,
    or the one v2 directory."""


@dataclass(frozen=True)
class GroupUsage:
    """A group's figures, read from the kernel's files; None where this kernel does not keep one."""

    memory_peak_bytes: int | None
    oom_kills: int
    """Processes the kernel's out-of-memory killer stopped because the group was at its limit."""
    processes: int
    fork_refusals: int
    """Forks and clones refused because the group was at `max_processes`."""


@dataclass(frozen=True)
class ControlGroup:
    """One group: a directory per hierarchy (v1) or one directory (v2)."""

    name: str
    version: str
    places: tuple[tuple[Path, frozenset[str]], ...]
    """Its directories, with the controllers each carries."""
    memory_bytes: int
    max_processes: int
    cpu_quota: float | None

    @property
    def directories(self) -> tuple[Path, ...]:
        return tuple(directory for directory, _ in self.places)

    def wrap(self, command: list[str]) -> list[str]:
        """`command` prefixed so that its process enters this group before it execs (exit status 125
        and a line on stderr if it cannot)."""
        procs = [str(directory / "cgroup.procs") for directory in self.directories]
        return ["/bin/sh", "-c", _JOIN, "cgroup-enter", *procs, "--", *command]

    def join(self, pid: int) -> None:
        """Move an existing process (not its children) into this group."""
        for directory in self.directories:
            _write(directory / "cgroup.procs", str(pid))

    def usage(self) -> GroupUsage:
        if self.version == "v2":
            (directory,) = self.directories
            return GroupUsage(
                memory_peak_bytes=_read_int(directory / "memory.peak"),
                oom_kills=_keyed(directory / "memory.events").get("oom_kill", 0),
                processes=_read_int(directory / "pids.current") or 0,
                fork_refusals=_keyed(directory / "pids.events").get("max", 0))
        memory, pids = self._v1("memory"), self._v1("pids")
        return GroupUsage(
            memory_peak_bytes=_read_int(memory / "memory.max_usage_in_bytes"),
            oom_kills=_keyed(memory / "memory.oom_control").get("oom_kill", 0),
            processes=_read_int(pids / "pids.current") or 0,
            fork_refusals=_keyed(pids / "pids.events").get("max", 0))

    def oom_kills(self) -> int:
        """How many processes of the group the out-of-memory killer has stopped (one small read)."""
        if self.version == "v2":
            return _keyed(self.directories[0] / "memory.events").get("oom_kill", 0)
        return _keyed(self._v1("memory") / "memory.oom_control").get("oom_kill", 0)

    def remove(self, timeout: float = 10.0) -> GroupUsage | None:
        """Kill every process left in the group, remove it, and return its last figures (None when
        it was already gone). Groups nested inside it (a job's sandboxes) go first."""
        try:
            usage = self.usage()
        except FileNotFoundError:
            usage = None
        deadline = time.monotonic() + timeout
        for directory in self.directories:
            _remove_tree(directory, deadline)
        return usage

    def _v1(self, controller: str) -> Path:
        return next(directory for directory, controllers in self.places if controller in controllers)


def available() -> CgroupSupport:
    """What control groups this process can make (probed once per process: a group is made and
    removed)."""
    return _support(os.getpid())


def create(purpose: str, memory_bytes: int, max_processes: int, cpu_quota: float | None = None) -> ControlGroup:
    """A new, empty group with these limits, for a child to enter through `wrap`.

    `purpose` is a lower-case word in the group's name ("sandbox", "job"). `memory_bytes` caps the
    whole tree's memory (no swap beyond it where the kernel can say so); `max_processes` caps its
    processes and threads together; `cpu_quota` caps its CPU time in cores (1.5: one and a half
    cores' worth, however many threads), none when None or without a cpu controller. Raises
    CgroupError when this machine allows no group (`available().reason` says why) or it cannot be
    made.
    """
    if not re.fullmatch(r"[a-z]+", purpose):
        raise ValueError(f"purpose={purpose!r}: use a lower-case word such as 'sandbox' or 'job'")
    if memory_bytes < 1 or max_processes < 1 or (cpu_quota is not None and cpu_quota <= 0):
        raise ValueError(f"memory_bytes={memory_bytes}, max_processes={max_processes} and cpu_quota={cpu_quota} "
                         "must be positive")
    support = available()
    if support.version is None:
        raise CgroupError(support.reason)
    _remove_stale(support.parents)
    name = _owned_name(purpose)
    places = tuple((parent / name, controllers) for parent, controllers in support.parents)
    group = ControlGroup(name, support.version, places, memory_bytes, max_processes,
                         cpu_quota if "cpu" in support.controllers else None)
    try:
        for directory in group.directories:
            directory.mkdir()
        _set_limits(group)
    except OSError as error:
        group.remove(timeout=1.0)
        raise CgroupError(f"cannot make control group {name}: {error}") from None
    return group


# ---- limits --------------------------------------------------------------------------------------

def _set_limits(group: ControlGroup) -> None:
    if group.version == "v2":
        (directory,) = group.directories
        _write(directory / "memory.max", str(group.memory_bytes))
        if (directory / "memory.swap.max").exists():
            _write(directory / "memory.swap.max", "0")
        # At its limit the group is killed whole, as a sandbox's processes stand or fall together.
        _write(directory / "memory.oom.group", "1")
        _write(directory / "pids.max", str(group.max_processes))
        if group.cpu_quota is not None:
            _write(directory / "cpu.max", f"{round(group.cpu_quota * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        return
    for directory, controllers in group.places:
        if "memory" in controllers:
            _write(directory / "memory.limit_in_bytes", str(group.memory_bytes))
            if (directory / "memory.memsw.limit_in_bytes").exists():  # swap accounting is on
                _write(directory / "memory.memsw.limit_in_bytes", str(group.memory_bytes))
        if "pids" in controllers:
            _write(directory / "pids.max", str(group.max_processes))
        if "cpu" in controllers and group.cpu_quota is not None:
            _write(directory / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(directory / "cpu.cfs_quota_us", str(round(group.cpu_quota * CPU_PERIOD_US)))


# ---- what this machine allows --------------------------------------------------------------------

@functools.cache
def _support(pid: int) -> CgroupSupport:
    """Per pid, so a forked child probes again for itself (it may sit in another cgroup)."""
    mounts = _cgroup_mounts()
    memberships = _memberships()
    v2 = _v2_support(mounts, memberships)
    if v2.version is not None:
        return v2
    v1 = _v1_support(mounts, memberships)
    if v1.version is not None:
        return v1
    return CgroupSupport(None, (), f"no control groups, so sandbox and job totals are not limited: {v2.reason}; "
                         f"{v1.reason}")


def _v2_support(mounts: list[tuple[str, str, str, set[str]]], memberships: dict[str, str]) -> CgroupSupport:
    mount = next(((root, point) for fstype, root, point, _ in mounts if fstype == "cgroup2"), None)
    if mount is None or "" not in memberships:
        return CgroupSupport(None, (), "cgroup v2 is not mounted")
    own = _inside(mount, memberships[""])
    if own is None:
        return CgroupSupport(None, (), f"cgroup v2: this process's cgroup {memberships['']} is outside the mount "
                             f"at {mount[1]}")
    if own.name == SELF_LEAF:
        own = own.parent
    offered = set(_read_words(own / "cgroup.controllers"))
    missing = [c for c in ("memory", "pids") if c not in offered]
    if missing:
        in_v1 = any(fstype == "cgroup" and set(missing) & options for fstype, _, _, options in mounts)
        return CgroupSupport(None, (), f"cgroup v2 at {own} offers no {' or '.join(missing)} controller"
                             + (" (this machine mounts them as cgroup v1)" if in_v1 else ""))
    controllers = tuple(c for c in CONTROLLERS if c in offered)
    enabled = set(_read_words(own / "cgroup.subtree_control"))
    if not set(controllers) <= enabled:
        problem = _hand_down(own, controllers)
        if problem:
            return CgroupSupport(None, (), f"cgroup v2 at {own}: {problem}")
    return _probed(CgroupSupport("v2", controllers, f"cgroup v2 under {own} ({', '.join(controllers)})",
                                 ((own, frozenset(controllers)),)))


def _hand_down(own: Path, controllers: tuple[str, ...]) -> str | None:
    """Enable `controllers` for the children of `own`, moving this process into a leaf first when it
    is alone there (v2 gives no controllers to the children of a cgroup with processes in it)."""
    try:
        members = [int(pid) for pid in _read_words(own / "cgroup.procs")]
        if members == [os.getpid()]:
            leaf = own / SELF_LEAF
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
        elif members:
            return (f"it holds {len(members)} processes, so it cannot hand controllers down; start the service "
                    "alone in a delegated cgroup (systemd: Delegate=yes)")
        _write(own / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))
    except OSError as error:
        return f"cannot hand controllers down ({error.strerror}: {error.filename})"
    return None


def _v1_support(mounts: list[tuple[str, str, str, set[str]]], memberships: dict[str, str]) -> CgroupSupport:
    parents: dict[str, Path] = {}
    for controller in CONTROLLERS:
        mount = next(((root, point) for fstype, root, point, options in mounts
                      if fstype == "cgroup" and controller in options), None)
        own = _inside(mount, memberships.get(controller, "")) if mount else None
        if own is not None:
            parents[controller] = own
    missing = [c for c in ("memory", "pids") if c not in parents]
    if missing:
        return CgroupSupport(None, (), f"cgroup v1 has no {' or '.join(missing)} hierarchy mounted")
    unwritable = [str(p) for p in parents.values() if not os.access(p, os.W_OK)]
    if unwritable:
        return CgroupSupport(None, (), f"cgroup v1: cannot write to {', '.join(unwritable)} (needs root)")
    controllers = tuple(parents)
    # Co-mounted controllers (cpu,cpuacct with memory, say) share one directory.
    places = tuple((directory, frozenset(c for c in controllers if parents[c] == directory))
                   for directory in dict.fromkeys(parents.values()))
    where = ", ".join(str(directory) for directory, _ in places)
    return _probed(CgroupSupport("v1", controllers, f"cgroup v1 under {where} ({', '.join(controllers)})"
                                 + ("" if "cpu" in controllers else "; no cpu hierarchy, so no CPU quota"),
                                 places))


def _probed(support: CgroupSupport) -> CgroupSupport:
    """`support` if a group can really be made and removed there, else none with the reason."""
    name = _owned_name("probe")
    made = []
    try:
        for parent, _ in support.parents:
            (parent / name).mkdir()
            made.append(parent / name)
    except OSError as error:
        return CgroupSupport(None, (), f"{support.reason}: cannot make a group ({error.strerror}: {error.filename})")
    finally:
        for directory in made:
            directory.rmdir()
    return support


def _cgroup_mounts() -> list[tuple[str, str, str, set[str]]]:
    """(filesystem type, root of the mount in its hierarchy, mount point, super options) of each cgroup mount."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            fstype, options = fields[separator + 1], set(fields[separator + 3].split(","))
            if fstype in ("cgroup", "cgroup2"):
                found.append((fstype, _unescape(fields[3]), _unescape(fields[4]), options))
    return found


def _memberships() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its v2 path."""
    found: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8") as cgroup:
        for line in cgroup:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                found[controller] = path
    return found


def _inside(mount: tuple[str, str] | None, path: str) -> Path | None:
    """The directory of cgroup `path` under a mount of its hierarchy, or None if the mount does not
    show it (a container that sees only part of the hierarchy)."""
    if mount is None or not path:
        return None
    root, point = mount
    relative = os.path.relpath(path, root)
    if relative.startswith(".."):
        return None
    directory = Path(point) / relative if relative != "." else Path(point)
    return directory if directory.is_dir() else None


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


# ---- removal -------------------------------------------------------------------------------------

def _remove_stale(parents: tuple[tuple[Path, frozenset[str]], ...]) -> None:
    """Remove the groups whose owner has died (a crashed service or job leaves them). A look at a
    few directory entries, so done at every `create`: a long-lived service meets crashed jobs too."""
    deadline = time.monotonic() + 10.0
    for parent, _ in parents:
        for entry in parent.iterdir():
            owner = _OWNED.match(entry.name)
            if owner and entry.is_dir() and not _alive(int(owner.group(1)), int(owner.group(2))):
                _remove_tree(entry, deadline)


def _remove_tree(directory: Path, deadline: float) -> bool:
    """Kill what is in `directory` and its child groups and remove them all; False if some stayed
    past the deadline (left for the next start's stale sweep)."""
    try:
        children = [entry for entry in directory.iterdir() if entry.is_dir()]
    except FileNotFoundError:
        return True
    removed = True
    for child in children:  # every one, even after one stays
        removed = _remove_tree(child, deadline) and removed
    if (directory / "cgroup.kill").exists():
        try:
            _write(directory / "cgroup.kill", "1")
        except OSError:
            pass  # gone meanwhile
    while True:
        try:
            directory.rmdir()
            return removed
        except FileNotFoundError:
            return removed
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
        for pid in _read_words(directory / "cgroup.procs"):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)  # the killed processes exit and are reaped by their parents


def _owned_name(purpose: str) -> str:
    return f"{PREFIX}{purpose}-{os.getpid()}-{_start_time(os.getpid())}-{secrets.token_hex(4)}"


def _alive(pid: int, started: int) -> bool:
    try:
        return _start_time(pid) == started
    except (FileNotFoundError, ProcessLookupError):
        return False


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot: with the pid, it names one process for good."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[19])


# ---- files ---------------------------------------------------------------------------------------

def _write(path: Path, value: str) -> None:
    # cgroup files take one write each: no buffering that could split it.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        return []


def _read_int(path: Path) -> int | None:
    words = _read_words(path)
    return int(words[0]) if words and words[0].isdigit() else None


def _keyed(path: Path) -> dict[str, int]:
    """A flat keyed file ("oom_kill 2" per line) as a dict."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            found[key] = int(value)
    return found
