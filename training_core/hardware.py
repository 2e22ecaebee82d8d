"""The device a job trains on, its precision, and what that device can do.

    from training_core import hardware
    device = hardware.pick_device()                          # "cuda" or "cpu"
    bf16 = hardware.use_bf16(device, "auto")                 # measured on a CPU, see below
    hardware.measure_matmul_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)

Precision: `auto` trains under bf16 autocast where the device is faster with it. GPUs report bf16
support. A CPU is measured: with bf16 instructions (avx512_bf16, AMX, Arm bf16) a bf16 matmul can
be 2-3x faster than an fp32 one (two cores of this machine: ~94 against ~34 GFLOP/s on one thread),
without them it is emulated and slower. The measurement (a short matmul in each precision) is kept
per machine in `cache_dir()`, so it costs ~0.6 s once, not at every job.

Model FLOPs utilisation (MFU) is `6 x parameters x tokens/s` over the device's peak in the precision
that ran. Datasheet peaks do not exist for CPUs and overstate GPUs under real clocks, so the peak is
measured: a short timed matmul, once per process.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from training_core.spec import JobError


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


def use_bf16(device: str, precision: str = "auto") -> bool:
    """Whether training autocasts to bf16: `precision` as the job asked (`auto`, `bf16`, `fp32`), where
    `auto` is bf16 on GPUs that have it and on processors where a bf16 matmul is measured faster than
    an fp32 one (`cpu_bf16_is_faster`), fp32 elsewhere. Master weights and optimizer state stay fp32."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            raise JobError("invalid_request", f"precision bf16: this GPU ({torch.cuda.get_device_name()}) has no "
                           "bf16; use precision auto or fp32", param="hyperparameters.precision")
        return True
    if precision != "auto":
        raise JobError("invalid_request", f"precision {precision!r} is not one of auto, bf16, fp32",
                       param="hyperparameters.precision")
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_is_faster()


def training_dtype(device: str, precision: str = "auto") -> torch.dtype:
    return torch.bfloat16 if use_bf16(device, precision) else torch.float32


BF16_MIN_SPEEDUP = 1.3
"""How much faster a bf16 matmul must be than an fp32 one for `auto` to pick bf16 on a CPU: autocast
casts every weight once per step and runs softmax, norms and the loss in fp32, so a smaller matmul
gain does not survive a whole training step."""


def cpu_bf16_is_faster() -> bool:
    """Whether this CPU trains faster in bf16: no without bf16 instructions (avx512_bf16 or amx_bf16 on
    x86, bf16 on Arm), where bf16 is emulated; otherwise measured once per machine, torch version and
    thread count (`cpu_matmul_probe`)."""
    if not _cpu_has_bf16_instructions():
        return False
    probe = cpu_matmul_probe()
    return probe["bf16_flops"] >= BF16_MIN_SPEEDUP * probe["fp32_flops"]


def cpu_matmul_probe() -> dict[str, Any]:
    """fp32 and bf16 matmul FLOP/s on this CPU, measured once and kept in the machine's cache
    (`cache_dir()/hardware.json`, keyed by processor, torch version and threads): ~0.6 s the first
    time, a file read after. A cache that cannot be written only costs the measurement again."""
    key = f"{_cpu_model()}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    path = cache_dir() / "hardware.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and {"fp32_flops", "bf16_flops"} <= known[key].keys():
        return known[key]
    known[key] = {"fp32_flops": _measure_matmul("cpu", torch.float32),
                  "bf16_flops": _measure_matmul("cpu", torch.bfloat16), "measured_at": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return known[key]


def cache_dir() -> Path:
    """Where per-machine measurements live: `WEIGHTSMITH_CACHE_DIR`, else the user's cache directory."""
    configured = os.environ.get("WEIGHTSMITH_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "weightsmith"


@functools.cache
def measure_matmul_peak_flops(device: str, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul in `dtype` (the precision training ran in), the best of repeated
    timings over ~0.3 s; measured once per process."""
    return _measure_matmul(device, dtype)


def _measure_matmul(device: str, dtype: torch.dtype, seconds: float = 0.3) -> float:
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


def _cpu_has_bf16_instructions() -> bool:
    flags = _cpu_info_field("flags") or _cpu_info_field("Features")
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags.split()))


def _cpu_model() -> str:
    return _cpu_info_field("model name") or platform.processor() or platform.machine()


@functools.cache
def _cpu_info_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                label, _, value = line.partition(":")
                if label.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


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
