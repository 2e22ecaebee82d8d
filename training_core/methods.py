"""The training methods: the one registry of them, read by the service and by the child process.

Each method declares its options as one typed, documented model, the records it trains on, what a
token costs, the adapter it defaults to and the module that runs it. The service validates a
request's `options` against the method's model before a job exists, so a wrong option is refused
naming its field (`options.rewards[1].pattern`) and never reaches a worker; the tool schema
describes `options` from these models; `python -m training_core` dispatches on `module`. The child
reads the same JSON from `JobSpec.options`.

Nothing here imports torch: the service imports this module.

Cost: `flops_per_parameter_token` is what one trained token costs per parameter: 6 for training
(forward 2, backward 4); DPO adds the reference model's forward (8); GRPO adds generating the
completions it trains on (8).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training_core import graders
from training_core.shapes import parameter_count, shape_of


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelShape(_Options):
    """An explicit Llama shape for `pretrain` instead of a preset."""

    hidden_size: int = Field(ge=16, le=16384)
    num_hidden_layers: int = Field(ge=1, le=128)
    intermediate_size: int = Field(ge=16, le=65536)
    num_attention_heads: int = Field(ge=1, le=256)
    num_key_value_heads: int = Field(ge=1, le=256)
    vocab_size: int = Field(ge=512, le=262144)
    max_position_embeddings: int = Field(ge=16, le=131072)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class PretrainOptions(_Options):
    preset: Literal["tiny", "small", "medium", "125m", "350m", "1b"] = Field(
        "small", description="Model size: tiny ~1M, small ~10M, medium ~47M, 125m, 350m, 1b parameters.")
    model_config_: ModelShape | None = Field(None, alias="model_config", description="An explicit Llama shape "
                                             "instead of preset.")
    vocab_size: int | None = Field(None, ge=512, le=262144, description="Tokenizer vocabulary; default: the preset's.")
    special_tokens: list[str] = Field(default_factory=list, max_length=256, description="Tokens never split.")
    chat_template: str | None = Field(None, max_length=20_000, description="Jinja chat template; default ChatML.")
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True, protected_namespaces=())


class ContinuedPretrainOptions(_Options):
    reference_dataset: str | None = Field(None, description="Text of the base model's domain, to measure forgetting "
                                          "on when the base model carries no held-out slice of its own.")


class SftOptions(_Options):
    pass


class DpoOptions(_Options):
    beta: float = Field(0.1, gt=0, le=10, description="Strength of the pull towards the reference model.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                       "apo_down", "exo_pair", "sigmoid_norm"] = Field("sigmoid", description="TRL's DPO loss.")


class PythonReward(_Options):
    type: Literal["python"]
    source: str = Field(max_length=100_000, description="Python defining the reward function.")
    function: str = Field(max_length=100, description="Its name; called as TRL calls rewards: "
                          "(prompts, completions, **columns) -> list of floats.")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    timeout_seconds: float = Field(10.0, gt=0, le=120, description="Per call, in the sandbox.")

    @model_validator(mode="after")
    def _defines_function(self) -> PythonReward:
        try:
            tree = ast.parse(self.source)
        except SyntaxError as err:
            raise ValueError(f"source does not compile: line {err.lineno}: {err.msg}") from err
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
        if self.function not in defined:
            raise ValueError(f"source defines no top-level function {self.function!r} "
                             f"(it defines {', '.join(sorted(defined)) or 'none'})")
        return self


class GrpoOptions(_Options):
    rewards: list[dict[str, Any]] = Field(min_length=1, max_length=8, description=(
        "Graders {type: exact|contains|regex|json_schema|length|similarity, ...} or "
        "{type: python, source, function}."))
    num_generations: int = Field(4, ge=2, le=64, description="Completions per prompt (one group).")
    max_completion_length: int = Field(32, ge=1, le=8192, description="Tokens per completion.")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the completions.")
    beta: float = Field(0.0, ge=0, le=10, description="KL penalty towards the reference model.")

    @field_validator("rewards")
    @classmethod
    def _each_reward(cls, rewards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        checked = []
        for raw in rewards:
            model = PythonReward.model_validate(raw) if raw.get("type") == "python" else graders.parse(raw)
            checked.append(model.model_dump(mode="json", by_alias=True, exclude_none=True))
        return checked


@dataclass(frozen=True)
class Method:
    summary: str
    """One line for the tool's description: what the method does and what it trains on."""
    options: type[_Options]
    formats: tuple[str, ...]
    """Record formats it trains on (`training_core.data`)."""
    module: str
    """Exposes `run(spec, events, started) -> JobResult`."""
    flops_per_parameter_token: float = 6.0
    needs_base_model: bool = True
    default_adapter: Literal["full", "lora"] = "lora"
    """What `adapter: auto` means: training a new model, or a whole corpus into one, trains every
    weight; tuning one towards a task trains a LoRA adapter."""
    adapters: tuple[str, ...] = ("full", "lora")
    packed: bool = False
    """Cuts the corpus into full blocks rather than train a record to a sequence."""
    reports_eval_loss: bool = False
    """Reports the held-out loss after training (`eval_loss_after`): a study can minimize it."""


METHODS: dict[str, Method] = {
    "pretrain": Method("a new model on text (options.preset)", PretrainOptions,
                       ("text",), "training_core.pretrain", needs_base_model=False, default_adapter="full",
                       adapters=("full",), packed=True),
    "continued_pretrain": Method("more text into base_model", ContinuedPretrainOptions, ("text",),
                                 "training_core.continued_pretrain", default_adapter="full", packed=True),
    "sft": Method("fine-tuning on text, prompt/completion or chats", SftOptions,
                  ("text", "prompt_completion", "messages"), "training_core.sft", reports_eval_loss=True),
    "dpo": Method("preferences, prompt/chosen/rejected", DpoOptions, ("preference",),
                  "training_core.dpo", flops_per_parameter_token=8.0, reports_eval_loss=True),
    "grpo": Method("RL on prompts scored by options.rewards", GrpoOptions, ("prompt_only",),
                   "training_core.grpo", flops_per_parameter_token=8.0),
}
MethodName = Literal["pretrain", "continued_pretrain", "sft", "dpo", "grpo"]


def options_model(method: str, raw: dict[str, Any] | None) -> _Options:
    """The method's options with defaults filled in; pydantic's ValidationError for a bad one (the
    caller words it, with `options.` before each location)."""
    return METHODS[method].options.model_validate(raw or {})


def options_json(options: _Options) -> dict[str, Any]:
    return options.model_dump(mode="json", by_alias=True, exclude_none=True)


def pretrain_parameters(options: dict[str, Any]) -> int:
    """Parameters of the model a pretrain job will build (at the preset's or the given vocabulary)."""
    return parameter_count(shape_of(options), options.get("vocab_size"))


def context_length(options: dict[str, Any]) -> int:
    """The longest sequence a pretrain job's model takes."""
    return shape_of(options).max_position_embeddings


def describe_options() -> str:
    """Each method's options in one line, for the tool's schema: the same models that validate them."""
    parts = []
    for name, method in METHODS.items():
        fields = []
        for field_name, field in method.options.model_fields.items():
            shown = field.alias or field_name
            choices = [a for a in get_args(field.annotation) if isinstance(a, str)]
            fields.append(f"{shown}: {'|'.join(choices)}" if choices and len(choices) <= 6 else shown)
        if fields:
            parts.append(f"{name} {{{', '.join(fields)}}}")
    return "; ".join(parts) + "; rewards are graders {type: exact|contains|regex|json_schema|length|similarity} or " \
        "{type: python, source, function}."
