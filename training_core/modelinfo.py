"""What a model directory holds, read without torch: the service prices jobs with this.

    from training_core import modelinfo
    modelinfo.count_parameters("path/to/model")   # 1_066_112

Only the standard library is imported, so the service can call this per request cheaply: the
parameter count comes from the safetensors headers (an 8-byte length, then a JSON table of
tensor shapes), never from the weights themselves.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The model's `config.json` as a dict."""
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def count_parameters(model_dir: str | Path) -> int:
    """Parameters stored in the directory's safetensors files (tied weights are stored, and counted, once)."""
    return sum(_tensor_elements(path) for path in weight_files(model_dir))


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model: the shards named by its index, or every `*.safetensors` file."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.exists():
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [model_dir / name for name in sorted(set(shards))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return files


def _tensor_elements(path: Path) -> int:
    with path.open("rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_length))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
