"""Pricing counts records as the trainer will see them: the model's tokenizer and chat template,
rendered without transformers, give what transformers gives."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from training_core.data import validate_file
from training_core.token_counts import ModelTokens, measured_lengths, record_tokens

USER = {"role": "user", "content": "What does a red-drop mean on the north feeder?"}
ANSWER = {"role": "assistant", "content": "A walk-out: the crew leaves the span."}
RECORDS = [
    {"messages": [{"role": "system", "content": "Answer briefly."}, USER, ANSWER]},
    {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "No idea."}]},
    {"prompt": "Q: what is a red-drop?\nA:", "completion": " a walk-out"},
    {"text": "Red-drops are walk-outs. " * 5},
]


def _transformers_count(tokenizer: Any, record: dict[str, Any]) -> int:
    def text(value: str) -> int:
        return len(tokenizer(value, add_special_tokens=False)["input_ids"])

    if "messages" in record:
        return text(tokenizer.apply_chat_template(record["messages"], tokenize=False))
    if "chosen" in record:
        return text(tokenizer.apply_chat_template(record["prompt"] + record["chosen"], tokenize=False))
    if "text" in record:
        return text(record["text"]) + 1
    return text(record["prompt"] + record["completion"]) + 1


def test_records_count_as_transformers_renders_and_tokenizes_them(tiny_model: Path) -> None:
    model = ModelTokens.load(tiny_model)
    assert model is not None and model.template is not None
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    counts = [record_tokens(model, record) for record in RECORDS]
    assert counts == [_transformers_count(tokenizer, record) for record in RECORDS]
    assert counts[0] > len(tokenizer(USER["content"] + ANSWER["content"])["input_ids"]) + 6  # the template's markers


@pytest.mark.parametrize("where", ["jinja_file", "config"])
def test_a_template_that_refuses_a_turn_is_counted_as_text(tiny_model: Path, tmp_path: Path, where: str) -> None:
    model_dir = tmp_path / "strict"
    shutil.copytree(tiny_model, model_dir)
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
              "{% endif %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    (model_dir / "chat_template.jinja").unlink()
    if where == "jinja_file":
        (model_dir / "chat_template.jinja").write_text(strict, encoding="utf-8")
    else:  # the layout transformers 4 wrote
        config = model_dir / "tokenizer_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text(encoding="utf-8")), "chat_template": strict}),
                          encoding="utf-8")
    model = ModelTokens.load(model_dir)
    assert model is not None
    refused = record_tokens(model, RECORDS[0])
    assert refused == model.text(f"Answer briefly.\n{USER['content']}\n{ANSWER['content']}") + 1
    rendered = record_tokens(model, {"messages": [USER, ANSWER]})
    assert rendered == model.text(f"user: {USER['content']}{model.special_tokens['eos_token']}"
                                  f"assistant: {ANSWER['content']}{model.special_tokens['eos_token']}")



def test_a_model_directory_whose_template_changes_is_counted_afresh(tiny_model: Path, tmp_path: Path) -> None:
    # Counts are cached per model directory; a user's own directory can get a new template in place.
    model_dir = tmp_path / "mine"
    shutil.copytree(tiny_model, model_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:1] * 3), encoding="utf-8")
    report = dataclasses.asdict(validate_file(data))
    before = measured_lengths(model_dir, [(data, report)])
    template = model_dir / "chat_template.jinja"
    preamble = "You answer questions about feeders, spans and crews. " * 8
    if template.is_file():
        template.write_text(preamble + template.read_text(encoding="utf-8"), encoding="utf-8")
    else:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = preamble + config["chat_template"]
        (model_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    after = measured_lengths(model_dir, [(data, report)])

    assert before is not None and after is not None
    assert after.longest >= before.longest + 40  # the preamble's tokens, not the first count again
