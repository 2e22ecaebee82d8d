"""Group relative policy optimisation with TRL's GRPOTrainer: rewards from graders and agent code.

    python -m training_core SPEC.json        # a JobSpec with "method": "grpo"

Data: `prompt_only` records (a prompt, as text or turns, and optionally a `reference` that graders
compare completions with).

`spec.options` (validated by the service before the job exists):

    rewards                one or more, summed with their weights:
                           a declarative grader (`training_core.graders`: exact, contains, regex,
                           json_schema, length, similarity), or
                           {"type": "python", "source": CODE, "function": NAME, "weight": 1.0}: a
                           function the agent wrote, called in the sandbox with TRL's reward
                           signature (keyword arguments `prompts`, `completions` and each dataset
                           column such as `reference`; one float per completion, or None where it
                           does not apply)
    num_generations        completions per prompt, the group whose rewards are compared (default 4)
    max_completion_length  tokens per completion (default 32)
    temperature            sampling temperature (default 1.0)
    beta                   KL penalty towards the starting model (default 0: no reference model)

Read top to bottom: `run` builds the reward functions (starting one sandboxed worker per Python
source, which serves every call of the job), trains, and reports per step the mean and spread of
each reward and of their sum. A reward function that raises, hangs or returns the wrong shape ends
the job `failed` with an error that names the function and what went wrong.
"""

from __future__ import annotations

import contextlib
from typing import Any

import datasets
from trl import GRPOConfig, GRPOTrainer

from training_core import graders, runs
from training_core.callbacks import JobCallback
from training_core.events import EventWriter
from training_core.sandboxed import SandboxedFunctions, SandboxError, SandboxLimits, reward_scores
from training_core.spec import JobError, JobResult, JobSpec

MAX_EVAL_PROMPTS = 32
PYTHON_CALL_TIMEOUT = 10.0
"""Seconds one call of a sandboxed reward (one batch of completions) may take."""
FLOPS_FACTOR = 8.0
"""Model FLOPs per parameter and token: 6 to train on each completion, 2 to generate it."""


def run(spec: JobSpec, events: EventWriter, started: float | None = None) -> JobResult:
    started, device = runs.begin(started)

    model, tokenizer = runs.load_model(spec, device)
    _, train_prompts, eval_prompts = runs.load_records(spec, ("prompt_only",), MAX_EVAL_PROMPTS)
    options = spec.options
    with contextlib.ExitStack() as sandboxes:
        rewards = [_reward_function(raw, index, sandboxes) for index, raw in enumerate(options["rewards"])]
        events.message(f"{len(train_prompts)} prompts, rewards: {', '.join(r.__name__ for r in rewards)}",
                       rewards=[r.__name__ for r in rewards], train_records=len(train_prompts))

        parameters = model.num_parameters()
        callback = JobCallback(events, spec, spec.flops_per_token or FLOPS_FACTOR * parameters, started, device)
        config = GRPOConfig(
            # GRPO counts its prompt and completion tokens itself; Trainer's own count finds no input_ids.
            **(runs.common_arguments(spec, device) | {"include_num_input_tokens_seen": "no"}),
            num_generations=int(options.get("num_generations", 4)),
            max_completion_length=int(options.get("max_completion_length", 32)),
            temperature=float(options.get("temperature", 1.0)),
            beta=float(options.get("beta", 0.0)),
            reward_weights=[r.weight for r in rewards],
        )
        trainer = runs.quiet(GRPOTrainer(
            model=model, reward_funcs=rewards, args=config, processing_class=tokenizer,
            peft_config=runs.lora_config(spec), callbacks=[callback],
            train_dataset=datasets.Dataset.from_list(train_prompts),
            eval_dataset=datasets.Dataset.from_list(eval_prompts) if eval_prompts else None))

        try:
            before = _heldout_reward(trainer, eval_prompts)
            output, _ = runs.train(trainer, spec, events)
            metrics: dict[str, Any] = {
                "train_loss": output.training_loss, "heldout_reward_before": before,
                "reward": callback.last_logs.get("reward"), "reward_std": callback.last_logs.get("reward_std"),
                **runs.run_metrics(callback, trainer.state, device, parameters,
                                   trainer.model.num_parameters(only_trainable=True)),
            }
            result = runs.outcome(callback, trainer.state, metrics)
            if result.status != "succeeded":
                return result
            metrics["heldout_reward_after"] = _heldout_reward(trainer, eval_prompts)
        except SandboxError as error:
            raise JobError("reward_error", f"reward {error.function!r} failed ({error.kind}): {error.message}",
                           param="options.rewards") from error
    model_dir, merged_dir = runs.save_model(spec, trainer, tokenizer)
    result.model_dir, result.merged_dir = str(model_dir), str(merged_dir) if merged_dir else None
    events.message(f"saved the model to {model_dir}", model_dir=result.model_dir)
    return result


class _GraderReward:
    """A declarative grader as a TRL reward function: one score in [0, 1] per completion."""

    def __init__(self, grader: Any, index: int):
        self.grader, self.weight = grader, grader.weight
        self.__name__ = f"{grader.label}_{index}" if grader.name is None else grader.name

    def __call__(self, prompts: list[Any], completions: list[Any], reference: list[str] | None = None,
                 **_: Any) -> list[float]:
        references = reference or [None] * len(completions)
        return [self.grader.score(_text(completion), ref) for completion, ref in zip(completions, references,
                                                                                       strict=True)]


class _SandboxedReward:
    """An agent's Python reward, called in its sandboxed worker with TRL's keyword arguments."""

    def __init__(self, sandbox: SandboxedFunctions, function: str, weight: float, columns: tuple[str, ...]):
        self.sandbox, self.function, self.weight, self.columns = sandbox, function, weight, columns
        self.__name__ = function

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        # Only JSON data crosses into the sandbox: the dataset's columns, not TRL's live objects.
        columns = {name: kwargs[name] for name in self.columns if name in kwargs}
        result = self.sandbox.call(self.function, prompts=prompts, completions=completions, **columns)
        return reward_scores(result, len(completions), self.function)


def _reward_function(raw: dict[str, Any], index: int, sandboxes: contextlib.ExitStack) -> Any:
    if raw.get("type") != "python":
        return _GraderReward(graders.parse(raw), index)
    function = raw["function"]
    sandbox = SandboxedFunctions(raw["source"], [function], limits=SandboxLimits(),
                                 call_timeout=float(raw.get("timeout_seconds", PYTHON_CALL_TIMEOUT)))
    try:
        sandboxes.enter_context(sandbox)  # starts the worker and loads the code: bad code fails here
    except SandboxError as error:
        raise JobError("reward_error", f"reward {function!r} could not be loaded ({error.kind}): {error.message}",
                       param=f"options.rewards[{index}]") from error
    return _SandboxedReward(sandbox, function, float(raw.get("weight", 1.0)), ("reference",))


def _heldout_reward(trainer: GRPOTrainer, eval_prompts: list[dict[str, Any]]) -> float | None:
    """Mean summed reward of sampled completions on the held-out prompts."""
    return trainer.evaluate().get("eval_reward") if eval_prompts else None


def _text(completion: Any) -> str:
    """A completion's text: TRL gives conversational completions as a list of assistant turns."""
    return completion if isinstance(completion, str) else "".join(turn["content"] for turn in completion)
