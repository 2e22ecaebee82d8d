"""One batch row per choice, and the two hooks that give each row its own settings inside one `generate`.

`generate` samples a whole batch with one configuration; the rows of a batch come from different
clients with different `temperature`, `top_p`, `seed`, `max_tokens` and `stop`. Two standard hooks
carry the difference, so the decoding loop itself stays transformers':

- `RowSampler`, a logits processor: a greedy row passes through; a sampled row is scaled by its
  temperature, cut to its top-p nucleus and drawn from with its request's own `torch.Generator`;
  the drawn token is left as the only finite logit, so `generate` runs greedy (`do_sample=False`)
  and picks exactly the draw. A seeded request's draws therefore do not depend on its neighbours.
- `RowProgress`, a stopping criterion: it sees every new token of every row, ends a row at an
  end-of-sequence token, at its own token limit or at one of its stop strings, and hands the text
  on as it grows (streamed rows hold back what could still turn out to be a stop string or half a
  character).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from transformers import LogitsProcessor, StoppingCriteria

FinishReason = Literal["stop", "length"]


@dataclass
class TextDelta:
    index: int
    text: str


@dataclass
class ChoiceFinished:
    index: int
    finish_reason: FinishReason
    completion_tokens: int


@dataclass
class Row:
    """One choice of one request, as a row of a batch: its settings and what it has produced so far."""

    index: int
    """The choice's index in its request's response."""
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    stream: bool
    generator: torch.Generator
    """Shared by the rows of one request, drawn from in row order at every step."""
    adapter_name: str
    """PEFT's name for the row's adapter, or "__base__"."""
    emit: Callable[[TextDelta | ChoiceFinished], None]
    is_cancelled: Callable[[], bool]
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of the decoded text already handed on."""
    done: bool = False

    def advance(self, token: int, eos_ids: set[int], decode: Callable[[list[int]], str]) -> None:
        if self.is_cancelled():
            self.done = True
            return
        self.tokens.append(token)
        if token in eos_ids:
            self.finish(decode(self.tokens[:-1]), "stop")
            return
        at_limit = len(self.tokens) >= self.max_tokens
        if not (at_limit or self.stream or self.stops):
            return  # nothing to look at before the end: decode once, then
        text = decode(self.tokens)
        stop_at = min((found for stop in self.stops if (found := text.find(stop)) >= 0), default=None)
        if stop_at is not None:
            self.finish(text[:stop_at], "stop")
        elif at_limit:
            self.finish(text, "length")
        elif self.stream:
            safe = len(text) - max((len(stop) - 1 for stop in self.stops), default=0)
            # Hold back a character whose bytes are not all out yet (decoded as U+FFFD for now).
            while safe > self.sent and text[safe - 1] == "\ufffd":
                safe -= 1
            self._send(text[:safe])

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.emit(TextDelta(self.index, text[self.sent:]))
            self.sent = len(text)

    def finish(self, text: str, reason: FinishReason) -> None:
        self._send(text)
        self.emit(ChoiceFinished(self.index, reason, len(self.tokens)))
        self.done = True


class RowProgress(StoppingCriteria):
    """Ends each row on its own terms (see the module docstring); `generate` stops when all have ended."""

    def __init__(self, rows: list[Row], eos_ids: set[int], decode: Callable[[list[int]], str]) -> None:
        self.rows, self.eos_ids, self.decode = rows, eos_ids, decode

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: object
                 ) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if not row.done:
                row.advance(token, self.eos_ids, self.decode)
        return cast(torch.BoolTensor, torch.tensor([row.done for row in self.rows], device=input_ids.device))

    def finish_unended(self) -> None:
        """Rows `generate` stopped without us (its own length limit): they ended at their length."""
        for row in self.rows:
            if not row.done and not row.is_cancelled():
                row.finish(self.decode(row.tokens), "length")


class RowSampler(LogitsProcessor):
    """Per-row temperature, top-p and seeded draw (see the module docstring); greedy rows pass through."""

    def __init__(self, rows: list[Row]) -> None:
        self.sampled = [i for i, row in enumerate(rows) if row.temperature > 0]
        self.temperature = torch.tensor([[rows[i].temperature] for i in self.sampled])
        self.top_p = torch.tensor([[rows[i].top_p] for i in self.sampled])
        self.generators = [rows[i].generator for i in self.sampled]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.sampled:
            return scores
        device = scores.device
        which = torch.tensor(self.sampled, device=device)
        probs = torch.softmax(scores[which] / self.temperature.to(device), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p.to(device)
        cdf = sorted_probs.masked_fill(outside, 0.0).cumsum(dim=-1)
        # Draws on the CPU, one generator per request: the same seed gives the same draws on any device.
        uniform = torch.cat([torch.rand(1, generator=generator) for generator in self.generators]).to(device)
        picked = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
        tokens = order.gather(-1, picked).squeeze(-1)
        scores[which] = float("-inf")
        scores[which, tokens] = 0.0
        return scores
