"""Model size presets: Llama shapes and their parameter counts, without importing torch.

The service prices a pre-training request (6 x parameters x tokens) before any model exists, so
the shapes and the count live here, in the standard library; `presets` builds the models.

| preset | parameters | hidden | layers | heads (kv) | what for |
|---|---|---|---|---|---|
| tiny   |     1,066,112 |  128 |  4 |  4 (4) | tests: a few steps in well under a second on a CPU |
| small  |     9,966,848 |  256 | 10 |  8 (4) | the demo and CPU benchmarks: a small domain in minutes |
| medium |    46,936,576 |  512 | 12 |  8 (8) | a GPU check of throughput |
| 125m   |   124,275,456 |  768 | 12 | 12 (12)| GPT-2-small scale: the one-GPU MFU benchmark |
| 350m   |   341,885,952 | 1024 | 24 | 16 (16)| a domain model on one GPU |
| 1b     | 1,040,254,976 | 2048 | 16 | 32 (8) | the largest preset: several GPUs or a long run on one |

Counts are at the preset's vocabulary size with tied input and output embeddings; a tokenizer
trained on a small corpus has fewer tokens, and the model then fewer parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    parameters: int


SHAPE_FIELDS = tuple(field.name for field in fields(ModelPreset) if field.name != "parameters")
"""What an explicit shape (`model_config`) gives: every field of a preset but its parameter count."""

PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(128, 4, 352, 4, 4, 2048, 1024, parameters=1_066_112),
    "small": ModelPreset(256, 10, 768, 8, 4, 8192, 2048, parameters=9_966_848),
    "medium": ModelPreset(512, 12, 1408, 8, 8, 16384, 2048, parameters=46_936_576),
    "125m": ModelPreset(768, 12, 2560, 12, 12, 32768, 2048, parameters=124_275_456),
    "350m": ModelPreset(1024, 24, 2816, 16, 16, 32768, 2048, parameters=341_885_952),
    "1b": ModelPreset(2048, 16, 8192, 32, 8, 32768, 4096, parameters=1_040_254_976),
}


def parameter_count(shape: ModelPreset, vocab_size: int | None = None) -> int:
    """Parameters of a Llama model of this shape (tied embeddings, no biases)."""
    h, vocab = shape.hidden_size, vocab_size or shape.vocab_size
    kv_width = shape.num_key_value_heads * (h // shape.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv_width + 3 * h * shape.intermediate_size + 2 * h  # q,o; k,v; MLP; norms
    return vocab * h + shape.num_hidden_layers * per_layer + h  # + the final norm


def shape_of(options: dict[str, Any]) -> ModelPreset:
    """The shape a pretrain job builds: its options' explicit `model_config`, else its `preset`."""
    config = options.get("model_config")
    if config:
        return ModelPreset(**{name: int(config[name]) for name in SHAPE_FIELDS}, parameters=0)
    return PRESETS[options.get("preset", "small")]
