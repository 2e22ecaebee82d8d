"""python -m training_core.ray_train SPEC.json --workers N [--gpu] [--cpus-per-worker C]

Runs one job's training data-parallel on N Ray Train workers (`TorchTrainer`: gloo between CPU
workers, NCCL between GPUs), on whichever nodes of the Ray cluster have the devices free. This
process is the job's driver (the entrypoint a Ray Jobs submission runs, or started by hand on a
node of the cluster); it only coordinates: each worker runs the job exactly as one process of an
`accelerate launch` would (`training_core.__main__.run_job`).

Ray Train sets up the process group and the variables torchrun would (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR), so everything downstream is unchanged: rank 0 writes the job's events
and `result.json`; `Trainer` gathers the token counts of every shard, so tokens and FLOPs are the
workers' together; the workers agree on cancel and caps each step; and each worker resumes from
the newest checkpoint in the spec's `output_dir`. The run directory and `output_dir` must be on a
storage path every node reaches.

Exit code 0 exactly when the job left a result (whatever its status), as `python -m training_core`.
When a worker dies (killed, OOM, node lost) the whole run ends without a result and exits 1: Ray
Train is told not to restart workers itself (`max_failures=0`), since each restart would begin the
run's compute count at zero again behind the service's back; the service resumes the job instead,
from its newest checkpoint, with the caps reduced by what the lost run used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from training_core.events import EventWriter
from training_core.spec import JobResult, JobSpec


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training_core.ray_train")
    parser.add_argument("spec", type=Path)
    parser.add_argument("--workers", type=int, required=True, help="training processes, one device each")
    parser.add_argument("--gpu", action="store_true", help="one GPU a worker (NCCL); otherwise CPUs (gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = parser.parse_args(argv)
    spec = JobSpec.read(args.spec)  # before importing Ray: a spec that cannot run fails at once

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's workers otherwise send every `print` to its logger as well, even prints into a
    # redirected stdout: `datasets` fingerprints functions through dill, which disassembles them into
    # a captured stdout, and thousands of lines of bytecode would reach the job's log.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # propagated to the workers by Ray Train
    ray.init()  # the cluster from RAY_ADDRESS, which a Jobs submission sets
    resources = {"CPU": args.cpus_per_worker, **({"GPU": 1.0} if args.gpu else {})}
    trainer = TorchTrainer(
        _train_worker, train_loop_config={"spec": str(args.spec.resolve())},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"ws-{spec.job_id}", storage_path=str(Path(spec.run_dir, "ray-train").resolve()),
                             failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except Exception as error:  # noqa: BLE001 -- Ray raises its own wrapper of whatever a worker raised
        traceback.print_exc()
        if JobResult.read(Path(spec.run_dir)) is None:
            with EventWriter(spec.run_dir) as events:  # rank 0 is gone: nothing else writes events now
                events.message(f"the Ray Train workers ended without a result ({type(error).__name__}); "
                               "the job resumes from its newest checkpoint", level="error")
    return 0 if JobResult.read(Path(spec.run_dir)) is not None else 1


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the job's training in this process, with RANK set by Ray Train."""
    from training_core.__main__ import run_job

    run_job(JobSpec.read(Path(config["spec"])), time.monotonic())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
