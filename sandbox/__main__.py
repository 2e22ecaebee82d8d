"""python -m sandbox [--memory-mb N] [--cpu-seconds N] [--max-processes N] [--max-file-mb N] [--max-open-files N]

The long-lived sandboxed worker. The client (`training_core/sandboxed.py`) starts it inside its
isolation (see the package docstring) and speaks JSON lines with it over stdin and stdout:

    {"op": "load", "code": "<python source>", "functions": ["name", ...]}
        -> {"ok": true, "cpu": float}
         | {"ok": false, "error": {"function": str|null, "kind": "syntax"|"missing"|"raised", "message": str}}
    {"op": "call", "id": int, "function": "name", "kwargs": {...}}
        -> {"id": int, "ok": true, "result": <json>, "cpu": float}
         | {"id": int, "ok": false, "cpu": float,
            "error": {"function": "name", "kind": "raised"|"bad_output", "message": str}}

`cpu` is the CPU seconds the worker has used so far, so the client can replace a worker before
RLIMIT_CPU (a budget over the worker's whole life) runs out under a long series of calls.

Started by hand it applies only the rlimits and the seccomp filter; the options after the first
five (`--uid`, `--jail`, ...) are the client's way to have it confine itself further.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import resource
import sys
import traceback
from typing import Any, BinaryIO

from sandbox import confine, seccomp

AGENT_FILE = "<agent code>"
MAX_MESSAGE = 4000


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # The protocol moves off fds 0 and 1 before anything else, so neither agent code nor any
    # library it calls can read our requests or print into our replies by accident.
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)

    if args.jail:
        confine.enter_jail(args.jail, args.jail_bind, args.work_mb, args.uid)
    else:
        if args.uid is not None:  # root's bubblewrap left us CAP_CHOWN, CAP_SETUID, CAP_SETGID for this
            os.chown(args.workdir, args.uid, args.uid)
        confine.drop_privileges(args.uid)
    if args.workdir:
        os.chdir(args.workdir)
    confine.apply_limits(confine.Limits(args.memory_mb, args.cpu_seconds, args.max_processes,
                                        args.max_file_mb, args.max_open_files))
    if not seccomp.install() and args.require_seccomp:
        print("sandbox: no seccomp filter for this architecture", file=sys.stderr)
        return 3
    # Setup errors went to stderr for the client's diagnostics; from here on it is agent territory.
    os.dup2(null, 2)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 -- open for the worker's whole life
    sys.stdout = sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    _serve(requests, replies)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sandbox")
    parser.add_argument("--memory-mb", type=int, default=1024, help="RLIMIT_AS of each process")
    parser.add_argument("--cpu-seconds", type=int, default=60, help="RLIMIT_CPU of each process")
    parser.add_argument("--max-processes", type=int, default=32, help="RLIMIT_NPROC (the worker's uid)")
    parser.add_argument("--max-file-mb", type=int, default=16, help="RLIMIT_FSIZE")
    parser.add_argument("--max-open-files", type=int, default=64, help="RLIMIT_NOFILE")
    parser.add_argument("--uid", type=int, help="drop to this uid and gid (when started as root)")
    parser.add_argument("--workdir", help="directory to work in")
    parser.add_argument("--jail", help="build the sandbox root here and chroot into it (no bubblewrap)")
    parser.add_argument("--jail-bind", action="append", default=[], help="path to show read-only in the jail")
    parser.add_argument("--work-mb", type=int, default=64, help="size of the jail's tmpfs working directory")
    parser.add_argument("--require-seccomp", action="store_true", help="refuse to run without the filter")
    return parser.parse_args(argv)


def _serve(requests: BinaryIO, replies: BinaryIO) -> None:
    worker_pid = os.getpid()

    def forget_channel() -> None:
        # A process that agent code forks must not answer requests in the worker's place.
        requests.close()
        replies.close()

    os.register_at_fork(after_in_child=forget_channel)
    functions: dict[str, Any] = {}
    for line in requests:
        request = json.loads(line)
        if request["op"] == "load":
            reply = _load(request["code"], request["functions"], functions)
        else:
            reply = {"id": request["id"], **_call(request["function"], request["kwargs"], functions)}
        if os.getpid() != worker_pid:
            os._exit(0)  # a child forked by agent code that returned from our call: it is done
        reply["cpu"] = _cpu_seconds()
        try:
            data = json.dumps(reply).encode("utf-8")
        except (TypeError, ValueError, RecursionError, MemoryError) as error:  # only a call result can fail
            kind = type(reply["result"]).__name__
            reply = {"id": reply["id"], **_error(request["function"], "bad_output",
                                                 f"returned a {kind}, which is not JSON: {error}"),
                     "cpu": reply["cpu"]}
            data = json.dumps(reply).encode("utf-8")
        replies.write(data + b"\n")
        replies.flush()


def _load(code: str, names: list[str], functions: dict[str, Any]) -> dict[str, Any]:
    functions.clear()
    try:
        compiled = compile(code, AGENT_FILE, "exec")
    except SyntaxError as error:
        return _error(None, "syntax", f"line {error.lineno}: {error.msg}")
    # Tracebacks from agent code then quote its lines, as they would for a file.
    linecache.cache[AGENT_FILE] = (len(code), None, code.splitlines(keepends=True), AGENT_FILE)
    namespace: dict[str, Any] = {"__name__": "agent_code"}
    try:
        exec(compiled, namespace)  # noqa: S102 -- running agent code is what the sandbox is for
    except BaseException as error:  # noqa: BLE001 -- whatever the module body does, the client hears of it
        return _error(None, "raised", _describe(error))
    for name in names:
        if not callable(namespace.get(name)):
            defined = sorted(key for key, value in namespace.items() if callable(value) and not key.startswith("_"))
            return _error(name, "missing", f"the code defines no function {name!r}; it defines "
                          f"{', '.join(defined) or 'no functions'}")
        functions[name] = namespace[name]
    return {"ok": True}


def _call(name: str, kwargs: dict[str, Any], functions: dict[str, Any]) -> dict[str, Any]:
    if name not in functions:
        return _error(name, "missing", f"{name!r} was not loaded; loaded: {', '.join(functions) or 'none'}")
    try:
        result = functions[name](**kwargs)
        if hasattr(result, "__await__"):  # TRL allows async reward functions
            import asyncio

            result = asyncio.run(result)
    except BaseException as error:  # noqa: BLE001 -- SystemExit and KeyboardInterrupt included
        return _error(name, "raised", _describe(error))
    return {"ok": True, "result": result}


def _describe(error: BaseException) -> str:
    """The exception and the agent code's frames, without the worker's own."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == AGENT_FILE]
    where = "".join(f" (line {frame.lineno}, in {frame.name}: {frame.line})" for frame in frames[-1:])
    message = f"{type(error).__name__}: {error}{where}"
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "..."


def _error(function: str | None, kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"function": function, "kind": kind, "message": message}}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


if __name__ == "__main__":
    sys.exit(main())
