"""python -m training_core.serving --host 127.0.0.1 --port 0 --memory-mb 2048 [--ready-file PATH]

Runs the engine (see engine.py) behind OpenAI-compatible routes (see app.py) until SIGINT/SIGTERM or
until the process that started it dies. Once it accepts requests it prints
`weightsmith engine ready on http://HOST:PORT` and, with `--ready-file`, writes
`{"port": PORT, "pid": PID, "url": "http://HOST:PORT/v1"}` there (atomically: a reader never sees half
of it). `--port 0` takes a free port, which is how `client.EngineProcess` starts it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from training_core.hardware import pick_device
from training_core.serving.app import build_app
from training_core.serving.engine import Engine
from training_core.serving.models import ModelCache


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training_core.serving",
                                     description="OpenAI-compatible routes over batched generation.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 takes a free port")
    parser.add_argument("--memory-mb", type=float, default=4096,
                        help="weights of loaded models and adapters, least recently used evicted beyond it")
    parser.add_argument("--max-batch-rows", type=int, default=32, help="most rows (choices) in one batch")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0,
                        help="longest a waiting request waits for the last batch's clients to come back")
    parser.add_argument("--default-max-tokens", type=int, default=512,
                        help="tokens a choice may generate when the request gives no max_tokens")
    parser.add_argument("--device", default=None, help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's choice, one per core); on a CPU that "
                        "training jobs share, 1 or 2 avoids threads spinning against each other")
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)

    _exit_with_parent()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine = Engine(ModelCache(int(args.memory_mb * (1 << 20)), args.device or pick_device()),
                    max_batch_rows=args.max_batch_rows, batch_wait_s=args.batch_wait_ms / 1000,
                    default_max_tokens=args.default_max_tokens)
    # Bound and listening before uvicorn starts, so the port is known and no early client is refused.
    listener = socket.create_server((args.host, args.port))
    port = listener.getsockname()[1]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        _announce(args.host, port, args.ready_file)
        yield
        engine.close()

    server = uvicorn.Server(uvicorn.Config(build_app(engine, lifespan), log_level="warning"))
    server.run(sockets=[listener])
    return 0


def _announce(host: str, port: int, ready_file: Path | None) -> None:
    url = f"http://{host}:{port}"
    print(f"weightsmith engine ready on {url}", flush=True)
    if ready_file is not None:
        partial = ready_file.with_name(ready_file.name + ".partial")
        ready = {"port": port, "pid": os.getpid(), "url": f"{url}/v1"}
        partial.write_text(json.dumps(ready), encoding="utf-8")
        partial.replace(ready_file)


def _exit_with_parent() -> None:
    """Exit at once when the process that started us dies: an orphaned engine would hold its models'
    memory and its port with nobody to send it requests or stop it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
