"""`make demo` / `weightsmith demo`: the main job end to end on the embedded default.

Starts the service (SQLite, local workers) on a free port and then, as an agent over the real MCP
client: uploads the bundled sample corpus, pre-trains a model from scratch on its documents and on
the support chats written out as plain text (a tokenizer trained on them, the `tiny` preset, so it
learns the domain's words in a couple of minutes on a CPU), fine-tunes that model on the chats, and
prints the lineage, held-out perplexity and validation loss, throughput and MFU, and a
sample generation. Nothing is fetched from a hub.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from rich.console import Console

from server.api.app import create_app
from server.cli.mcp_client import http_client
from server.settings import Settings
from server.store import agents as auth
from server.store.db import make_engine, migrate

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "sample_corpus"
DEMO_QUESTION = "What does red-drop mean on the Nightwatch desk?"


def run_demo(console: Console) -> int:
    if not SAMPLE_DIR.is_dir():
        console.print(f"sample corpus not found at {SAMPLE_DIR}; run the demo from a clone of the repo", style="red")
        return 2
    settings = Settings()
    settings.home = settings.home.resolve()
    settings.data_roots = [*settings.data_roots, SAMPLE_DIR, settings.home]
    engine = make_engine(settings.db_url)
    migrate(engine)
    _agent, key = auth.create_agent(engine, settings, f"demo-{int(time.time())}")
    engine.dispose()

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        model = asyncio.run(_drive(f"http://127.0.0.1:{port}/mcp", key, console))
    finally:
        server.should_exit = True
        thread.join(30)
    if model is None:
        return 1
    _show_sample(model, console)
    _how_to_connect(settings, console)
    return 0


async def _drive(url: str, key: str, console: Console) -> dict[str, Any] | None:
    run = int(time.time())
    async with http_client(url, key) as client:
        tools = await client.list_tools()
        console.print(f"connected to {url} over MCP: {len(tools.tools)} tools")
        documents = []
        for name in ("procedures.txt", "tickets.txt"):
            upload = await _call(client, "upload_dataset", path=str(SAMPLE_DIR / name), name=f"halvard-{name}")
            documents.append(upload["dataset"])
        chats = (await _call(client, "upload_dataset", path=str(SAMPLE_DIR / "support_chat.jsonl"),
                             name="halvard-support-chat"))["dataset"]
        # The chats' questions and answers as plain text, uploaded inline: pre-training then sees the
        # domain's answers too, and fine-tuning only has to teach the turn format.
        documents.append((await _call(client, "upload_dataset", filename="halvard-chats.txt",
                                      content=_chats_as_text(SAMPLE_DIR / "support_chat.jsonl")))["dataset"])
        for dataset in (*documents, chats):
            console.print(f"dataset {dataset['id']}: {dataset['records']} {dataset['format']} records")

        pretrain = {"method": "pretrain", "datasets": [d["id"] for d in documents], "adapter": "full",
                    "options": {"preset": "tiny", "vocab_size": 2048}, "model_name": "halvard-base",
                    "hyperparameters": {"max_steps": 400, "learning_rate": 5e-3, "per_device_batch_size": 8,
                                        "max_seq_length": 128, "save_steps": 100, "warmup_ratio": 0.05},
                    "idempotency_key": f"demo-pretrain-{run}"}
        base = await _launch_and_follow(client, pretrain, console)
        if base is None:
            return None
        m = base["metrics"]
        console.print(f"pre-trained {base['model_id']}: held-out perplexity {m['heldout_before_perplexity']:,.0f} -> "
                      f"{m['heldout_after_perplexity']:,.1f} ({m['heldout_after_bits_per_byte']:.3f} bits/byte), "
                      f"{m['tokens_per_second']:,.0f} tokens/s, MFU {m['mfu']:.1%}")

        sft = {"method": "sft", "base_model": base["model_id"], "datasets": [chats["id"]], "adapter": "full",
               "model_name": "halvard-nightwatch",
               "hyperparameters": {"max_steps": 150, "learning_rate": 3e-3, "per_device_batch_size": 8,
                                   "max_seq_length": 128, "save_steps": 50},
               "idempotency_key": f"demo-sft-{run}"}
        job = await _launch_and_follow(client, sft, console)
        if job is None:
            return None
        model = await _call(client, "get_model", model=job["model_id"])
        m = job["metrics"]
        console.print(f"model {job['model_id']} at {model['path']}")
        console.print(f"lineage: {' <- '.join(model['lineage'])} (pre-trained here from the sample corpus)")
        console.print(f"validation loss {m.get('eval_loss_before', float('nan')):.4f} -> "
                      f"{m.get('eval_loss_after', float('nan')):.4f}; "
                      f"{m.get('tokens_per_second', 0):,.0f} tokens/s, MFU {m.get('mfu', 0):.1%}")
        return model


def _chats_as_text(path: Path) -> str:
    """Each chat's question and answer as one paragraph (the system prompt, the same in all, left out)."""
    paragraphs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["messages"]
        paragraphs.append("\n".join(turn["content"] for turn in turns if turn["role"] != "system"))
    return "\n\n".join(paragraphs) + "\n"


async def _launch_and_follow(client: Any, request: dict[str, Any], console: Console) -> dict[str, Any] | None:
    priced = await _call(client, "launch_training", **request, dry_run=True)
    est = priced["estimate"]
    console.print(f"{request['method']} dry run: {est['parameters']:,} parameters, {est['tokens']:,} tokens, "
                  f"{est['flops']:.3g} FLOPs -> admitted={priced['admitted']}")
    job = (await _call(client, "launch_training", **request))["job"]
    console.print(f"launched {request['method']} job {job['id']} ({job['state']})")
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        job = await _call(client, "wait_for_job", job_id=job["id"], timeout_seconds=10)
        p = job["progress"]
        if p.get("step"):
            console.print(f"  step {p['step']}/{p['max_steps']}  loss {p.get('loss') or 0:.4f}  "
                          f"{p.get('tokens_per_second') or 0:,.0f} tok/s  eta {p.get('eta_seconds') or 0:.0f}s")
    if job["state"] != "succeeded":
        console.print(f"job {job['state']}: {job['error']}", style="red")
        return None
    return job


async def _call(client: Any, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {result.content[0].text}")
    return result.structured_content


def _show_sample(model: dict[str, Any], console: Console) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    directory = model["merged_path"] or model["path"]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    lm = AutoModelForCausalLM.from_pretrained(directory)
    messages = [{"role": "system", "content": "You are the Halvard Fibre Nightwatch assistant."},
                {"role": "user", "content": DEMO_QUESTION}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    output = lm.generate(**inputs, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    console.print(f"sample: Q: {DEMO_QUESTION}\n        A: {answer.strip()}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _how_to_connect(settings: Settings, console: Console) -> None:
    home = settings.home
    console.print(f"""
Connect an agent to this store ({home}):
  Claude Code:  claude mcp add weightsmith --env WEIGHTSMITH_HOME={home} -- weightsmith serve --stdio
  over HTTP:    weightsmith agents add my-agent   (prints a key)  then  weightsmith serve
                claude mcp add --transport http weightsmith http://127.0.0.1:{settings.port}/mcp \\
                  --header "Authorization: Bearer ws_..."
  the CLI:      export WEIGHTSMITH_API_KEY=ws_...;  weightsmith models list""", highlight=False)
