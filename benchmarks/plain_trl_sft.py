"""The baseline: a plain TRL SFT script, as a user would write it without weightsmith.

    python benchmarks/plain_trl_sft.py MODEL_DIR DATA.jsonl STEPS BATCH SEQ_LEN

Prints one JSON line: wall-clock time of the first optimizer step (time.time()), tokens/s of
the training loop, tokens trained. Run by `sft_throughput.py`, which times its start.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


class Clock(TrainerCallback):
    first_step_time: float | None = None
    train_start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.train_start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.first_step_time is None:
            self.first_step_time = time.time()


def main(model_dir: str, data_path: str, steps: int, batch: int, seq_len: int) -> None:
    with open(data_path, encoding="utf-8") as handle:
        records = [{"messages": json.loads(line)["messages"]} for line in handle if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    clock = Clock()
    config = SFTConfig(output_dir="/tmp/plain-trl-sft", max_steps=steps, per_device_train_batch_size=batch,
                       max_length=seq_len, learning_rate=1e-3, report_to="none", save_strategy="no",
                       logging_steps=10, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                       assistant_only_loss=True, gradient_checkpointing=False,
                       bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(records), callbacks=[clock])
    trainer.train()
    seconds = time.monotonic() - clock.train_start
    tokens = trainer.state.num_input_tokens_seen
    print(json.dumps({"first_step_time": clock.first_step_time, "tokens": tokens, "tokens_per_second": tokens / seconds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
