"""The request bodies the engine accepts, and its errors, in OpenAI's shapes.

    ChatCompletionRequest.parse(body)   # -> the request, or EngineError(400) naming the field

Covered: the chat and completions fields that change what is generated and that the engine honours
(`max_tokens`/`max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`, `n`, `stream`), plus
`adapter`, the engine's own field naming a LoRA adapter directory served on `model`.

Not covered, and refused by name rather than ignored: log-probabilities, tools and function calls,
structured output (`response_format`), penalties, `logit_bias`, `best_of`, `echo`, `suffix`, images
and audio, and token-id prompts. A client that sends such a field at its neutral value (`logprobs:
false`, `presence_penalty: 0`, `tools: []`) asks for nothing the engine lacks, so that passes.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_CHOICES = 16
"""`n` above this is refused: each choice is a row of the batch, and one request should not fill it."""

MAX_STOP_STRINGS = 4  # OpenAI's limit

# Fields of OpenAI's API the engine does not implement, each with the values that ask for nothing
# (what some clients send by default); any other value is refused naming the field.
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}), "web_search_options": (None,), "verbosity": (None,),
}
UNSUPPORTED_COMPLETION_FIELDS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
}


class EngineError(Exception):
    """A refusal or failure with what to change: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = Field(None, description="Usage always comes in a last chunk either way.")


class _GenerationRequest(BaseModel):
    """The fields chat and completions share (fields and parsing only, so both requests stay flat)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    unsupported_fields: ClassVar[dict[str, tuple[Any, ...]]]

    model: str = Field(description="Absolute path of a model directory (the base, with `adapter`).")
    adapter: str | None = Field(None, description="Absolute path of a PEFT LoRA adapter trained on `model`.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per choice.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; default: the model's, or 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus mass; default: the model's, else 1.")
    stop: list[str] | None = Field(None, description="Up to 4 strings that end a choice (not included).")
    seed: int | None = Field(None, description="Same seed, same request: same output (best effort).")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt.")
    stream: bool = Field(False, description="Server-sent events in OpenAI's chunk format.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="The end user's id; it has no effect on generation.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if value is not None and (not isinstance(value, list) or not 1 <= len(value) <= MAX_STOP_STRINGS
                                  or not all(isinstance(s, str) and s for s in value)):
            raise ValueError(f"must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} non-empty "
                             "strings")
        return value

    @classmethod
    def parse(cls, body: Any) -> Self:
        """Validate a decoded JSON body; every problem is reported at once, the first named as `param`."""
        if not isinstance(body, dict):
            raise EngineError(400, "the request body must be a JSON object", code="invalid_request_body")
        unsupported = cls.unsupported_fields
        problems = [(name, "is not supported by this engine: remove it")
                    for name, neutral in unsupported.items()
                    if name in body and not any(body[name] == value for value in neutral)]
        code = "unsupported_parameter" if problems else "invalid_value"
        try:
            request = cls.model_validate({k: v for k, v in body.items() if k not in unsupported})
        except ValidationError as error:
            problems += [(_param(e["loc"]), _describe(e)) for e in error.errors()]
        if problems:
            raise EngineError(400, "; ".join(f"{param}: {text}" for param, text in problems),
                              code=code, param=problems[0][0])
        return request


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: list[TextPart] = Field(description='A string, or a list of {"type": "text", "text": ...} parts.')

    @field_validator("content", mode="before")
    @classmethod
    def _text_as_part(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if not isinstance(value, list):  # pydantic turns a ValueError, not a TypeError, into a field error
            raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')  # noqa: TRY004
        return value

    def as_template_input(self) -> dict[str, str]:
        return {"role": self.role, "content": "".join(part.text for part in self.content)}


class ChatCompletionRequest(_GenerationRequest):
    unsupported_fields = UNSUPPORTED_CHAT_FIELDS

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, rendered by the model's "
                                        "own chat template.")
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of `max_tokens`.")

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_token_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("max_tokens") is not None:
            raise ValueError("give max_completion_tokens or max_tokens, not both")
        return value

    @model_validator(mode="after")
    def _token_limit_in_max_tokens(self) -> Self:
        # The engine reads one limit; the newer name is the same thing.
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_GenerationRequest):
    unsupported_fields = UNSUPPORTED_COMPLETION_FIELDS

    prompt: list[str] = Field(description="A text, or a list of texts: each gets `n` choices.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise ValueError("must be a string or a non-empty list of strings (token-id prompts are not "
                             "supported)")
        return value


def _param(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "body"


def _describe(error: Any) -> str:
    """Pydantic's error in the words of an API: what the value must be."""
    kind, context = error["type"], error.get("ctx") or {}
    bounds = {"greater_than_equal": ">= {ge}", "less_than_equal": "<= {le}", "greater_than": "> {gt}",
              "less_than": "< {lt}"}
    if kind in bounds:
        return f"must be {bounds[kind].format(**context)} (got {error['input']!r})"
    if kind == "extra_forbidden":
        return "is not a field of this request: remove it"
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return str(context.get("error", error["msg"]))
    if kind == "literal_error":
        return f"must be one of {context.get('expected')} (got {error['input']!r})"
    if kind == "too_short":
        return "must not be empty"
    if kind in {"finite_number"}:
        return "must be a finite number"
    return error["msg"][:1].lower() + error["msg"][1:]
