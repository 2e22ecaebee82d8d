"""The training lifecycle through the real MCP client: pretrain -> SFT -> DPO -> GRPO as one lineage,
continued pre-training with forgetting measured, and the refusals that keep bad requests out."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from mcp import Client
from safetensors.torch import load_file

from server.api.mcp import build_mcp_server
from server.context import ServiceContext, ServiceRef
from tests.conftest import CHAT_FACTS, chat_records, write_jsonl
from tests.server.api.test_mcp_in_memory import call, wait_final

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "sample_corpus"
DIGITS_REWARD = (
    "def digits(prompts, completions, **columns):\n"
    "    # the share of characters that are digits: a pattern a tiny model can learn to prefer\n"
    "    texts = [c if isinstance(c, str) else c[0]['content'] for c in completions]  # TRL: turns for chats\n"
    "    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]\n")


def preference_records() -> list[dict[str, Any]]:
    """Hosted-API preference records: the right fact preferred to another question's answer."""
    return [{"input": {"messages": [{"role": "user", "content": q}]},
             "preferred_output": [{"role": "assistant", "content": a}],
             "non_preferred_output": [{"role": "assistant", "content": CHAT_FACTS[(i + 1) % len(CHAT_FACTS)][1]}]}
            for i, (q, a) in enumerate(CHAT_FACTS * 8)]


def prompt_records() -> list[dict[str, Any]]:
    return [{"prompt": [{"role": "user", "content": q}], "reference": a} for q, a in CHAT_FACTS * 10]


def weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_every_tensor_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"not trained: {unchanged}"


def assert_loads_and_generates(model_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer("The quiet window", return_tensors="pt")
    output = model.generate(**inputs, min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4


def test_pretrain_sft_dpo_grpo_chain_learns_at_each_step_and_keeps_its_lineage(
        service: ServiceContext, tmp_path: Path) -> None:
    corpus = tmp_path / "gridbook.txt"
    corpus.write_text((CORPUS / "procedures.txt").read_text(encoding="utf-8"), encoding="utf-8")
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(48))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records())
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_records())
    quick = {"per_device_batch_size": 4, "max_seq_length": 64, "save_steps": 10}

    async def run_job(client: Client, **request: Any) -> dict[str, Any]:
        job = (await call(client, "launch_training", **request))["job"]
        job = await wait_final(client, job["id"])
        assert job["state"] == "succeeded", job["error"]
        return job

    async def main() -> dict[str, Any]:
        async with Client(build_mcp_server(ServiceRef(service), toolsets=("all",))) as client:
            ids = {name: (await call(client, "upload_dataset", path=str(path)))["dataset"]
                   for name, path in (("text", corpus), ("chat", chats), ("pairs", pairs), ("prompts", prompts))}
            assert ids["pairs"]["format"] == "preference" and ids["prompts"]["format"] == "prompt_only"
            jobs = {"pretrain": await run_job(
                client, method="pretrain", datasets=[ids["text"]["id"]], adapter="full",
                options={"preset": "tiny", "vocab_size": 768},
                hyperparameters={**quick, "max_steps": 40, "learning_rate": 3e-3})}
            jobs["sft"] = await run_job(
                client, method="sft", base_model=jobs["pretrain"]["model_id"], datasets=[ids["chat"]["id"]],
                adapter="full", hyperparameters={**quick, "max_steps": 16, "learning_rate": 2e-3})
            jobs["dpo"] = await run_job(
                client, method="dpo", base_model=jobs["sft"]["model_id"], datasets=[ids["pairs"]["id"]],
                adapter="lora", merge_adapter=True, options={"beta": 0.1},
                hyperparameters={**quick, "max_steps": 12, "learning_rate": 5e-3})
            jobs["grpo"] = await run_job(
                client, method="grpo", base_model=jobs["dpo"]["model_id"], datasets=[ids["prompts"]["id"]],
                adapter="full", options={"rewards": [{"type": "python", "source": DIGITS_REWARD,
                                                      "function": "digits"}],
                                         "num_generations": 4, "max_completion_length": 12},
                hyperparameters={**quick, "max_steps": 30, "learning_rate": 1e-2, "per_device_batch_size": 8})
            history = {name: (await call(client, "get_metric_history", job_id=jobs[name]["id"], metric=metric,
                                         max_points=100))["values"]
                       for name, metric in (("pretrain", "loss"), ("sft", "loss"),
                                            ("dpo", "rewards/accuracies"), ("grpo", "reward"))}
            models = {}
            for listed in (await call(client, "list_models"))["models"]:
                detail = await call(client, "get_model", model=listed["id"])
                models[listed["job_id"]] = {**listed, "path": detail["path"], "merged_path": detail["merged_path"],
                                            "metrics": detail["metrics"]}
            return {"jobs": jobs, "history": history, "models": models}

    found = anyio.run(main)
    jobs, history, models = found["jobs"], found["history"], found["models"]
    chain = [models[jobs[name]["id"]] for name in ("pretrain", "sft", "dpo", "grpo")]

    # Lineage: each model names the one it started from.
    assert chain[0]["parent_model_id"] is None
    for parent, child in itertools.pairwise(chain):
        assert child["parent_model_id"] == parent["id"]
    assert json.loads(Path(chain[3]["path"], "lineage.json").read_text())["parent_model_id"] == chain[2]["id"]

    # pretrain and SFT: the loss falls; held-out perplexity too, with bits per byte reported.
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    for name in ("pretrain", "sft"):
        assert mean(history[name][-5:]) < mean(history[name][:5]), name
    pretrain = jobs["pretrain"]["metrics"]
    assert pretrain["heldout_after_perplexity"] < pretrain["heldout_before_perplexity"]
    assert 0 < pretrain["heldout_after_bits_per_byte"] < pretrain["heldout_before_bits_per_byte"]
    # DPO: preference accuracy rises over training; GRPO: the reward rises on the toy task.
    assert mean(history["dpo"][-4:]) > mean(history["dpo"][:4])
    assert mean(history["grpo"][-5:]) > mean(history["grpo"][:5]) + 0.2

    # Every trainable parameter changed; LoRA's B matrices start at zero and are non-zero now.
    assert_every_tensor_changed(weights(Path(chain[0]["path"]).parent / "init"), weights(chain[0]["path"]))
    assert_every_tensor_changed(weights(chain[0]["path"]), weights(chain[1]["path"]))
    adapter = load_file(str(Path(chain[2]["path"]) / "adapter_model.safetensors"))
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)
    assert_every_tensor_changed(weights(chain[2]["merged_path"]), weights(chain[3]["path"]))
    for model in chain:
        assert_loads_and_generates(model["merged_path"] or model["path"])

    # Every job records tokens/s, peak memory and MFU, on its model too.
    for model in chain:
        assert model["metrics"]["tokens_per_second"] > 0 and model["metrics"]["peak_memory_bytes"] > 0
        assert 0 < model["metrics"]["mfu"] < 1


@pytest.mark.slow
def test_continued_pretraining_reports_the_new_domain_and_forgetting(service: ServiceContext, tmp_path: Path) -> None:
    gridbook = tmp_path / "gridbook.txt"
    gridbook.write_text((CORPUS / "procedures.txt").read_text(encoding="utf-8"), encoding="utf-8")
    tickets = tmp_path / "tickets.txt"
    tickets.write_text((CORPUS / "tickets.txt").read_text(encoding="utf-8"), encoding="utf-8")
    quick = {"per_device_batch_size": 4, "max_seq_length": 64, "learning_rate": 3e-3}

    async def main() -> dict[str, Any]:
        async with Client(build_mcp_server(ServiceRef(service), toolsets=("all",))) as client:
            text = (await call(client, "upload_dataset", path=str(gridbook)))["dataset"]["id"]
            new = (await call(client, "upload_dataset", path=str(tickets)))["dataset"]["id"]
            base = (await call(client, "launch_training", method="pretrain", datasets=[text], adapter="full",
                               options={"preset": "tiny", "vocab_size": 768},
                               hyperparameters={**quick, "max_steps": 20}))["job"]
            base = await wait_final(client, base["id"])
            assert base["state"] == "succeeded", base["error"]
            job = (await call(client, "launch_training", method="continued_pretrain", base_model=base["model_id"],
                              datasets=[new], adapter="full", hyperparameters={**quick, "max_steps": 20}))["job"]
            return await wait_final(client, job["id"])

    job = anyio.run(main)
    assert job["state"] == "succeeded", job["error"]
    metrics = job["metrics"]
    assert metrics["new_domain_after_perplexity"] < metrics["new_domain_before_perplexity"]
    # Forgetting is measured on the base model's own held-out slice of the Gridbook.
    assert metrics["base_domain_before_tokens"] > 0 and metrics["forgetting_perplexity_ratio"] > 0


def test_a_reward_function_that_raises_fails_the_job_naming_it(service: ServiceContext, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in CHAT_FACTS * 4])
    broken = "def picky(prompts, completions, **columns):\n    raise ValueError('no completion is good enough')\n"

    async def main() -> dict[str, Any]:
        async with Client(build_mcp_server(ServiceRef(service), toolsets=("all",))) as client:
            ds = (await call(client, "upload_dataset", path=str(prompts)))["dataset"]["id"]
            job = (await call(client, "launch_training", method="grpo", base_model=str(service.settings.data_roots[1]
                                                                                       / "tiny"),
                              datasets=[ds], adapter="full",
                              options={"rewards": [{"type": "regex", "pattern": "\\d"},
                                                   {"type": "python", "source": broken, "function": "picky"}],
                                       "max_completion_length": 8},
                              hyperparameters={"max_steps": 3, "per_device_batch_size": 4, "max_seq_length": 64}))
            return await wait_final(client, job["job"]["id"])

    job = anyio.run(main)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "reward_error" and "'picky'" in job["error"]["message"]
    assert "no completion is good enough" in job["error"]["message"]


@pytest.mark.parametrize(("request_", "param", "says"), [
    ({"method": "grpo", "options": {"rewards": [{"type": "regex", "pattern": "(unclosed"}]}},
     "options.rewards", "invalid regular expression"),
    ({"method": "grpo", "options": {"rewards": [{"type": "python", "source": "def f(:", "function": "f"}]}},
     "options.rewards", "does not compile"),
    ({"method": "grpo", "options": {"rewards": [{"type": "contains", "value": "x"}], "num_generations": 3}},
     "hyperparameters.per_device_batch_size", "multiple of options.num_generations"),
    ({"method": "dpo", "options": {"beta": -1}}, "options.beta", "must be > 0"),
    ({"method": "sft", "dataset": "prompts"}, "datasets[0]", "sft trains on"),
    ({"method": "pretrain", "options": {"preset": "huge"}}, "options.preset", "tiny"),
    ({"method": "pretrain", "base_model": "tiny", "dataset": "text"}, "base_model", "continued_pretrain"),
    ({"method": "dpo", "base_model": None, "dataset": "pairs"}, "base_model", "needs a base_model"),
])
def test_bad_requests_are_refused_naming_the_field_and_start_nothing(
        service: ServiceContext, tmp_path: Path, request_: dict[str, Any], param: str, says: str) -> None:
    files = {"prompts": write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say a number"}] * 8),
             "pairs": write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 8),
             "text": write_jsonl(tmp_path / "t.jsonl", [{"text": "Some text."}] * 8)}
    request = dict(request_)
    dataset = request.pop("dataset", {"grpo": "prompts", "dpo": "pairs", "pretrain": "text"}.get(request["method"]))
    base = request.pop("base_model", "tiny")

    async def main() -> None:
        async with Client(build_mcp_server(ServiceRef(service), toolsets=("all",))) as client:
            ds = (await call(client, "upload_dataset", path=str(files[dataset])))["dataset"]["id"]
            arguments = {**request, "datasets": [ds], "hyperparameters": {"per_device_batch_size": 4}}
            if base is not None and request["method"] != "pretrain" or request_.get("base_model"):
                arguments["base_model"] = str(service.settings.data_roots[1] / base)
            result = await client.call_tool("launch_training", arguments)
            assert result.is_error, result.structured_content
            assert param in result.content[0].text and says in result.content[0].text, result.content[0].text
            assert (await call(client, "list_jobs"))["jobs"] == []

    anyio.run(main)


@pytest.mark.slow
def test_a_two_process_job_trains_as_one_data_parallel_job(service: ServiceContext, tmp_path: Path) -> None:
    corpus = tmp_path / "gridbook.txt"
    corpus.write_text((CORPUS / "procedures.txt").read_text(encoding="utf-8"), encoding="utf-8")

    async def main() -> dict[str, Any]:
        async with Client(build_mcp_server(ServiceRef(service), toolsets=("all",))) as client:
            ds = (await call(client, "upload_dataset", path=str(corpus)))["dataset"]["id"]
            job = (await call(client, "launch_training", method="pretrain", datasets=[ds], adapter="full", devices=2,
                              options={"preset": "tiny", "vocab_size": 768},
                              hyperparameters={"max_steps": 6, "per_device_batch_size": 4, "max_seq_length": 64,
                                               "save_steps": 3}))["job"]
            return await wait_final(client, job["id"])

    job = anyio.run(main)
    assert job["state"] == "succeeded", job["error"]
    assert job["metrics"]["devices"] == 2
    # Two processes of 4 blocks of 64 tokens a step, counted together: the job trained on both shards,
    # exactly the tokens its estimate priced (6 x parameters x 2 x 4 x 64 x 6 steps).
    assert job["flops_used"] == pytest.approx(job["estimate_flops"])


def test_explicit_auto_hyperparameters_are_resolved(service: ServiceContext, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))

    async def main() -> dict[str, Any]:
        async with Client(build_mcp_server(ServiceRef(service), toolsets=("all",))) as client:
            ds = (await call(client, "upload_dataset", path=str(data)))["dataset"]["id"]
            return await call(client, "launch_training", base_model=str(service.settings.data_roots[1] / "tiny"),
                              datasets=[ds], dry_run=True, hyperparameters={
                                  "learning_rate": "auto", "max_steps": "auto", "per_device_batch_size": "auto",
                                  "max_seq_length": "auto", "save_steps": "auto"})

    priced = anyio.run(main)
    assert priced["admitted"] and priced["estimate"]["max_steps"] >= 1
