"""The contract between the service and a training child process.

The service writes a `JobSpec` as JSON and starts `python -m training_core SPEC.json`. The child
talks back only through files in `run_dir`, so a crash or a kill never leaves the service waiting
on a pipe:

- `events.jsonl`: one JSON object a line, appended and flushed as they happen:
  `{"time": float, "level": "info"|"warning"|"error", "type": "message"|"metrics"|"checkpoint",
    "message": str, "data": {...}}`.
  `metrics` data carries `step, max_steps, loss, learning_rate, tokens_per_second, eta_seconds,
  tokens_seen, flops_used` (and `eval_loss` at evaluations); `checkpoint` data carries
  `step, path, metrics`.
- `CANCEL`: created by the service to ask for a cooperative stop; checked every optimizer step.
- `result.json`: written once, last, atomically (write then rename): see `JobResult`.

Restarts: a second child started on the same spec resumes from the newest checkpoint in
`output_dir`, so a job whose worker died loses only the steps since that checkpoint.

Only the standard library is imported here, so the service can import it without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
CANCEL_FILE = "CANCEL"
RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"


@dataclass
class LoraSpec:
    """LoRA adapter settings (PEFT)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class Hyperparameters:
    """Resolved hyperparameters: no `auto` is left by the time a spec is written."""

    learning_rate: float
    max_steps: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    max_seq_length: int
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    seed: int = 0
    eval_fraction: float = 0.1
    save_steps: int = 50
    logging_steps: int = 1
    packing: bool = False
    precision: str = "auto"
    """`auto`, `bf16` or `fp32`: bf16 autocast (fp32 master weights and optimizer state) or plain fp32.
    `auto` is bf16 on GPUs that support it and on CPUs where a bf16 matmul is measured faster
    (`training_core.hardware.use_bf16`); the frozen base of a LoRA run is then stored in bf16 too."""
    padding_free: bool = True
    """SFT: a step's records are laid one after another in one row, with no padding and each record
    attending only to itself (`training_core.attention`); same records per step as padded batches.
    Off on GPUs without FlashAttention. Other methods have no padding (pretrain) or TRL's own (DPO, GRPO)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory for about one
    more forward pass (8 rather than 6 FLOPs per parameter and token)."""
    liger_kernels: bool = True
    """On a GPU where `liger-kernel` is installed: its Triton kernels for RMSNorm, SwiGLU and RoPE
    (and, for pretrain and continued_pretrain, the fused linear cross-entropy, which never holds the
    logits). Nothing on a CPU or without the package."""


@dataclass
class Limits:
    """Caps the child enforces at run time; the job stops with `compute_cap_reached` at any."""

    max_seconds: float | None = None
    max_flops: float | None = None
    max_tokens: int | None = None


@dataclass
class JobSpec:
    job_id: str
    method: str
    """`pretrain`, `continued_pretrain`, `sft`, `dpo` or `grpo` (see `training_core.methods.METHODS`)."""
    run_dir: str
    """Events, the CANCEL flag and result.json."""
    output_dir: str
    """Checkpoints (`checkpoint-N/`) and, at the end, the final model (`model/`)."""
    base_model: str
    """A local Hugging Face model directory; empty for `pretrain`, which builds its own."""
    train_files: list[str]
    """Dataset snapshot files (JSONL, CSV, Parquet or text), read by `training_core.data`."""
    hyperparameters: Hyperparameters
    adapter: str = "full"
    """`full` or `lora`."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    merge_adapter: bool = False
    """With `lora`: also write a merged full model to `output_dir/merged`."""
    limits: Limits = field(default_factory=Limits)
    flops_per_token: float = 0.0
    """6 x trainable-path parameters: what one trained token costs, for the compute cap."""
    devices: int = 1
    """Processes training together (`accelerate launch`): GPUs, or CPU processes where there are none."""
    token_cache_dir: str | None = None
    """Where `pretrain` and `continued_pretrain` keep the token files of the snapshots they read
    (`training_core.corpus`), shared by later jobs; None: beside each snapshot, or in `output_dir`
    where the snapshot's directory cannot be written."""
    options: dict[str, Any] = field(default_factory=dict)
    """Method-specific settings that only that method's module reads (DPO's beta, GRPO's rewards,
    an eval job's suite, a synth job's task); plain JSON values."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def write(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> JobSpec:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        raw["hyperparameters"] = Hyperparameters(**raw["hyperparameters"])
        raw["lora"] = LoraSpec(**raw["lora"])
        raw["limits"] = Limits(**raw["limits"])
        return cls(**raw)


@dataclass
class JobResult:
    """What a child leaves in `run_dir/result.json` when it ends on its own terms.

    A child killed by a signal leaves none; the service then treats the run as lost and resumes it.
    """

    status: str
    """`succeeded`, `failed` or `cancelled`."""
    error: dict[str, Any] | None = None
    """`{code, message, param}` when failed; code `compute_cap_reached` keeps the last checkpoint."""
    model_dir: str | None = None
    """The final model (full weights, or the adapter with `adapter: lora`)."""
    merged_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """`eval_loss_before`, `eval_loss_after`, `train_loss`, `tokens_per_second`, ..."""
    tokens_seen: int = 0
    """Non-padding tokens trained by this run (this process), not by earlier runs of a resumed job."""
    flops_used: float = 0.0
    """`flops_per_token x tokens_seen`: this run's share, like `tokens_seen`."""
    steps: int = 0
    """The optimizer step the job stands at (counting the steps of earlier runs)."""

    def write(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / RESULT_FILE, asdict(self))

    @classmethod
    def read(cls, run_dir: Path) -> JobResult | None:
        path = Path(run_dir) / RESULT_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def write_json_atomic(path: Path, payload: Any) -> None:
    """Readers never see half a file: write beside it, then rename over it."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(tmp, path)


class JobError(Exception):
    """A run that cannot go on for a reason the caller can act on; it becomes `JobResult.error`.

    `code` is stable and machine-readable (`invalid_dataset`, `invalid_model`, `unsupported_method`,
    `compute_cap_reached`, `training_error`); `param` names the spec field to change, if one does.
    """

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    def to_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}
