"""A large study reads in about 1,000 tokens through get_job; its whole trials table is one request away."""

from __future__ import annotations

import json
import random

import httpx

from server.settings import Settings
from server.store import agents as auth
from server.store.db import make_engine, write_transaction
from server.store.tables import Job, JobState
from tools.views import TRIALS_SHOWN, job_view


def _study(agent_id: str, n: int) -> Job:
    rng = random.Random(0)
    trials = []
    for number in range(n):
        state = "running" if number == 17 else rng.choice(["complete", "complete", "pruned"])
        trials.append({"number": number, "job_id": f"job_trial{number}", "state": state,
                       "value": round(rng.uniform(1.0, 3.0), 4) if state == "complete" else None,
                       "params": {"learning_rate": rng.uniform(1e-4, 1e-2), "warmup_ratio": rng.uniform(0, 0.3)},
                       "flops_used": 1.5e11, "step": 48})
    best = min((t for t in trials if t["state"] == "complete"), key=lambda t: t["value"])
    return Job(agent_id=agent_id, kind="tune", method="tpe+hyperband", state=JobState.running,
               metrics={"objective": "eval_loss", "direction": "minimize", "trials": trials,
                        "best_value": best["value"], "best_trial": best["number"]})


def test_a_large_studys_view_keeps_its_best_running_and_newest_trials_within_a_thousand_tokens() -> None:
    study = _study("agent_x", 200)
    view = job_view(study).model_dump(mode="json")
    shown = view["metrics"]["trials"]
    numbers = [t["number"] for t in shown]
    complete = sorted((t for t in study.metrics["trials"] if t["state"] == "complete"), key=lambda t: t["value"])
    assert len(shown) == TRIALS_SHOWN and numbers == sorted(numbers)
    assert {t["number"] for t in complete[:TRIALS_SHOWN // 2]} <= set(numbers)  # the best five
    assert 17 in numbers and 199 in numbers  # the running trial and the newest
    assert view["metrics"]["trials_total"] == 200 and view["metrics"]["trials_omitted"] == 190
    assert len(json.dumps(view)) / 4 < 1200  # ~4 characters a token
    small = _study("agent_x", 8)
    assert job_view(small).metrics == small.metrics  # nothing cut from a small study


def test_the_whole_trials_table_is_served_over_rest(http_service, settings: Settings) -> None:
    base, key, other_key = http_service
    engine = make_engine(settings.db_url)
    agent = auth.agent_for_key(engine, key)
    study = _study(agent.id, 40)
    train = Job(agent_id=agent.id, kind="train", method="sft", state=JobState.succeeded)
    with write_transaction(engine) as session:
        session.add(study)
        session.add(train)
    engine.dispose()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as client:
        assert len(client.get(f"/v1/jobs/{study.id}").json()["metrics"]["trials"]) == TRIALS_SHOWN
        whole = client.get(f"/v1/studies/{study.id}/trials")
        assert whole.status_code == 200 and whole.json()["trials"] == study.metrics["trials"]
        refused = client.get(f"/v1/studies/{train.id}/trials")
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "study_id"
    foreign = httpx.get(f"{base}/v1/studies/{study.id}/trials", headers={"Authorization": f"Bearer {other_key}"})
    assert foreign.status_code == 404  # another agent's study does not exist for this one
