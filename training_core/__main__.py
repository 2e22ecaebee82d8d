"""python -m training_core SPEC.json

Runs one job's training in this process and leaves `result.json` in the spec's run directory when
it ends on its own terms: `succeeded`, `cancelled`, or `failed` with an error `{code, message,
param}`. Any written result exits 0; the service reads the outcome from the file, not the exit
code. A process killed by a signal writes nothing, and the service resumes the job.

Nothing heavy is imported before the spec is read: the method's module brings in torch, so a
spec that cannot run fails in a fraction of a second.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from training_core.events import EventWriter
from training_core.methods import METHODS
from training_core.spec import JobError, JobResult, JobSpec

JOB_MODULES = {**{name: method.module for name, method in METHODS.items()},
               "synth": "training_core.synthetic", "eval": "training_core.evaluate"}
"""Each module exposes `run(spec, events, started) -> JobResult`: the training methods, and the
job kinds that run a model without training it."""


def main(argv: list[str]) -> int:
    started = time.monotonic()
    if len(argv) != 1:
        print("usage: python -m training_core SPEC.json", file=sys.stderr)
        return 2
    _exit_with_parent()
    run_job(JobSpec.read(Path(argv[0])), started)
    return 0


def run_job(spec: JobSpec, started: float) -> None:
    """Train `spec` in this process; rank 0 writes the job's events and its result.

    In a several-device job (`accelerate launch`, or a Ray Train worker: both set RANK) every process
    runs this; only rank 0 speaks for the job: the others keep their events apart and leave no result.
    """
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        with EventWriter(Path(spec.run_dir) / f"rank-{rank}") as events:
            _run(spec, events, started)
        return
    with EventWriter(spec.run_dir) as events:
        events.message(f"{spec.method} job {spec.job_id} started", method=spec.method, adapter=spec.adapter)
        try:
            result = _run(spec, events, started)
        except JobError as error:
            result = JobResult(status="failed", error=error.to_error(), **events.usage())
        except Exception as error:  # noqa: BLE001 -- whatever the libraries raise, the job ends with a result
            traceback.print_exc()  # the whole traceback goes to the child's log; the message to the agent
            failure = JobError("training_error", f"{type(error).__name__}: {error}")
            result = JobResult(status="failed", error=failure.to_error(), **events.usage())
        if result.error is not None:
            events.message(result.error["message"], level="error", code=result.error["code"])
        events.message(f"finished: {result.status}", status=result.status, steps=result.steps)
        result.write(Path(spec.run_dir))


def _exit_with_parent() -> None:
    """Die at once if the worker that started us dies.

    The worker puts us in our own process group (so its cancel can signal the whole tree), which
    also means nothing kills us when it is SIGKILLed. An orphan would go on writing into the output
    directory that the job's next run resumes from, so it must not outlive its worker.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(70)  # no result.json: the job resumes from its checkpoint under a new worker

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _run(spec: JobSpec, events: EventWriter, started: float) -> JobResult:
    if spec.method not in JOB_MODULES:
        raise JobError("unsupported_method", f"method {spec.method!r} is not supported; use one of "
                       f"{', '.join(JOB_MODULES)}", param="method")
    return importlib.import_module(JOB_MODULES[spec.method]).run(spec, events, started)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
