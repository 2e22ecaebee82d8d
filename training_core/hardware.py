"""The device a job trains on, its precision, and what that device can do.

    from training_core import hardware
    device = hardware.pick_device()                  # "cuda" or "cpu"
    hardware.measure_matmul_peak_flops(device)       # e.g. 1.2e11 on two CPU cores

Model FLOPs utilisation (MFU) is `6 x parameters x tokens/s` over the device's peak. Datasheet peaks
do not exist for CPUs and overstate GPUs under real clocks, so the peak is measured: a short timed
matmul in the precision training uses, cached per process.
"""

from __future__ import annotations

import functools
import os
import resource
import time

import torch


def pick_device() -> str:
    """CUDA when a GPU is visible, else the CPU (several GPUs are `accelerate`'s business, not ours)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def world_size() -> int:
    """Processes training this job together (`accelerate launch` / torchrun set WORLD_SIZE); 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a several-device job, or the only process: the one that writes events and results."""
    return int(os.environ.get("RANK", "0")) == 0


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag true if it is true in any process of the job (an all-reduce of a few bytes a step)."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return flags
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    votes = torch.tensor([float(flag) for flag in flags], device=device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(vote) for vote in votes.tolist())


def use_bf16(device: str) -> bool:
    """bf16 mixed precision on GPUs that support it; the CPU trains in fp32, where bf16 autocast is slower."""
    return device == "cuda" and torch.cuda.is_bf16_supported()


def training_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if use_bf16(device) else torch.float32


@functools.cache
def measure_matmul_peak_flops(device: str, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul in the training precision, the best of repeated timings over ~`seconds`."""
    dtype = training_dtype(device)
    # Big enough to be compute-bound, small enough that one product stays well under the time budget.
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _synchronize(device)
    torch.matmul(a, b)  # warm-up: kernel selection and thread pool start-up are not throughput
    _synchronize(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def reset_peak_memory(device: str) -> None:
    """Start the peak over from what is in use now (called when training starts), so loading the
    model, whose transient copies a full and a LoRA run share, does not count as training memory."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the process's peak resident set (VmHWM) to its current size
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # elsewhere the peak stays the process's whole-life peak


def peak_memory_bytes(device: str) -> int:
    """Peak memory since `reset_peak_memory`: allocated GPU memory on CUDA, the resident set on the CPU."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    # Linux reports ru_maxrss in KiB; it never resets.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
