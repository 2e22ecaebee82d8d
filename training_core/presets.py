"""Llama-architecture base models built from a size preset, with a tokenizer trained on the spot.

    from training_core import presets
    presets.build_base_model("tiny", ["some text", ...], "models/tiny")   # ~1M parameters
    presets.build_tiny_model("models/tiny")                               # the same, on a built-in corpus

Pre-training from scratch, the demo and the tests all need a base model with no hub to fetch one
from, so this writes an ordinary Hugging Face directory (safetensors weights, config, generation
config, tokenizer, chat template) that `AutoModelForCausalLM` and `AutoTokenizer` load as they
would any other.

The tokenizer is byte-level BPE (every string encodes, no unknown token) with ChatML turns, so
chat records (`messages`) train and generate without further setup. Its end-of-text token ends
plain text; the chat template ends each turn with `<|im_end|>`, and the generation config stops
at either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from training_core.shapes import PRESETS, ModelPreset

__all__ = ["PRESETS", "ModelPreset", "build_base_model", "build_tiny_model", "model_config", "train_tokenizer"]

PAD, BOS, EOS = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML, with the assistant's content and end-of-turn marked `{% generation %}` so that
# `assistant_only_loss` can train on the replies alone and the model learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Enough varied English for a tokenizer and a few training steps: what `build_tiny_model` uses.
TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A red-drop is a customer whose light level is under -27 dBm.",
    "The quiet window runs from 01:00 to 04:00, when no maintenance starts.",
    "T2 tickets go to the field team for a walk-out to the customer's address.",
    "PARKED means the ticket waits on the customer to answer.",
    "Splice cabinets are listed in the Gridbook by their SC code.",
    "An ONT reseat is unplugging and reseating the customer's optical network terminal.",
    "Models learn from data; good data makes good models.",
] * 8


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, model_max_length: int = 2048,
                    extra_special_tokens: Sequence[str] = (), chat_template: str = CHAT_TEMPLATE
                    ) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts` and save it, with its chat template, as a transformers tokenizer.

    `extra_special_tokens` (a domain's markers, tool-call tags) are never split; `chat_template` replaces
    the ChatML default (it should keep `{% generation %}` around replies for assistant-only loss)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS],
        min_frequency=2, show_progress=False,
        # All 256 bytes from the start, so text unlike the corpus still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END, *(t for t in extra_special_tokens if t not in SPECIAL_TOKENS)],
        model_max_length=model_max_length)
    wrapped.chat_template = chat_template
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def model_config(preset: str | ModelPreset, vocab_size: int | None = None) -> LlamaConfig:
    """The preset's (or an explicit shape's) Llama config, at its own vocabulary size unless a tokenizer
    sets another."""
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    return LlamaConfig(
        vocab_size=vocab_size or shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=True)


def build_base_model(preset: str | ModelPreset, tokenizer_dir_or_texts: str | Path | Iterable[str],
                     out_dir: str | Path, seed: int = 0, **tokenizer_options: Any) -> Path:
    """Write a randomly initialised model of `preset` (a name or an explicit shape) to `out_dir`, with
    a tokenizer.

    `tokenizer_dir_or_texts` is either a directory holding a tokenizer to reuse, or texts to train
    one on (at most the preset's vocabulary size; `tokenizer_options` go to `train_tokenizer`).
    """
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer_dir_or_texts, str | Path):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir_or_texts))
        tokenizer.save_pretrained(str(out_dir))
    else:
        tokenizer_options = {"vocab_size": shape.vocab_size, **tokenizer_options}
        tokenizer = train_tokenizer(tokenizer_dir_or_texts, out_dir=out_dir,
                                    model_max_length=shape.max_position_embeddings, **tokenizer_options)
    # A multiple of 64 keeps the embedding and output matmuls on fast GPU tile sizes.
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = model_config(shape, vocab_size)
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Generation stops at the end of a text and, with a chat template that has one, at the end of a turn.
    vocab = tokenizer.get_vocab()
    stops = [tokenizer.eos_token_id]
    if IM_END in vocab:
        stops.append(vocab[IM_END])
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
    model.save_pretrained(str(out_dir))
    return out_dir


def build_tiny_model(out_dir: str | Path, texts: Sequence[str] = TINY_CORPUS, seed: int = 0) -> Path:
    """The `tiny` preset on a built-in corpus: a base model for tests, built in about a second."""
    return build_base_model("tiny", texts, out_dir, seed=seed)
