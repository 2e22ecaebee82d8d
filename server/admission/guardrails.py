"""Compute guardrails: estimate a request, admit it against the agent's limits, settle it once.

Admission reserves the estimate in the same transaction that inserts the job, so concurrent
launches can never together spend more than the budget: `BEGIN IMMEDIATE` on SQLite, the agent's
row locked `FOR UPDATE` on PostgreSQL. A refusal names the limit, the estimate, the limit's value
and the largest `max_steps` that would fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session

from server.errors import LimitExceeded
from server.store import reservations
from server.store.tables import Agent


@dataclass(frozen=True)
class Estimate:
    """What a train request will cost, computed before anything starts."""

    parameters: int
    tokens_per_step: int
    max_steps: int
    dataset_bytes: int
    max_seconds: float | None
    flops_per_parameter_token: float = 6.0
    """6 for training (forward 2, backward 4); DPO adds a reference forward (8), GRPO generation (8);
    work that only runs forward is 2 (a synth job's generation, an eval job)."""
    unit: str = "max_steps"
    """What a refusal's "N fits" counts: training steps, or a synth job's records."""

    @property
    def tokens(self) -> int:
        return self.tokens_per_step * self.max_steps

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_parameter_token * self.parameters * self.tokens_per_step

    @property
    def flops(self) -> float:
        # The standard 6 x N x T training estimate (forward 2NT, backward 4NT), or the method's factor.
        return self.flops_per_step * self.max_steps


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    limit: str | None = None
    message: str | None = None
    max_steps_that_fit: int | None = None


def check_request(agent: Agent, estimate: Estimate) -> Verdict:
    """Per-request limits; these need no database and hold whatever else the agent runs."""
    if estimate.parameters > agent.max_request_params:
        return Verdict(False, "max_request_params",
                       f"model has {estimate.parameters:,} parameters; your limit is "
                       f"{agent.max_request_params:,}: pick a smaller base model")
    if estimate.dataset_bytes > agent.max_dataset_bytes:
        return Verdict(False, "max_dataset_bytes",
                       f"datasets total {estimate.dataset_bytes:,} bytes; your limit is "
                       f"{agent.max_dataset_bytes:,}: train on fewer or smaller datasets")
    if estimate.max_seconds is not None and estimate.max_seconds > agent.max_request_seconds:
        return Verdict(False, "max_request_seconds",
                       f"limits.max_seconds={estimate.max_seconds:g} is over your limit of "
                       f"{agent.max_request_seconds:g} s: ask for at most that")
    if estimate.tokens > agent.max_request_tokens:
        fit = agent.max_request_tokens // estimate.tokens_per_step
        return _over("max_request_tokens", f"{estimate.tokens:,} tokens", f"{agent.max_request_tokens:,}", fit,
                     estimate.unit)
    if estimate.flops > agent.max_request_flops:
        fit = int(agent.max_request_flops // estimate.flops_per_step)
        return _over("max_request_flops", f"{estimate.flops:.3g} FLOPs", f"{agent.max_request_flops:.3g}", fit,
                     estimate.unit)
    return Verdict(True)


def check_budget(agent: Agent, estimate: Estimate, spent: float, active_jobs: int) -> Verdict:
    """Per-agent limits: the rolling compute budget and the number of jobs at once."""
    if active_jobs >= agent.max_concurrent_jobs:
        return Verdict(False, "max_concurrent_jobs",
                       f"you have {active_jobs} active jobs and may run {agent.max_concurrent_jobs} at once: "
                       "wait for one to finish (wait_for_job) or cancel one")
    left = agent.budget_flops - spent
    if estimate.flops > left:
        fit = max(0, int(left // estimate.flops_per_step)) if estimate.flops_per_step else 0
        return _over("budget_flops", f"{estimate.flops:.3g} FLOPs",
                     f"{agent.budget_flops:.3g} per {agent.budget_window_seconds:g} s window, "
                     f"{max(left, 0):.3g} left", fit, estimate.unit)
    return Verdict(True)


def _over(limit: str, estimate: str, value: str, fit: int, unit: str = "max_steps") -> Verdict:
    advice = f"{unit} <= {fit} fits" if fit >= 1 else "not even one step fits: shorten max_seq_length or the batch"
    return Verdict(False, limit, f"estimate {estimate} is over {limit} ({value}); {advice}", fit)





def admit(session: Session, engine: Engine, agent_id: str, estimate: Estimate) -> Verdict:
    """Run inside `write_transaction`: the verdict holds until that transaction commits."""
    agent = reservations.lock_agent(session, engine, agent_id)
    verdict = check_request(agent, estimate)
    if not verdict.admitted:
        return verdict
    spent = reservations.budget_spent(session, agent, time.time())
    return check_budget(agent, estimate, spent, reservations.active_job_count(session, agent))


def raise_if_refused(verdict: Verdict, estimate: Estimate) -> None:
    if not verdict.admitted:
        raise LimitExceeded(verdict.message or "refused", param=verdict.limit, details={
            "limit": verdict.limit, "estimate_flops": estimate.flops, "estimate_tokens": estimate.tokens,
            "max_steps_that_fit": verdict.max_steps_that_fit})



def estimate_json(estimate: Estimate) -> dict[str, float | int]:
    """What a job keeps of its price (and what a dry run shows)."""
    return {"parameters": estimate.parameters, "tokens": estimate.tokens, "flops": estimate.flops,
            "max_steps": estimate.max_steps, "tokens_per_step": estimate.tokens_per_step}


def dry_run(engine: Engine, agent_id: str, estimate: Estimate) -> tuple[Verdict, float]:
    """The verdict a launch would get now, and the agent's rolling budget left; starts nothing."""
    with Session(engine) as session:
        verdict = admit(session, engine, agent_id, estimate)
        agent = session.get(Agent, agent_id)
        assert agent is not None
        left = agent.budget_flops - reservations.budget_spent(session, agent, time.time())
    return verdict, max(left, 0.0)
