"""Plain next-token prediction on text: tokenizing documents and measuring held-out perplexity.

    encode(tokenizer, texts)                                     # each document's tokens + end-of-text
    heldout_figures(model, tokenizer, texts, block_size)         # {"perplexity", "bits_per_byte", ...}

Used by `pretrain` and `continued_pretrain`, whose training blocks come from `training_core.corpus`:
every document is tokenized, followed by the end-of-text token, and the whole stream is cut into
blocks of exactly `block_size` tokens (the last, shorter piece is dropped). No padding, so no compute
is spent on pad tokens and every block trains on `block_size` tokens.

Held-out figures are computed the standard way: the held-out documents form one token stream
(each followed by end-of-text) that is scored in consecutive windows of `block_size`; every token
but the stream's first is predicted exactly once (each window starts where the previous one's
targets ended, so no window sees past its own context). Perplexity is exp of the mean negative
log-likelihood over those tokens; bits per byte is the summed negative log-likelihood in bits over
the UTF-8 bytes of the held-out text, which compares models whose tokenizers differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

TOKENIZE_BATCH = 1000
"""Documents per tokenizer call: enough to keep the fast tokenizer busy, few enough to stay small."""


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], backend: Tokenizer | None = None
           ) -> list[list[int]]:
    """Each document's tokens followed by the end-of-text token (one batched tokenizer call).

    `backend`, a fast tokenizer's own (`tokenizer.backend_tokenizer`), encodes the same ids a third
    faster than the transformers wrapper, which builds offsets and attention masks nobody reads here."""
    eos = tokenizer.eos_token_id
    if backend is None:
        return [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [encoding.ids + [eos] for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> list[int]:
    """The documents' tokens, each document followed by the end-of-text token."""
    stream: list[int] = []
    iterator = iter(texts)
    while batch := list(islice(iterator, TOKENIZE_BATCH)):
        for ids in encode(tokenizer, batch):
            stream.extend(ids)
    return stream


@torch.no_grad()
def heldout_figures(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                    block_size: int, batch_size: int = 8) -> dict[str, Any] | None:
    """Perplexity and bits per byte of `texts` (None when there are none)."""
    if not texts:
        return None
    stream = token_stream(tokenizer, texts)
    # Window k reads tokens [k*L, k*L + L] and predicts its last L (the first window's first token
    # has no context and is the one token never predicted).
    windows = [stream[start:start + block_size + 1] for start in range(0, len(stream) - 1, block_size)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, predicted = 0.0, 0
    try:
        for first in range(0, len(windows), batch_size):
            batch = windows[first:first + batch_size]
            width = max(len(window) for window in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, window in enumerate(batch):
                ids[row, :len(window)] = torch.tensor(window)
                mask[row, :len(window)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            keep = mask[:, 1:].bool()
            nll += float(losses[keep].sum())
            predicted += int(keep.sum())
    finally:
        model.train(was_training)
    text_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {"loss": nll / predicted, "perplexity": math.exp(min(nll / predicted, 700.0)),
            "bits_per_byte": nll / math.log(2) / text_bytes, "tokens": predicted, "bytes": text_bytes}


def prefixed(prefix: str, figures: dict[str, Any] | None) -> dict[str, Any]:
    """`{"perplexity": 3.1}` -> `{"heldout_after_perplexity": 3.1}`: flat metrics for the job and model."""
    return {f"{prefix}_{name}": value for name, value in (figures or {}).items()}
