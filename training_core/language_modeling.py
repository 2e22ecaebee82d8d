"""Plain next-token prediction on text: packing a corpus into blocks and measuring held-out perplexity.

    blocks = pack(tokenizer, texts, block_size)                  # a datasets.Dataset of input_ids/labels
    heldout_figures(model, tokenizer, texts, block_size)         # {"perplexity", "bits_per_byte", ...}

Used by `pretrain` and `continued_pretrain`.

Packing: every document is tokenized, followed by the end-of-text token, and the whole stream is
cut into blocks of exactly `block_size` tokens (the last, shorter piece is dropped). No padding,
so no compute is spent on pad tokens and every block trains on `block_size` tokens.

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
from itertools import chain
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training_core.spec import JobError

TOKENIZE_BATCH = 1000


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> list[int]:
    """The documents' tokens, each document followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []
    stream: list[int] = []
    for text in chain(texts, [None]):
        if text is not None:
            batch.append(text)
        if batch and (text is None or len(batch) == TOKENIZE_BATCH):
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                stream.extend(ids)
                stream.append(eos)
            batch = []
    return stream


def pack(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], block_size: int) -> datasets.Dataset:
    """Blocks of exactly `block_size` tokens (labels = inputs; the model shifts them)."""
    stream = token_stream(tokenizer, texts)
    blocks = [stream[start:start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks:
        raise JobError("invalid_dataset", f"the corpus has {len(stream)} tokens, fewer than one block of "
                       f"{block_size}; add text or lower max_seq_length", param="hyperparameters.max_seq_length")
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})


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
