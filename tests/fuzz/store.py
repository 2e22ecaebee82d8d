"""The store the fuzzers run on: the tool tests' real objects (datasets, a trained model, finished and
cancelled jobs, an eval suite and its report, a schedule), plus a queued study, a queued training job
and an alias, all owned by one agent with generous limits, so fuzzed calls get past `not_found` and
past the limits into admission.

What keeps a fuzzed call from starting work: the store is seeded by a service whose workers run, then
opened again with `workers=False, scheduler=False, serving=False`. Launches are admitted and queue;
nothing claims them, no schedule fires, no serving engine starts, and no child process starts
(`child_processes` lets a test check that).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from server.service import open_service
from server.store import agents
from tests.conftest import chat_records, quick_hyperparameters
from tests.tools.conftest import SUITE, Seeded, call, seed_objects, seed_settings

GENEROUS_LIMITS: dict[str, float] = {
    "max_request_flops": 1e21, "max_request_seconds": 1e7, "max_request_params": 1e12,
    "max_request_tokens": 1e13, "max_dataset_bytes": 1e11, "budget_flops": 1e24,
    "budget_window_seconds": 86400.0, "max_concurrent_jobs": 1_000_000,
}
"""Far above anything a fuzzed request costs, so the fuzzer exercises admission rather than the limits."""


@contextmanager
def fuzz_store(root: Path, tiny_model: Path) -> Iterator[Seeded]:
    """The seeded store, open without workers or scheduler, until the block ends."""
    settings = seed_settings(root, tiny_model)
    with open_service(settings) as ctx:
        _, key = agents.create_agent(ctx.engine, settings, "fuzzer", **GENEROUS_LIMITS)
        seeded = Seeded(ctx, key, {"tiny": str(tiny_model)})
        anyio.run(seed_objects, seeded, root)
    with open_service(settings, workers=False, scheduler=False, serving=False) as ctx:
        seeded = Seeded(ctx, key, seeded.ids)
        anyio.run(_queued_objects, seeded)
        yield seeded


async def _queued_objects(seeded: Seeded) -> None:
    ids = seeded.ids
    async with seeded.mcp() as client:
        queued = await call(client, "launch_training", base_model=ids["tiny"], datasets=[ids["dataset"]],
                            hyperparameters=quick_hyperparameters())
        ids["queued"] = queued["job"]["id"]
        study = await call(client, "tune_hyperparameters", n_trials=2, template={
            "base_model": ids["tiny"], "datasets": [ids["dataset"]],
            "hyperparameters": {"max_steps": 2, "max_seq_length": 64}},
            search_space={"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
        ids["study"] = study["study_id"]
        await call(client, "promote_model", alias="staging", model=ids["model"], report_id=ids["report"])


def real_values(seeded: Seeded, *, waits: bool = False) -> dict[str, list[Any]]:
    """For each parameter name the tools and routes use, real values of this store to put there. For a
    call that waits on a job (`waits`), only jobs that have ended: nothing runs a queued one here, so
    waiting on it would hold the call for its whole timeout."""
    ids, root = seeded.ids, Path(seeded.ctx.settings.home).parent
    models = [ids["model"], "alias:staging", ids["tiny"]]
    ended = [ids["job"], ids["cancelled"], ids["eval_job"]]
    return {
        "job_id": ended if waits else [*ended, ids["queued"], ids["study"]],
        "study_id": [ids["job"]] if waits else [ids["study"], ids["job"]],
        "dataset_id": [ids["dataset"], ids["items"]], "datasets": [[ids["dataset"]], [ids["items"], ids["dataset"]]],
        "model": models, "base_model": models, "against": [*models, ids["dataset"]], "baseline": models,
        "suite_id": [ids["suite"]], "ref": [ids["report"], ids["eval_job"]], "report_id": [ids["report"]],
        "schedule_id": [ids["schedule"]], "alias": ["staging", "production"],
        "path": [str(root / "chat.jsonl"), str(root / "items.jsonl")],
        "definition": [SUITE.format(dataset=ids["items"])],
        "content": ["".join(json.dumps(r) + "\n" for r in chat_records(6))],
    }


def child_processes() -> list[int]:
    """Live child processes of this process (zombies excluded), read from /proc."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(entry))
    return found
