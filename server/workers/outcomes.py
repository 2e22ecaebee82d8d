"""What a succeeded child's result becomes, per job kind: a train job registers a model (and queues
the eval it asked for), a synth job registers its dataset, an eval job stores its reports. Each
handler ends the job with `jobs.finish` under the run's epoch, so a fenced-off worker writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine

from server.admission import datasets
from server.evaluation import jobs as eval_jobs
from server.store import jobs
from server.store.tables import Job, JobState, Model
from training_core.spec import JobResult


def finish_train(engine: Engine, job: Job, epoch: int, result: JobResult) -> None:
    model = _registered_model(job, result)
    queue_eval = eval_jobs.after_training(engine, job, model) if job.resolved.get("eval_suite") else None
    jobs.finish(engine, job.id, epoch, JobState.succeeded, metrics=result.metrics, model=model, also=queue_eval)


def _finish_synth(engine: Engine, job: Job, epoch: int, result: JobResult) -> None:
    """Register the dataset a synth job wrote, with its manifest as lineage, then end the job."""
    resolved = job.resolved
    output = Path(job.output_dir)
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    lineage = {"job_id": job.id, **manifest}
    registered = datasets.register_generated(
        engine, Path(resolved["datasets_dir"]), resolved["max_record_bytes"], job.agent_id, output / "dataset.jsonl",
        resolved.get("dataset_name") or f"synth-{manifest['task']}-{job.id}", f"synth:{job.id}", lineage)
    dataset = registered.dataset
    if dataset is None:  # what it made failed validation, so nothing was stored (it never should)
        problems = "; ".join(f"line {p.line}: {p.message}" for p in registered.report.problems[:3])
        jobs.finish(engine, job.id, epoch, JobState.failed, metrics=result.metrics, error={
            "code": "invalid_dataset", "param": "task", "message": f"the generated records failed validation "
            f"({problems}); nothing was stored"})
        return
    metrics = {**result.metrics, "dataset_id": dataset.id, "dataset_hash": dataset.content_hash}
    jobs.finish(engine, job.id, epoch, JobState.succeeded, metrics=metrics)


ON_SUCCESS: dict[str, Callable[[Engine, Job, int, JobResult], None]] = {
    "train": finish_train, "synth": _finish_synth, "eval": eval_jobs.finish_eval_job}
"""What a succeeded child's result becomes, per job kind: a train job registers a model. Each
handler ends the job with `jobs.finish` under the run's epoch, so a fenced-off worker writes nothing."""


def _registered_model(job: Job, result: JobResult) -> Model:
    resolved = job.resolved
    model = Model(
        agent_id=job.agent_id, name=resolved.get("model_name") or f"{job.method}-{job.id}",
        path=result.model_dir or "", merged_path=result.merged_dir, adapter=resolved["spec"]["adapter"],
        base_model=resolved["base_model"], parent_model_id=resolved.get("parent_model_id"), job_id=job.id,
        dataset_hashes=resolved["dataset_hashes"], config=resolved, metrics=result.metrics,
        # The count the model was built with: pre-training is priced at its preset's vocabulary, and the
        # tokenizer it trains usually has fewer tokens. A result from a release that did not count it has none.
        parameters=int(result.metrics.get("parameters", resolved["estimate"]["parameters"])))
    lineage = {"model_id": model.id, "job_id": job.id, "base_model": model.base_model,
               "parent_model_id": model.parent_model_id, "dataset_hashes": model.dataset_hashes,
               "adapter": model.adapter, "resolved": resolved, "metrics": result.metrics}
    for directory in filter(None, (result.model_dir, result.merged_dir)):
        Path(directory, "lineage.json").write_text(json.dumps(lineage, indent=2), encoding="utf-8")
    return model


