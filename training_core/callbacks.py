"""The job's hand in the training loop: progress events, cooperative cancel, and the compute caps.

    callback = JobCallback(events, spec, flops_per_token, started)
    SFTTrainer(..., callbacks=[callback]).train()
    if callback.cancelled: ...            # the CANCEL file appeared
    if callback.cap_reached: ...          # a JobError with code `compute_cap_reached`
    if callback.diverged: ...             # a JobError with code `diverged`: the loss or gradient went NaN

Every figure here is this run's, the process's own: a resumed job starts from zero again, because
the service already takes what earlier runs used off the caps it writes into the spec.

Tokens are the non-padding tokens of the batches actually trained: `Trainer` counts them per
micro-batch when `include_num_input_tokens_seen="non_padding"` (the attention mask's sum; without a
mask, as in padding-free packing, the tokens that are not the pad token) into
`state.num_input_tokens_seen`, which a checkpoint carries, so this run's tokens are that count less
the count it started from. FLOPs are `flops_per_token x tokens`, the same estimate the service
prices a job with before admission.

Caps are checked after every optimizer step, and a step that would carry the run past a cap is not
started: a cap is a ceiling, not a trigger. The run then saves a checkpoint, so an agent can
continue with more budget, and ends `failed` with `compute_cap_reached`. What this does not cover:
a single step longer than the whole `max_seconds` still runs once, and time spent after the last
step (the final evaluation and save) is not capped here; the service's own wall-clock kill is the
backstop for both.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from training_core import hardware
from training_core.events import EventWriter
from training_core.spec import CANCEL_FILE, JobError, JobSpec

# The summary Trainer logs once at the end; the result carries it instead.
_SUMMARY_KEYS = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
                 "total_flos")


class JobCallback(TrainerCallback):
    def __init__(self, events: EventWriter, spec: JobSpec, flops_per_token: float, started: float,
                 device: str = "cpu"):
        """`started` is the `time.monotonic()` reading when the process began: caps and the time to
        the first step count from there, model loading included."""
        self.device = device
        self.dtype = hardware.training_dtype(device, spec.hyperparameters.precision)
        self._peak_flops: float | None = None
        self.events = events
        self.cancel_path = Path(spec.run_dir) / CANCEL_FILE
        self.output_dir = Path(spec.output_dir)
        self.limits = spec.limits
        self.flops_per_token = flops_per_token
        self.started = started
        self.cancelled = False
        self.cap_reached: JobError | None = None
        self.diverged: JobError | None = None
        """Set when a step's loss or gradient norm is NaN or infinite: the weights are no longer
        numbers, training stops there, and no model is saved."""
        self.time_to_first_step: float | None = None
        self.setup_peak_memory: int | None = None
        self.last_logs: dict[str, float] = {}
        self._tokens_at_start = 0
        self._step_at_start = 0
        self._resumed_from: int | None = None
        self._train_started = started
        self._last_step_end = started
        self._train_started_cpu = self._last_step_cpu = 0.0
        self._last_step_tokens = 0

    # What this run has used so far.

    def tokens_seen(self, state: TrainerState) -> int:
        return state.num_input_tokens_seen - self._tokens_at_start

    def flops_used(self, state: TrainerState) -> float:
        return self.flops_per_token * self.tokens_seen(state)

    def tokens_per_second(self, state: TrainerState) -> float:
        """Throughput of the training loop itself: from the start of `train()` to the end of the last
        step, so neither loading nor the final save counts."""
        seconds = self._last_step_end - self._train_started
        return self.tokens_seen(state) / seconds if seconds > 0 else 0.0

    def tokens_per_cpu_second(self, state: TrainerState) -> float:
        """Tokens over the CPU time the process spent in the training loop (all its threads): on a
        shared machine, what the loop would do on an idle one with as many threads."""
        seconds = self._last_step_cpu - self._train_started_cpu
        return self.tokens_seen(state) / seconds if seconds > 0 else 0.0

    def mfu(self, tokens_per_second: float) -> float:
        """Model FLOPs utilisation: model FLOPs per second over the device's measured matmul peak in
        the precision training runs in (summed over the processes of a several-device job, since
        each counts its own tokens). With gradient checkpointing the recomputed forward pass counts
        as work done, as it is charged to the job's compute."""
        if self._peak_flops is None:
            # Measured once, at the first report, not before the first step: the ~0.3 s it takes is
            # taken off the training clock, so it changes neither the time to the first step nor tokens/s.
            before, before_cpu = time.monotonic(), time.process_time()
            self._peak_flops = hardware.measure_matmul_peak_flops(self.device, self.dtype)
            self._train_started += time.monotonic() - before
            self._last_step_end += time.monotonic() - before
            self._train_started_cpu += time.process_time() - before_cpu
            self._last_step_cpu += time.process_time() - before_cpu
        # Token counts are the whole job's (Trainer gathers them from every process); the peak is one device's.
        return self.flops_per_token * tokens_per_second / (self._peak_flops * hardware.world_size())

    # Trainer events.

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        # On resume `state` comes from the checkpoint: its counts belong to earlier runs.
        self._tokens_at_start = state.num_input_tokens_seen
        self._step_at_start = self._resumed_from = state.global_step
        self._train_started = self._last_step_end = time.monotonic()
        self._train_started_cpu = self._last_step_cpu = time.process_time()
        self._last_step_tokens = 0
        # What preparing the data and the model took, before training's own peak starts over.
        self.setup_peak_memory = hardware.peak_memory_bytes(self.device)
        hardware.reset_peak_memory(self.device)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        now = time.monotonic()
        step_seconds, self._last_step_end = now - self._last_step_end, now
        self._last_step_cpu = time.process_time()
        tokens = self.tokens_seen(state)
        step_tokens = tokens - self._last_step_tokens
        self._last_step_tokens = tokens
        if self.time_to_first_step is None:
            self.time_to_first_step = now - self.started
            self.events.message("first optimizer step", step=state.global_step,
                                seconds=round(self.time_to_first_step, 3))

        cancel = self.cancel_path.exists()
        cap = None if state.global_step >= state.max_steps else self._cap_reached(
            state, now - self.started, step_seconds, tokens, step_tokens)
        # The processes of a several-device job must stop at the same step, or the ones still
        # training wait for the others forever: they agree on the decision first.
        cancel, capped = hardware.agree(cancel, cap is not None)
        if capped and cap is None:
            cap = JobError("compute_cap_reached", "another process of this job reached a compute cap",
                           param="limits")
        if cancel:
            self.cancelled = True
            control.should_training_stop = True
            self.events.message(f"cancel requested: stopping at step {state.global_step}", level="warning",
                                step=state.global_step)
            return
        # The last step ends the run anyway: finishing it is not a reason to fail (`cap` is None then).
        self.cap_reached = cap
        if self.cap_reached is not None:
            control.should_training_stop = True
            control.should_save = True  # the checkpoint an agent continues from with more budget
            self.events.message(self.cap_reached.message, level="warning", step=state.global_step,
                                cap=self.cap_reached.param)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        # Three kinds of log reach here: a training step's (`loss`), an evaluation's (`eval_loss`), and
        # the end-of-training summary (`train_loss`, `train_runtime`), which the result carries instead.
        if "loss" in logs:
            # Every number a step logs: loss, learning rate and grad norm, and each method's own
            # (DPO's rewards/margins/accuracies, GRPO's reward mean and spread per reward function).
            self.last_logs = {key: value for key, value in logs.items()
                              if isinstance(value, int | float) and key not in _SUMMARY_KEYS}
            done = state.global_step - self._step_at_start
            elapsed = time.monotonic() - self._train_started
            eta = (state.max_steps - state.global_step) * elapsed / done if done else None
            tokens_per_second = self.tokens_per_second(state)
            self.events.metrics({
                "step": state.global_step, **self._run_start(), "max_steps": state.max_steps, **self.last_logs,
                "tokens_per_second": tokens_per_second, "mfu": self.mfu(tokens_per_second),
                "peak_memory_bytes": hardware.peak_memory_bytes(self.device), "eta_seconds": eta,
                "tokens_seen": self.tokens_seen(state), "flops_used": self.flops_used(state)})
            broken = [key for key in ("loss", "grad_norm")
                      if isinstance(logs.get(key), float) and not math.isfinite(logs[key])]
            if broken and self.diverged is None:
                self.diverged = JobError("diverged", (
                    f"training diverged at step {state.global_step} ({', '.join(f'{k} {logs[k]}' for k in broken)}): "
                    "the weights are no longer numbers, so no model was saved. Lower "
                    f"hyperparameters.learning_rate (it was {args.learning_rate:g})."),
                    param="hyperparameters.learning_rate")
                control.should_training_stop = True
                self.events.message(self.diverged.message, level="warning", step=state.global_step)
        elif "eval_loss" in logs:
            self.events.metrics({
                "step": state.global_step, **self._run_start(), "max_steps": args.max_steps,
                "eval_loss": logs["eval_loss"],
                "tokens_seen": self.tokens_seen(state), "flops_used": self.flops_used(state)},
                message="evaluation")

    def _run_start(self) -> dict[str, int]:
        """`resumed_from` (the step this run's training started from) once training has begun: an
        evaluation before it (a resumed run's held-out loss of the base) knows no step to cut at."""
        return {} if self._resumed_from is None else {"resumed_from": self._resumed_from}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        path = self.output_dir / f"checkpoint-{state.global_step}"
        self.events.checkpoint(state.global_step, str(path), {
            **self.last_logs, "tokens_seen": self.tokens_seen(state), "flops_used": self.flops_used(state)})

    # Caps.

    def _cap_reached(self, state: TrainerState, seconds: float, step_seconds: float, tokens: int,
                     step_tokens: int) -> JobError | None:
        """The first cap that is reached, or that the next step (costing what the last did) would pass."""
        flops, step_flops = self.flops_per_token * tokens, self.flops_per_token * step_tokens
        checks = (("max_seconds", self.limits.max_seconds, seconds, step_seconds, "seconds"),
                  ("max_flops", self.limits.max_flops, flops, step_flops, "FLOPs"),
                  ("max_tokens", self.limits.max_tokens, tokens, step_tokens, "tokens"))
        for name, cap, used, next_step, unit in checks:
            if cap is None or used + next_step <= cap:
                continue
            why = "reached" if used >= cap else "would be passed by the next step"
            return JobError("compute_cap_reached", (
                f"{name} cap {why}: the cap is {_amount(cap)} {unit} and this run used {_amount(used)} "
                f"(about {_amount(next_step)} a step); stopped at step {state.global_step} of "
                f"{state.max_steps} and saved checkpoint-{state.global_step}. Raise limits.{name}, or lower "
                "max_steps, to go on."),
                param=f"limits.{name}")
        return None


def _amount(value: float) -> str:
    return f"{value:,.0f}" if abs(value) < 1e7 else f"{value:.3g}"
