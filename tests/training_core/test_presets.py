"""Base models built on the spot: presets, the tokenizer, and reading a model directory without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from training_core import hardware, modelinfo, presets


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_each_preset_has_the_parameter_count_it_documents(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no time
        model = LlamaForCausalLM(presets.model_config(name))
    assert model.num_parameters() == presets.PRESETS[name].parameters


def test_a_tiny_model_loads_with_the_auto_classes_and_its_size_is_read_from_headers(tmp_path: Path) -> None:
    model_dir = presets.build_tiny_model(tmp_path / "tiny")

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    assert modelinfo.count_parameters(model_dir) == model.num_parameters()
    assert 500_000 < model.num_parameters() < 1_500_000
    assert modelinfo.read_model_config(model_dir)["model_type"] == "llama"
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
    prompt = tokenizer("The quick brown fox", return_tensors="pt")
    generated = model.generate(**prompt, min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_the_tokenizer_encodes_any_text_and_renders_chatml_with_the_reply_marked(tmp_path: Path) -> None:
    tokenizer = presets.train_tokenizer(presets.TINY_CORPUS, 512, tmp_path)
    text = "Ünïcödé, emoji 🚀 and tabs\tall survive — byte-level BPE has no unknown token."

    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len({tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token}) == 3
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    encoded: Any = tokenizer.apply_chat_template(messages, return_dict=True,
                                                 return_assistant_tokens_mask=True)
    reply = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(reply) == "hello<|im_end|>"  # the model is trained to stop
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.apply_chat_template(messages, tokenize=False) == rendered


def test_a_base_model_can_reuse_a_tokenizer_directory(tmp_path: Path) -> None:
    first = presets.build_tiny_model(tmp_path / "first")

    second = presets.build_base_model("tiny", first, tmp_path / "second", seed=1)

    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert modelinfo.count_parameters(second) == modelinfo.count_parameters(first)


def test_reading_a_model_directory_imports_no_torch(tmp_path: Path) -> None:
    model_dir = presets.build_tiny_model(tmp_path / "tiny")
    probe = ("import sys; from training_core import modelinfo; "
             f"n = modelinfo.count_parameters({str(model_dir)!r}); "
             "print(n, 'torch' in sys.modules)")

    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout

    assert output.split() == [str(modelinfo.count_parameters(model_dir)), "False"]


def test_the_matmul_peak_is_measured_once_a_process() -> None:
    peak = hardware.measure_matmul_peak_flops("cpu")

    assert peak > 1e8  # any CPU of this century does a hundred MFLOP/s
    assert hardware.measure_matmul_peak_flops("cpu") == peak
    assert hardware.peak_memory_bytes("cpu") > 0


def test_the_tokenizer_takes_domain_special_tokens_and_a_chat_template(tmp_path: Path) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer = presets.train_tokenizer(presets.TINY_CORPUS, 512, tmp_path, extra_special_tokens=["<|ticket|>"],
                                        chat_template=template)
    ids = tokenizer("see <|ticket|> NW-40112")["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|ticket|>") in ids  # one token, never split
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.convert_tokens_to_ids("<|ticket|>") == tokenizer.convert_tokens_to_ids("<|ticket|>")


def test_an_explicit_shape_counts_its_parameters_like_the_model_does() -> None:
    from training_core.shapes import ModelPreset, parameter_count

    shape = ModelPreset(96, 3, 256, 6, 2, 1000, 512, parameters=0)
    with torch.device("meta"):
        model = LlamaForCausalLM(presets.model_config(shape))
    assert parameter_count(shape) == model.num_parameters()
