"""Runs code an agent wrote (reward functions, custom metrics, data filters) in an isolated worker.

`python -m sandbox` is a long-lived worker that loads the agent's code once and answers calls as
JSON lines over its stdin and stdout (protocol in `__main__.py`). The training core starts and
drives it through `training_core/sandboxed.py`, which owns the wall-clock timeout and the kill.
Neither side imports the other, nor anything of the service.

How the worker is confined, by the client that starts it:

- **bubblewrap** (`bwrap`), where installed and working: new network, PID, IPC, UTS (and cgroup)
  namespaces; a read-only root built from nothing, holding only /usr (and the /bin, /lib
  symlinks), the dynamic loader's files from /etc, the Python installation (the interpreter and
  the virtualenv, by their real paths), this package, a minimal /dev and a /proc of its own.
  Started by root, it keeps no user namespace, and the worker drops itself to a fresh uid (see
  below); started by another user, it runs as uid 65534 in a user namespace that cannot make
  another one.
- **unshare** otherwise: util-linux `unshare` makes the same namespaces and the worker builds the
  same root itself, chroots into it and drops to the fresh uid (`confine.enter_jail`).
- **neither**: the client refuses to run agent code at all (`SandboxError` kind `unavailable`).
  There is no unconfined mode.

What the sandbox covers:

- **Network**: none. The network namespace has no interface but its own loopback (so the host's
  127.0.0.1 and abstract unix sockets are out of reach), and on x86-64 the seccomp filter
  refuses every socket but AF_UNIX.
- **Files**: the service's home, its database, agent keys, /etc/shadow, /root, /tmp, the
  repository: none of them exists in the sandbox's view. What it does see is read-only. Writes go
  to a fresh tmpfs working directory (`/home/sandbox`, also HOME; `work_mb` big), which vanishes
  with the worker; no file larger than `max_file_mb` (RLIMIT_FSIZE, EFBIG rather than a signal).
- **Privilege**: started as root, the worker becomes a uid drawn per worker from a range no
  account uses, with no capabilities and no_new_privs, so even a file that were visible would be
  read only if it is world-readable, and RLIMIT_NPROC counts this worker alone.
- **Processes**: its own PID namespace: it sees and can signal none of the host's processes (the
  client, the service, other sandboxes). At most `max_processes` processes and threads, counted in
  its control group (see Totals) and for its uid (RLIMIT_NPROC); a fork bomb gets EAGAIN.
- **Memory and CPU**: RLIMIT_AS (`memory_mb` per process: allocation beyond it raises MemoryError),
  RLIMIT_CPU (`cpu_seconds` over the worker's life: SIGXCPU, then SIGKILL a second later; the
  client replaces a worker before half of it is spent), RLIMIT_NOFILE, no core dumps.
- **Totals**, where the machine has control groups (cgroup v2 with the memory and pids controllers
  handed down, or cgroup v1 hierarchies this process may write, as root; see
  `training_core/cgroups.py`): each worker gets a group of its own before it execs, so every
  process it or agent code starts is inside. All of them together hold at most `memory_mb` (their
  working-directory files included), `max_processes` processes and threads (the launcher and the
  namespace's init count), and `cpu_cores` cores' worth of CPU time. Past the memory total the
  kernel kills a process of the group, and the call fails with `out_of_memory`. The group is
  removed with the worker; groups left by a crashed client are removed at the next start.
- **Time**: the client's wall-clock timeout per call; on timeout, death or close it SIGKILLs the
  launcher's process group, the namespace's init dies with the launcher, and the kernel kills
  every process left in the PID namespace. If the client process dies, `setpriv --pdeathsig`
  takes the sandbox down with it.
- **Secrets**: the environment is exactly PATH, LANG and HOME (bubblewrap adds PWD); no
  descriptor but the two protocol pipes is inherited.
- **Syscalls** (x86-64): a seccomp filter refuses new namespaces, ptrace and cross-process memory
  access, mounts, kernel modules, keyrings, BPF, perf, userfaultfd and io_uring (`seccomp.py`).
- **The channel**: agent code's stdin, stdout and stderr are /dev/null, so prints and floods do not
  reach the protocol.

What it does not cover:

- **Totals without control groups**: where `cgroups.available()` finds none (not root and no
  delegated cgroup v2 subtree; its `reason` says which, and the service logs it at start), only
  the per-process rlimits hold: the sandbox as a whole can then hold up to `max_processes` x
  `memory_mb` of memory, plus `work_mb` of tmpfs, and keep every core busy (with processes or
  threads) until the call's timeout.
- **Disk and memory bandwidth, and I/O**: not limited, with or without a group. The group's memory
  total counts the page cache its reads fill, which the kernel reclaims before it kills.
- **What is visible is readable**: /usr and the whole Python installation, including every
  package in the virtualenv. Keep secrets out of them. /proc shows host-wide figures (CPU,
  memory, load, uptime).
- **The kernel**: the sandbox shares the host's kernel; namespaces and the seccomp deny list shrink
  what it can reach, but a kernel exploit through an allowed syscall is not stopped. On
  architectures other than x86-64 there is no seccomp filter at all. This is not a VM.
- **Its own results**: agent code can find the protocol descriptors and write on them; that
  garbles or forges only its own replies, which the client reports as a `protocol` error.
- **State between calls**: module globals and working-directory files persist within one worker
  (that is what makes it fast); a worker replaced after a timeout, a death or a spent CPU budget
  starts clean.
- **The parent-death signal** follows the thread that started the worker: a client that starts a
  sandbox in a thread which then exits loses it.
- **The unshare fallback** chroots rather than pivots its root, so the host's mounts stay in the
  sandbox's mount namespace underneath; no process inside holds a capability to reach them.
"""
