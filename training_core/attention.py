"""The attention a job's model computes with: `packed_sdpa` on a CPU, SDPA or FlashAttention on a GPU.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention.implementation(device, bf16))
    # FlashAttention where installed, on a GPU, for padding-free batches; `packed_sdpa` on a CPU.

Padding-free batches (`Hyperparameters.padding_free`) put a step's records one after another in a
single row, with position ids that restart at every record and the records' boundaries
(`cu_seq_lens_q`, from TRL's collator). FlashAttention's variable-length kernel reads those
boundaries and attends within each record. Without it, transformers falls back to one causal mask
over the whole row, blocked per record: correct, but the attention then costs the square of the
row's length (eight records of 100 tokens: 800 x 800, against 8 x 100 x 100), which on the CPU made
a padding-free step slower than a padded one. `packed_sdpa` attends record by record instead, each
with SDPA's causal kernel: the same numbers, at the cost of the records' own lengths.

On the CPU, SDPA's fused kernel is about three times slower in bf16 than in fp32 (forward and
backward, measured with torch 2.13 on a processor with avx512_bf16), so under bf16 autocast the
attention is computed in fp32, with autocast off around it (autocast would otherwise cast SDPA's
fp32 inputs back to bf16); the matmuls around it, where bf16 pays, stay in bf16. On the `small`
preset that makes a whole training step 1.36x faster than attention left to autocast.

What it does not cover: GPUs use transformers' own kernels (padding-free SFT turns itself off on a
GPU without FlashAttention, see `padding_free_supported`), and only decoder models whose attention
modules call transformers' attention interface (Llama, Qwen, Mistral, Gemma and their kin) use it.
"""

from __future__ import annotations

import importlib.util
from itertools import pairwise
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "packed_sdpa"


def implementation(device: str, bf16: bool, padding_free: bool = False) -> str:
    """The `attn_implementation` a model is loaded with on `device` (bf16: whether training autocasts;
    padding_free: whether its batches are padding-free rows, SFT's default)."""
    if device == "cuda":
        # FlashAttention computes in fp16/bf16 only, and a forward outside autocast (held-out
        # perplexity, generation) would hand it fp32: only padding-free training, where its varlen
        # kernel is what makes the rows pay, uses it; SDPA's own flash kernel serves the rest.
        return "flash_attention_2" if padding_free and bf16 and flash_attention_installed() else "sdpa"
    _register()
    return PACKED_SDPA


def padding_free_supported(device: str, bf16: bool) -> bool:
    """Whether padding-free batches attend at the records' own cost here (see the module docstring)."""
    return implementation(device, bf16, padding_free=True) in (PACKED_SDPA, "flash_attention_2")


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function signature: (batch, heads, tokens, head_dim) tensors in, the
    output as (batch, tokens, heads, head_dim) out."""
    if query.device.type == "cpu" and (query.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
        # In fp32 with autocast off: autocast lists SDPA among its bf16 ops, so fp32 inputs alone would
        # be cast straight back to bf16, where the CPU kernel's backward is the slow one.
        with torch.autocast("cpu", enabled=False):
            output, _ = packed_sdpa(module, query.float(), key.float(), value.float(), attention_mask, dropout,
                                    scaling, **kwargs)
        return output.to(query.dtype), None
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        # Padded batches, evaluation and generation (with its cache): SDPA as transformers runs it.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    edges = boundaries.tolist()
    outputs = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout, scale=scaling,
        is_causal=True) for start, end in pairwise(edges) if end > start]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _register() -> None:
    # The mask is SDPA's (a causal mask, blocked per record when position ids restart): every input
    # that is not a padding-free row still attends exactly as under `sdpa`.
    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
