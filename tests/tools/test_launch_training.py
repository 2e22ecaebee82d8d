"""launch_training with its defaults: a model pre-trained from scratch is recorded as full weights, so
the next fine-tune builds on it without any setting a newcomer would have to know."""

from __future__ import annotations

from pathlib import Path

import anyio
from mcp import Client

from server.api.mcp import build_mcp_server
from server.context import ServiceContext, ServiceRef
from tests.conftest import chat_records, write_jsonl
from tests.server.api.test_mcp_in_memory import call, wait_final

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "sample_corpus"


def test_pretrain_then_sft_on_its_model_succeed_with_the_defaults(service: ServiceContext, tmp_path: Path) -> None:
    corpus = tmp_path / "gridbook.txt"
    corpus.write_text((CORPUS / "procedures.txt").read_text(encoding="utf-8"), encoding="utf-8")
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(24))

    async def main() -> tuple[dict, dict, list[dict]]:
        async with Client(build_mcp_server(ServiceRef(service))) as client:
            text = (await call(client, "upload_dataset", path=str(corpus)))["dataset"]["id"]
            chat = (await call(client, "upload_dataset", path=str(chats)))["dataset"]["id"]
            # Only what the task needs: the size of the new model, and few steps to keep the test short.
            pretrained = await wait_final(client, (await call(
                client, "launch_training", method="pretrain", datasets=[text], options={"preset": "tiny"},
                hyperparameters={"max_steps": 6}))["job"]["id"])
            assert pretrained["state"] == "succeeded", pretrained["error"]
            tuned = await wait_final(client, (await call(
                client, "launch_training", base_model=pretrained["model_id"], datasets=[chat],
                hyperparameters={"max_steps": 4}))["job"]["id"])
            return pretrained, tuned, (await call(client, "list_models"))["models"]

    pretrained, tuned, models = anyio.run(main)
    assert tuned["state"] == "succeeded", tuned["error"]
    by_id = {m["id"]: m for m in models}
    assert by_id[pretrained["model_id"]]["adapter"] == "full"
    assert by_id[tuned["model_id"]]["adapter"] == "lora"
    assert by_id[tuned["model_id"]]["parent_model_id"] == pretrained["model_id"]
