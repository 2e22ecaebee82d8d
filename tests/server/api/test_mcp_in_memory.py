"""The whole spine through the real MCP client, connected in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from safetensors.torch import load_file

from server.api.mcp import build_mcp_server
from server.context import ServiceContext, ServiceRef
from server.store import agents as auth
from tests.conftest import chat_records, quick_hyperparameters, write_jsonl


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def wait_final(client: Client, job_id: str) -> dict[str, Any]:
    with anyio.fail_after(300):
        while True:
            job = await call(client, "wait_for_job", job_id=job_id, timeout_seconds=20)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job



def test_agent_uploads_launches_lora_sft_follows_it_and_gets_a_model_that_generates(
        service: ServiceContext, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(48))
    progress: list[float] = []

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Client(build_mcp_server(ServiceRef(service), toolsets=("all",))) as client:
            upload = await call(client, "upload_dataset", path=str(data))
            assert upload["ok"] and upload["dataset"]["format"] == "messages"
            launched = await call(client, "launch_training", base_model=str(service.settings.data_roots[1] / "tiny"),
                                  datasets=[upload["dataset"]["id"]], adapter="lora", merge_adapter=True,
                                  hyperparameters=quick_hyperparameters(max_steps=12))
            job = launched["job"]
            assert job["state"] in ("queued", "running")
            assert job["hyperparameters"]["max_steps"] == 12

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append(value)

            with anyio.fail_after(300):
                while job["state"] not in ("succeeded", "failed", "cancelled"):
                    result = await client.call_tool("wait_for_job", {"job_id": job["id"], "timeout_seconds": 20},
                                                    progress_callback=on_progress)
                    job = result.structured_content
            assert job["state"] == "succeeded", job["error"]
            models = await call(client, "list_models")
            resource = await client.read_resource(f"weightsmith://jobs/{job['id']}")
            assert json.loads(resource.contents[0].text)["state"] == "succeeded"
            history = await call(client, "get_metric_history", job_id=job["id"], metric="loss")
            assert len(history["values"]) >= 5 and history["checkpoints"]
            detail = await call(client, "get_model", model=models["models"][0]["id"])
            return job, {**models["models"][0], "path": detail["path"], "merged_path": detail["merged_path"]}

    job, model = anyio.run(main)
    assert progress, "wait_for_job sent no progress notifications"
    metrics = job["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert model["id"] == job["model_id"] and model["adapter"] == "lora"
    assert model["dataset_hashes"] and model["job_id"] == job["id"]
    lineage = json.loads(Path(model["path"], "lineage.json").read_text(encoding="utf-8"))
    assert lineage["dataset_hashes"] == model["dataset_hashes"]
    assert load_file(str(Path(model["path"]) / "adapter_model.safetensors"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model["merged_path"])
    lm = AutoModelForCausalLM.from_pretrained(model["merged_path"])
    inputs = tokenizer("What is a red-drop?", return_tensors="pt")
    output = lm.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_retry_with_same_key_returns_same_job_and_a_changed_request_is_refused(
        settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from server.service import open_service

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))

    async def main(ctx: ServiceContext) -> None:
        async with Client(build_mcp_server(ServiceRef(ctx), toolsets=("all",))) as client:
            ds = (await call(client, "upload_dataset", path=str(data)))["dataset"]["id"]
            request = {"base_model": str(settings.data_roots[1] / "tiny"), "datasets": [ds],
                       "hyperparameters": quick_hyperparameters(), "idempotency_key": "nightly-1"}
            first = await call(client, "launch_training", **request)
            second = await call(client, "launch_training", **request)
            assert first["job"]["id"] == second["job"]["id"]
            changed = await client.call_tool("launch_training", {**request, "adapter": "full"})
            assert changed.is_error and "idempotency_key" in changed.content[0].text
            listed = await call(client, "list_jobs")
            assert len(listed["jobs"]) == 1

    with open_service(settings, workers=False) as ctx:
        anyio.run(main, ctx)


def test_agent_cannot_see_cancel_or_train_on_another_agents_objects(service: ServiceContext, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    _, key_a = auth.create_agent(service.engine, service.settings, "agent-a")
    _, key_b = auth.create_agent(service.engine, service.settings, "agent-b")

    async def main() -> None:
        ref = ServiceRef(service)
        every = ("all",)
        async with Client(build_mcp_server(ref, key_a, toolsets=every)) as a, \
                Client(build_mcp_server(ref, key_b, toolsets=every)) as b:
            ds = (await call(a, "upload_dataset", path=str(data)))["dataset"]["id"]
            job = (await call(a, "launch_training", base_model=str(service.settings.data_roots[1] / "tiny"),
                              datasets=[ds], merge_adapter=True, hyperparameters=quick_hyperparameters()))["job"]
            job = await wait_final(a, job["id"])
            assert job["state"] == "succeeded", job["error"]
            for tool, args in (("get_job", {"job_id": job["id"]}), ("cancel_job", {"job_id": job["id"]}),
                               ("get_job_events", {"job_id": job["id"]}), ("validate_dataset", {"dataset_id": ds}),
                               ("launch_training", {"base_model": job["model_id"], "datasets": [ds]})):
                result = await b.call_tool(tool, args)
                assert result.is_error and "not_found" in result.content[0].text, (tool, result.content)
            # B's own dataset still cannot be trained on A's model.
            own = (await call(b, "upload_dataset", filename="b.jsonl",
                              content=data.read_text(encoding="utf-8")))["dataset"]["id"]
            result = await b.call_tool("launch_training", {"base_model": job["model_id"], "datasets": [own]})
            assert result.is_error and "not_found" in result.content[0].text
            assert (await call(b, "list_jobs"))["jobs"] == []
            assert (await call(b, "list_models"))["models"] == []
            assert [d["id"] for d in (await call(b, "list_datasets"))["datasets"]] == [own]

    anyio.run(main)
