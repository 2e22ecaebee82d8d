"""The training methods as the service sees them: their options, data formats and cost.

`launch_training` takes one `options` object whose shape depends on `method`; it is validated here
against the method's model before a job exists, so a wrong option is refused naming its field
(`options.rewards[1].pattern`) and never reaches a worker. The child reads the same JSON from
`JobSpec.options`.

Cost: `flops_per_parameter_token` is what one trained token costs per parameter: 6 for training
(forward 2, backward 4); DPO adds the reference model's forward (8); GRPO adds generating the
completions it trains on (8).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.errors import InvalidRequest
from training_core import graders
from training_core.shapes import parameter_count, shape_of


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    preset: Literal["tiny", "small", "medium", "125m", "350m", "1b"] = "small"
    model_config_: ModelShape | None = Field(None, alias="model_config")
    vocab_size: int | None = Field(None, ge=512, le=262144, description="Tokenizer vocabulary; default: the preset's.")
    special_tokens: list[str] = Field(default_factory=list, max_length=256)
    chat_template: str | None = Field(None, max_length=20_000)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


class ContinuedPretrainOptions(_Options):
    reference_dataset: str | None = Field(None, description="Text of the base model's domain, to measure forgetting "
                                          "on when the base model carries no held-out slice of its own.")


class SftOptions(_Options):
    pass


class DpoOptions(_Options):
    beta: float = Field(0.1, gt=0, le=10)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                       "apo_down", "exo_pair", "sigmoid_norm"] = "sigmoid"


class PythonReward(_Options):
    type: Literal["python"]
    source: str = Field(max_length=100_000)
    function: str = Field(max_length=100)
    weight: float = 1.0
    timeout_seconds: float = Field(10.0, gt=0, le=120)

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
    rewards: list[dict[str, Any]] = Field(min_length=1, max_length=8)
    num_generations: int = Field(4, ge=2, le=64)
    max_completion_length: int = Field(32, ge=1, le=8192)
    temperature: float = Field(1.0, gt=0, le=2)
    beta: float = Field(0.0, ge=0, le=10)

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
    options: type[_Options]
    formats: tuple[str, ...]
    flops_per_parameter_token: float = 6.0
    needs_base_model: bool = True


METHODS: dict[str, Method] = {
    "pretrain": Method(PretrainOptions, ("text",), needs_base_model=False),
    "continued_pretrain": Method(ContinuedPretrainOptions, ("text",)),
    "sft": Method(SftOptions, ("text", "prompt_completion", "messages")),
    "dpo": Method(DpoOptions, ("preference",), flops_per_parameter_token=8.0),
    "grpo": Method(GrpoOptions, ("prompt_only",), flops_per_parameter_token=8.0),
}
MethodName = Literal["pretrain", "continued_pretrain", "sft", "dpo", "grpo"]


def validated_options(method: str, raw: dict[str, Any] | None) -> dict[str, Any]:
    """The method's options with defaults filled in, as plain JSON; InvalidRequest names the field."""
    try:
        model = METHODS[method].options.model_validate(raw or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in ("options", *first["loc"]))
        raise InvalidRequest(f"{where}: {first['msg']} ({method} options)", param=where) from err
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def pretrain_parameters(options: dict[str, Any]) -> int:
    """Parameters of the model a pretrain job will build (at the preset's or the given vocabulary)."""
    return parameter_count(shape_of(options), options.get("vocab_size"))


def context_length(options: dict[str, Any]) -> int:
    """The longest sequence a pretrain job's model takes."""
    return shape_of(options).max_position_embeddings
