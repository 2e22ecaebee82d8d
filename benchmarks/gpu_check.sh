#!/usr/bin/env bash
# GPU readiness in one run, under ten minutes on one GPU:
#
#     bash benchmarks/gpu_check.sh                  # on a machine with an NVIDIA GPU
#     bash benchmarks/gpu_check.sh --device cpu     # smoke mode: tiny shapes on the CPU, nothing installed
#
# On a GPU it makes a virtual environment (.venv-gpu, reused by later runs) with torch from the CUDA
# index (TORCH_INDEX, default cu128; the same torch version as the CPU environment when one is found,
# else the index's newest), the project, and, where a prebuilt wheel exists, liger-kernel and
# flash-attn (never compiled here: building flash-attn alone takes longer than this whole check).
# Then it prints, each with the command that measured it:
#
#   1. pre-training MFU on the 125m preset (target: 40% or more);
#   2. the SFT throughput ratio of a launch_training job against the plain TRL script;
#   3. LoRA's peak memory against full fine-tuning at 4 x 128 on the 125m preset (target: <= 0.6x);
#   4. serving tokens/s (benchmarks/serve_throughput.py, one round: the service, the bare engine, sequential).
#
# Each step has its own time limit, so one that hangs cannot take the others with it; the limits add
# up to nine minutes, and the steps take about half that. The install adds a minute or two from a
# warm pip cache (torch's CUDA wheels are ~3 GB the first time).
set -uo pipefail

DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE="${2:?--device takes cuda or cpu}"; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
FAILED=0

SLOWER=1  # the smoke mode's limits are scaled up: a shared CPU runs even tiny shapes slowly
run() {  # run LIMIT_SECONDS COMMAND...: print the command, run it under the limit, note a failure
  local limit=$(( $1 * SLOWER )); shift
  echo "\$ $*"
  timeout --kill-after=10 "$limit" "$@"
  local status=$?
  if [[ $status -ne 0 ]]; then
    echo "!! exit $status (124: over its ${limit} s limit)"
    FAILED=1
  fi
}

if [[ "$DEVICE" == "cpu" ]]; then
  # Smoke mode: the same scripts on tiny shapes, the GPU hidden even where there is one.
  export CUDA_VISIBLE_DEVICES=""
  SLOWER=5
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  [[ -x "$PY" ]] || PY="$(command -v python3)"
  PRETRAIN=(--preset tiny --steps 3 --batch 2 --seq-len 64 --vocab-size 1024 --repeat-corpus 2)
  SFT=(--preset tiny --steps 3 --repeats 1 --batch 4 --seq-len 64)
  LORA=(--preset tiny --steps 2 --shapes 4x32)
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  VENV="$ROOT/.venv-gpu"
  TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
  if [[ ! -x "$VENV/bin/python" ]]; then python3 -m venv "$VENV"; fi
  PY="$VENV/bin/python"
  TORCH_SPEC=torch
  if [[ -x "$ROOT/.venv/bin/python" ]]; then  # the version the CPU environment was tested with
    TORCH_SPEC="torch==$("$ROOT/.venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
  fi
  echo "installing $TORCH_SPEC from $TORCH_INDEX, the project, and optional kernels"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX" || "$PY" -m pip install -q torch --index-url "$TORCH_INDEX"
  "$PY" -m pip install -q -e "$ROOT"
  "$PY" -m pip install -q liger-kernel || echo "liger-kernel not installed: its kernels stay off"
  "$PY" -m pip install -q --only-binary=:all: flash-attn \
    || echo "no prebuilt flash-attn wheel for this torch: SDPA attention, SFT batches padded"
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"; print("torch", torch.__version__, "on", torch.cuda.get_device_name())' || exit 1
  PRETRAIN=(--preset 125m --steps 40 --batch 32 --seq-len 1024 --repeat-corpus 200)
  SFT=(--preset 125m --steps 40 --repeats 1 --batch 16 --seq-len 512)
  LORA=(--preset 125m --steps 4 --shapes 4x128,16x512 --checkpointing)
fi
"$PY" -c 'from training_core import attention, hardware, runs
device = hardware.pick_device()
bf16 = hardware.use_bf16(device)
liger = runs.liger_kernels_installed() and device == "cuda"
print(f"device {device}, bf16 {bf16}, SFT attention {attention.implementation(device, bf16, padding_free=True)}, "
      f"liger kernels {liger}")'

echo "== 1. pre-training MFU (target on one GPU: >= 40%)"
run 150 "$PY" benchmarks/pretrain_mfu.py "${PRETRAIN[@]}"

echo "== 2. SFT throughput: launch_training job against the plain TRL script"
run 180 "$PY" benchmarks/sft_throughput.py "${SFT[@]}"

echo "== 3. LoRA peak memory against full fine-tuning (target: <= 0.6x)"
run 120 "$PY" benchmarks/lora_memory.py "${LORA[@]}"

echo "== 4. serving tokens/s"
if [[ "$DEVICE" == "cpu" ]]; then
  run 60 "$PY" benchmarks/serve_throughput.py --help
else
  run 150 "$PY" benchmarks/serve_throughput.py --rounds 1
fi

exit $FAILED
