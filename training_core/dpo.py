"""Direct preference optimisation with TRL's DPOTrainer, full or LoRA.

    python -m training_core SPEC.json        # a JobSpec with "method": "dpo"

Data: `preference` records, standard (`prompt`, `chosen`, `rejected` strings) or conversational
(the prompt a list of turns, the answers lists of assistant turns); hosted-API records
(`input` / `preferred_output` / `non_preferred_output`) arrive here already imported as
conversational ones (see `training_core.data`).

`spec.options`: `beta` (default 0.1: how far the policy may move from the reference) and
`loss_type` (default `sigmoid`, the DPO paper's; `ipo`, `hinge`, `robust`, ... as TRL names them).

Read top to bottom: `run` loads the model (the reference is a frozen copy, or with LoRA the same
model with its adapter switched off), splits off held-out pairs, trains, and reports per step the
implicit rewards of chosen and rejected answers, their margin and the preference accuracy (the
share of pairs whose chosen answer gets the higher reward); on the held-out pairs it reports the
same after training. Before training the policy equals the reference, so every held-out reward is
zero by definition and is not measured.
"""

from __future__ import annotations

from typing import Any

import datasets
from trl import DPOConfig, DPOTrainer

from training_core import runs
from training_core.callbacks import JobCallback
from training_core.events import EventWriter
from training_core.spec import JobResult, JobSpec

MAX_EVAL_PAIRS = 128
FLOPS_FACTOR = 8.0
"""Model FLOPs per parameter and token: 6 for the policy's forward and backward, 2 for the
reference's forward. The service prices a DPO job with the same factor."""


def run(spec: JobSpec, events: EventWriter, started: float | None = None) -> JobResult:
    started, device = runs.begin(started)

    model, tokenizer = runs.load_model(spec, device)
    _, train_pairs, eval_pairs = runs.load_records(spec, ("preference",), MAX_EVAL_PAIRS)
    events.message(f"loaded {len(train_pairs)} training and {len(eval_pairs)} held-out preference pairs",
                   train_records=len(train_pairs), eval_records=len(eval_pairs))

    parameters = model.num_parameters()
    callback = JobCallback(events, spec, spec.flops_per_token or FLOPS_FACTOR * parameters, started, device)
    config = DPOConfig(
        **runs.common_arguments(spec, device),
        beta=float(spec.options.get("beta", 0.1)),
        loss_type=[spec.options.get("loss_type", "sigmoid")],
        max_length=spec.hyperparameters.max_seq_length,
    )
    trainer = runs.quiet(DPOTrainer(
        model=model, args=config, processing_class=tokenizer, peft_config=runs.lora_config(spec),
        callbacks=[callback], train_dataset=datasets.Dataset.from_list(train_pairs),
        eval_dataset=datasets.Dataset.from_list(eval_pairs) if eval_pairs else None))

    output, _ = runs.train(trainer, spec, events)

    metrics: dict[str, Any] = {
        "train_loss": output.training_loss, "beta": config.beta, "loss_type": config.loss_type[0],
        **_last_step_preferences(callback.last_logs),
        **runs.run_metrics(callback, trainer.state, device, parameters,
                           trainer.model.num_parameters(only_trainable=True)),
    }
    result = runs.outcome(callback, trainer.state, metrics)
    if result.status != "succeeded":
        return result
    if eval_pairs:
        held_out = trainer.evaluate()
        metrics.update({
            "heldout_reward_accuracy": held_out.get("eval_rewards/accuracies"),
            "heldout_reward_margin": held_out.get("eval_rewards/margins"),
            "eval_loss_after": held_out.get("eval_loss")})
    model_dir, merged_dir = runs.save_model(spec, trainer, tokenizer)
    result.model_dir, result.merged_dir = str(model_dir), str(merged_dir) if merged_dir else None
    events.message(f"saved the model to {model_dir}", model_dir=result.model_dir)
    return result


def _last_step_preferences(logs: dict[str, float]) -> dict[str, Any]:
    return {"reward_accuracy": logs.get("rewards/accuracies"), "reward_margin": logs.get("rewards/margins"),
            "reward_chosen": logs.get("rewards/chosen"), "reward_rejected": logs.get("rewards/rejected")}
