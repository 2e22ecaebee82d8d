"""How many devices one job can be given here: the GPUs this machine shows, or its CPU cores where it
has none (a several-device CPU job runs one process a core, gloo between them). Read without
importing torch, which would add seconds to the service's start."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def local_max_devices() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "-1"):
        return len([d for d in visible.split(",") if d.strip()])
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and visible is None:
        count = len(list(gpus.iterdir()))
        if count:
            return count
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
