"""The baseline: a plain TRL SFT script, as a user would write it without weightsmith.

    python benchmarks/plain_trl_sft.py MODEL_DIR DATA.jsonl STEPS BATCH SEQ_LEN [--bf16] [lever flags]

With no flag it is the script a user writes for the device: TRL's defaults, except bf16 (TRL's
default, which refuses to start on a CPU unless told `use_cpu`) and gradient checkpointing (TRL's
default, which costs an extra forward pass: turned off, so the baseline is the faster script).
`--bf16` is the same script with the best precision the processor offers. The other flags each
add one lever, so `sft_levers.py` can weigh them one at a time on the same script.

Prints one JSON line: wall-clock time of the first optimizer step (time.time()), tokens/s of the
training loop and tokens per CPU-second of it (what an idle machine would do: the figure that a
shared machine's load disturbs least), tokens trained, the mean training loss and the mean of the
last five steps' losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Clock(TrainerCallback):
    first_step_time: float | None = None
    train_start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.train_start, self.train_start_cpu = time.monotonic(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.last_step_end, self.last_step_cpu = time.monotonic(), time.process_time()
        if self.first_step_time is None:
            self.first_step_time = time.time()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model_dir", "data_path"):
        parser.add_argument(name)
    for name in ("steps", "batch", "seq_len"):
        parser.add_argument(name, type=int)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (on a CPU: use_cpu as TRL asks)")
    parser.add_argument("--attention", default="sdpa", help="sdpa (transformers' default) or packed_sdpa")
    parser.add_argument("--padding-free", action="store_true", help="records of a batch in one row, no padding")
    parser.add_argument("--packing", action="store_true", help="TRL's best-fit packing of records into sequences")
    parser.add_argument("--optim", default=None, help="e.g. adamw_torch (foreach); default: adamw_torch_fused")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--group-by-length", action="store_true", help="batches of records of similar length")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    with open(args.data_path, encoding="utf-8") as handle:
        records = [{"messages": json.loads(line)["messages"]} for line in handle if line.strip()]
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if args.attention == "packed_sdpa":
        from training_core import attention

        attention.implementation("cpu", args.bf16)  # registers it (on any device)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation=args.attention)
    clock = Clock()
    levers = {"optim": args.optim} if args.optim else {}
    if args.group_by_length:
        levers["train_sampling_strategy"] = "group_by_length"
    bf16 = args.bf16 or (cuda and torch.cuda.is_bf16_supported())
    config = SFTConfig(output_dir="/tmp/plain-trl-sft", max_steps=args.steps, per_device_train_batch_size=args.batch,
                       max_length=args.seq_len, learning_rate=1e-3, report_to="none", save_strategy="no",
                       logging_steps=1, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                       assistant_only_loss=True, gradient_checkpointing=args.gradient_checkpointing,
                       bf16=bf16, use_cpu=args.bf16 and not cuda,
                       packing=args.packing, torch_compile=args.compile, **levers)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True) \
        if args.padding_free else None
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, data_collator=collator,
                         train_dataset=Dataset.from_list(records), callbacks=[clock])
    output = trainer.train()
    # From the start of train() to the end of the last step, as the job's figure is measured.
    seconds = clock.last_step_end - clock.train_start
    tokens = trainer.state.num_input_tokens_seen
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({"first_step_time": clock.first_step_time, "tokens": tokens, "tokens_per_second": tokens / seconds,
                      "tokens_per_cpu_second": tokens / (clock.last_step_cpu - clock.train_start_cpu),
                      "train_loss": output.training_loss, "final_loss": sum(losses[-5:]) / len(losses[-5:]),
                      "precision": "bf16" if bf16 else "fp32"}))


if __name__ == "__main__":
    main()
