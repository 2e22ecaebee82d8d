"""generate_synthetic_data end to end: the real MCP client, database, child processes and HTTP server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import anyio
import httpx
import pytest
from mcp import Client
from sqlmodel import Session, select

from server.api.mcp import build_mcp_server
from server.context import ServiceContext, ServiceRef
from server.service import open_service
from server.settings import Settings, SynthEndpoint
from server.store import agents as auth
from server.store.tables import Dataset, Job
from tests.conftest import quick_hyperparameters, write_jsonl
from tests.server.api.test_mcp_in_memory import call, wait_final
from training_core.synthetic import read_source

TEMPLATES = [
    {"prompt": "How do I {verb} the {thing}?",
     "completion": "To {verb} the {thing}, open the {place} entry for it and follow the {thing} checklist "
                   "step by step."},
    {"messages": [{"role": "user", "content": "Where is the {thing} for ticket {ticket}?"},
                  {"role": "assistant", "content": "The {thing} for ticket {ticket} is listed in the {place}."}]},
]
SLOTS = {"verb": ["reset", "inspect", "replace", "label", "test"],
         "thing": ["ONT", "splice cabinet", "router", "drop cable", "patch panel"],
         "place": ["Gridbook", "field portal", "cabinet register"], "ticket": ["T7", "T19", "T23", "T42"]}


def _template_request(**overrides: Any) -> dict[str, Any]:
    return {"task": "instructions", "num_records": 30, "seed": 7,
            "generator": {"type": "template", "templates": TEMPLATES, "slots": SLOTS},
            "filters": {"diversity_rouge_l": None}, **overrides}


def _dataset(service: ServiceContext, dataset_id: str) -> Dataset:
    with Session(service.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        assert dataset is not None
        return dataset


@pytest.mark.slow  # four jobs, one of them training: 30-40 s on two busy cores
def test_template_synth_registers_a_deduplicated_decontaminated_dataset_that_repeats_and_trains(
        service: ServiceContext, tmp_path: Path) -> None:
    async def main() -> tuple[dict[str, Any], ...]:
        async with Client(build_mcp_server(ServiceRef(service))) as client:
            priced = await call(client, "generate_synthetic_data", **_template_request(), dry_run=True)
            assert priced["admitted"] and priced["estimate_flops"] == 0 and priced["job"] is None
            plain = await call(client, "generate_synthetic_data", **_template_request())
            plain = await wait_final(client, plain["job"]["id"])
            assert plain["state"] == "succeeded", plain["error"]
            # Plant one of the records it made as an eval item, and generate again against it.
            made = Path(_dataset(service, plain["metrics"]["dataset_id"]).path).read_text(encoding="utf-8")
            planted = json.loads(made.splitlines()[5])["messages"][-1]["content"]
            evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Eval item", "completion": planted}])
            eval_id = (await call(client, "upload_dataset", path=str(evals)))["dataset"]["id"]
            request = _template_request(dataset_name="field-howtos", decontaminate_against=[eval_id])
            first = await wait_final(client, (await call(client, "generate_synthetic_data", **request))["job"]["id"])
            again = await wait_final(client, (await call(client, "generate_synthetic_data", **request))["job"]["id"])
            assert first["state"] == again["state"] == "succeeded", first["error"]
            trained = await call(client, "launch_training", base_model=str(service.settings.data_roots[1] / "tiny"),
                                 datasets=[first["metrics"]["dataset_id"]], adapter="full",
                                 hyperparameters=quick_hyperparameters(max_steps=4))
            trained = await wait_final(client, trained["job"]["id"])
            return plain, first, again, trained, planted

    plain, first, again, trained, planted = anyio.run(main)
    metrics = first["metrics"]
    assert metrics["records"] == 30 and not metrics["partial"]
    assert metrics["dropped_exact_duplicate"] > 0 and metrics["dropped_decontamination"] >= 1
    assert plain["metrics"]["dropped_decontamination"] == 0
    assert again["metrics"]["dataset_hash"] == metrics["dataset_hash"] != plain["metrics"]["dataset_hash"]
    dataset = _dataset(service, metrics["dataset_id"])
    assert dataset.name == "field-howtos" and dataset.format == "messages" and dataset.records == 30
    records = [json.loads(line) for line in Path(dataset.path).read_text(encoding="utf-8").splitlines()]
    assert all(planted not in json.dumps(r) for r in records)
    assert {r["metadata"]["task"] for r in records} == {"instructions"} and records[0]["metadata"]["seed"] == 7
    assert dataset.lineage is not None
    assert dataset.lineage["job_id"] == first["id"] and dataset.lineage["seed"] == 7
    assert dataset.lineage["templates"] == TEMPLATES and dataset.lineage["generator"]["type"] == "template"
    assert dataset.lineage["decontaminated_against"][0]["content_hash"]
    assert trained["state"] == "succeeded", trained["error"]
    assert trained["metrics"]["train_loss"] > 0


SCORE_ROUTER_ONLY = "def score(records):\n    return [1.0 if 'router' in r['prompt'] else 0.0 for r in records]\n"


def test_traces_follow_the_tool_schemas_preferences_record_their_making_and_a_sandboxed_score_filters(
        service: ServiceContext) -> None:
    tools = [{"name": "lookup_ticket", "description": "A ticket's state",
              "parameters": {"type": "object", "required": ["ticket_id"], "additionalProperties": False,
                             "properties": {"ticket_id": {"type": "string", "pattern": "^T[0-9]+$"}}}}]

    def trace(tool: str, ticket: str) -> dict[str, Any]:
        return {"messages": [
            {"role": "user", "content": "What is the state of {ticket} for the {thing}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": tool, "arguments": {"ticket_id": ticket}}}]},
            {"role": "tool", "name": tool, "content": '{"state": "{state}"}'},
            {"role": "assistant", "content": "Ticket {ticket} is {state}."}]}

    good, unknown_tool, bad_argument = trace("lookup_ticket", "{ticket}"), trace("close_ticket", "{ticket}"), \
        trace("lookup_ticket", "ticket {ticket}")
    slots = {"ticket": SLOTS["ticket"], "thing": SLOTS["thing"], "state": ["PARKED", "OPEN", "DONE"]}

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Client(build_mcp_server(ServiceRef(service))) as client:
            traces = await call(client, "generate_synthetic_data", task="workflow_traces", num_records=12, seed=1,
                                generator={"type": "template", "templates": [good, unknown_tool, bad_argument],
                                           "slots": slots},
                                options={"tools": tools}, filters={"diversity_rouge_l": None})
            prefs = await call(client, "generate_synthetic_data", task="preferences", num_records=8, seed=1,
                               generator={"type": "template", "templates": [{
                                   "prompt": "How do I {verb} the {thing}?",
                                   "chosen": "Open the {place}. Find the {thing}. Then {verb} it and note it."}],
                                   "slots": SLOTS},
                               filters={"diversity_rouge_l": None, "near_duplicate": None})
            prompts = await call(client, "generate_synthetic_data", task="prompts", num_records=6, seed=3,
                                 generator={"type": "template",
                                            "templates": [{"prompt": "Plan how to {verb} the {thing}."}],
                                            "slots": SLOTS},
                                 filters={"diversity_rouge_l": None, "near_duplicate": None, "score": {
                                     "python": SCORE_ROUTER_ONLY, "threshold": 0.5}})
            return (await wait_final(client, traces["job"]["id"]), await wait_final(client, prefs["job"]["id"]),
                    await wait_final(client, prompts["job"]["id"]))

    traces, prefs, prompts = anyio.run(main)
    assert traces["state"] == "succeeded", traces["error"]
    assert traces["metrics"]["dropped_schema"] > 0
    dataset = _dataset(service, traces["metrics"]["dataset_id"])
    assert dataset.valid and dataset.format == "messages", dataset.report["problems"]
    for line in Path(dataset.path).read_text(encoding="utf-8").splitlines():
        call_ = json.loads(line)["messages"][1]["tool_calls"][0]["function"]
        assert call_["name"] == "lookup_ticket" and json.loads(call_["arguments"])["ticket_id"].startswith("T")
    assert prefs["state"] == "succeeded", prefs["error"]
    preferences = _dataset(service, prefs["metrics"]["dataset_id"])
    assert preferences.valid and preferences.format == "preference", preferences.report["problems"]
    rows = [json.loads(line) for line in Path(preferences.path).read_text(encoding="utf-8").splitlines()]
    assert rows and all(set(r) == {"prompt", "chosen", "rejected", "metadata"} for r in rows)
    assert all(r["chosen"] != r["rejected"] and r["metadata"]["rejected_from"].startswith("corruption:") for r in rows)
    assert prompts["state"] == "succeeded", prompts["error"]
    assert prompts["metrics"]["dropped_score"] > 0
    prompt_set = _dataset(service, prompts["metrics"]["dataset_id"])
    assert prompt_set.valid and prompt_set.format == "prompt_only", prompt_set.report["problems"]
    rows = [json.loads(line) for line in Path(prompt_set.path).read_text(encoding="utf-8").splitlines()]
    assert rows and all(set(r) == {"prompt", "metadata"} and "router" in r["prompt"] for r in rows)
    assert all(r["metadata"]["scores"] == {"score": 1.0} for r in rows)


@pytest.mark.slow  # trains the model it then generates with: about a minute on two busy cores
def test_model_generator_with_a_registered_model_is_priced_charged_and_greedy_repeats(
        service: ServiceContext, tmp_path: Path) -> None:
    seeds = [{"prompt": q, "completion": a} for q, a in (
        ("What is a red-drop?", "A customer under -27 dBm."), ("Who handles T2 tickets?", "The field team."),
        ("What does PARKED mean?", "The ticket waits on the customer."))]
    data = write_jsonl(tmp_path / "seed.jsonl", [{"messages": [{"role": "user", "content": s["prompt"]},
                                                               {"role": "assistant", "content": s["completion"]}]}
                                                 for s in seeds] * 8)

    async def main() -> tuple[dict[str, Any], dict[str, Any], str]:
        async with Client(build_mcp_server(ServiceRef(service))) as client:
            ds = (await call(client, "upload_dataset", path=str(data)))["dataset"]["id"]
            trained = await call(client, "launch_training", base_model=str(service.settings.data_roots[1] / "tiny"),
                                 datasets=[ds], adapter="full", hyperparameters=quick_hyperparameters(max_steps=4))
            model_id = (await wait_final(client, trained["job"]["id"]))["model_id"]
            request = {"task": "instructions", "num_records": 4, "seed_examples": seeds, "sources": [ds],
                       "generator": {"type": "model", "model": model_id, "max_new_tokens": 12, "batch_size": 4},
                       "options": {"output_format": "prompt_completion"},
                       "filters": {"near_duplicate": None, "diversity_rouge_l": None}}
            first = await call(client, "generate_synthetic_data", **request)
            assert first["estimate_tokens"] > 0 and first["estimate_flops"] > 0
            first = await wait_final(client, first["job"]["id"])
            second = await wait_final(client, (await call(client, "generate_synthetic_data", **request))["job"]["id"])
            return first, second, model_id

    first, second, model_id = anyio.run(main)
    assert first["state"] == "succeeded", first["error"]
    assert first["metrics"]["tokens_generated"] > 0 and first["flops_used"] > 0
    assert first["flops_used"] <= first["estimate_flops"]
    assert second["metrics"]["dataset_hash"] == first["metrics"]["dataset_hash"]
    dataset = _dataset(service, first["metrics"]["dataset_id"])
    assert dataset.lineage is not None and dataset.lineage["generator"]["describe"] == f"model:{model_id}"
    assert dataset.lineage["prompts"]["new_task"].startswith("Here are examples")
    assert dataset.lineage["sources"][0]["content_hash"]


# ---- an OpenAI-compatible endpoint on loopback ---------------------------------------------------

SECRET = "sk-test-5f3a9c-never-stored"


class _ChatCompletions(BaseHTTPRequestHandler):
    """/v1/chat/completions: a 429, then a 500, then answers; records what it was sent."""

    seen: ClassVar[list[dict[str, Any]]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.lock:
            number = len(self.seen)
            self.seen.append({"path": self.path, "authorization": self.headers.get("authorization"), "body": body})
        if number == 0:
            return self._answer(429, {"error": "slow down"}, {"Retry-After": "0"})
        if number == 1:
            return self._answer(500, {"error": "overloaded"})
        prompt = body["messages"][-1]["content"]
        if "Write one new request" in prompt:
            text = f"How do I close out ticket T{number} after the walk-out?"
        else:
            text = f"Mark {prompt.split()[-3]} done in the field portal, then attach the light reading ({number})."
        self._answer(200, {"choices": [{"message": {"role": "assistant", "content": text}}],
                           "usage": {"completion_tokens": len(text.split())}})

    def _answer(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint_server() -> Iterator[str]:
    _ChatCompletions.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_compatible_endpoint_is_retried_through_429_and_500_and_its_key_is_never_stored(
        settings: Settings, endpoint_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_TEST_KEY", SECRET)
    configured = settings.model_copy(update={"synth_endpoints": {"loopback": SynthEndpoint(
        base_url=endpoint_server, model="company-llm", api_key_env="SYNTH_TEST_KEY", max_concurrency=2,
        requests_per_second=100)}})
    seeds = [{"prompt": "How do I reseat an ONT?", "completion": "Unplug it, wait ten seconds, plug it back."}]

    async def main(service: ServiceContext) -> dict[str, Any]:
        async with Client(build_mcp_server(ServiceRef(service))) as client:
            refused = await client.call_tool("generate_synthetic_data", {
                "task": "instructions", "num_records": 3, "seed_examples": seeds,
                "generator": {"type": "openai_compatible", "endpoint": "api.openai.com"}})
            text = refused.content[0].text
            assert refused.is_error and "generator.endpoint" in text and "loopback" in text
            assert (await call(client, "list_jobs"))["jobs"] == []
            job = await call(client, "generate_synthetic_data", task="instructions", num_records=3,
                             seed_examples=seeds, generator={"type": "openai_compatible", "endpoint": "loopback"},
                             filters={"near_duplicate": None, "diversity_rouge_l": None})
            return await wait_final(client, job["job"]["id"])

    with open_service(configured) as service:
        job = anyio.run(main, service)
        assert job["state"] == "succeeded", job["error"]
        assert job["metrics"]["endpoint_retries"] >= 2 and job["metrics"]["records"] == 3
        dataset = _dataset(service, job["metrics"]["dataset_id"])
        assert dataset.valid and dataset.lineage["generator"]["describe"] == "openai_compatible:loopback:company-llm"
        with Session(service.engine) as session:
            stored = session.exec(select(Job).where(Job.id == job["id"])).one()
            assert SECRET not in json.dumps([stored.request, stored.resolved, stored.metrics])
    seen = _ChatCompletions.seen
    assert len(seen) >= 2 + 6 and {s["path"] for s in seen} == {"/v1/chat/completions"}
    assert {s["authorization"] for s in seen} == {f"Bearer {SECRET}"}
    assert {s["body"]["model"] for s in seen} == {"company-llm"}
    leaked = [p for p in configured.home.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == [], f"the key was written to {leaked}"


def test_qa_from_documents_keeps_the_chunk_each_pair_came_from(service: ServiceContext) -> None:
    corpus = Path(__file__).resolve().parents[3] / "examples" / "sample_corpus" / "procedures.txt"

    async def main() -> dict[str, Any]:
        async with Client(build_mcp_server(ServiceRef(service))) as client:
            docs = await call(client, "upload_dataset", filename="procedures.txt",
                              content=corpus.read_text(encoding="utf-8"))
            job = await call(client, "generate_synthetic_data", task="qa_from_documents", num_records=8,
                             sources=[docs["dataset"]["id"]], seed=2,
                             generator={"type": "template", "templates": [
                                 {"question": "What does the Gridbook say right after this: {sentence}",
                                  "answer": "It says: {sentence}"}]},
                             options={"chunk_chars": 400, "output_format": "prompt_completion"})
            return await wait_final(client, job["job"]["id"])

    job = anyio.run(main)
    assert job["state"] == "succeeded", job["error"]
    # Diversity is off for templates unless asked for: these records share most of their words.
    assert job["metrics"]["records"] == 8 and job["metrics"]["dropped_diversity"] == 0
    dataset = _dataset(service, job["metrics"]["dataset_id"])
    assert dataset.valid and dataset.format == "prompt_completion"
    assert dataset.lineage["filters"]["diversity_rouge_l"] is None
    text = corpus.read_text(encoding="utf-8")
    source = dataset.lineage["sources"][0]
    document, _ = read_source(Path(_dataset(service, source["dataset_id"]).path), "qa_from_documents")
    for line in Path(dataset.path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        # The chunk by reference (offsets into the source's text, and its hash), not a copy of it.
        chunk = record["metadata"]["source_chunk"]
        assert "text" not in chunk and chunk["dataset_hash"] == source["content_hash"]
        piece = document[chunk["start"]:chunk["end"]]
        assert len(piece) <= 400 and hashlib.sha256(piece.encode("utf-8")).hexdigest() == chunk["sha256"]
        sentence = record["completion"].removeprefix("It says: ")
        assert sentence in piece and " ".join(sentence.split()) in " ".join(text.split())


def test_rest_and_cli_start_synth_jobs_and_refuse_bad_requests_with_the_field(
        http_service: tuple[str, str, str], tmp_path: Path) -> None:
    base, key, _ = http_service
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=70)
    body = _template_request(num_records=10, filters={"diversity_rouge_l": None}, options={})
    started = client.post("/v1/synthetic-data", json=body)
    assert started.status_code == 200, started.text
    job_id = started.json()["job"]["id"]
    job = client.post(f"/v1/jobs/{job_id}/wait", json={"timeout_seconds": 50}).json()
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        job = client.post(f"/v1/jobs/{job_id}/wait", json={"timeout_seconds": 50}).json()
    assert job["state"] == "succeeded" and job["kind"] == "synth" and job["metrics"]["records"] == 10
    bad = client.post("/v1/synthetic-data", json={**body, "generator": {"type": "template", "templates": [
        {"prompt": "How do I {fix} it?", "completion": "Carefully."}]}})
    assert bad.status_code == 422 and "generator.templates[0]" in bad.text and "fix" in bad.text

    request = tmp_path / "synth.json"
    request.write_text(json.dumps(body), encoding="utf-8")
    env = {**os.environ, "WEIGHTSMITH_URL": base, "WEIGHTSMITH_API_KEY": key}
    priced = subprocess.run([sys.executable, "-m", "server.cli.main", "synth", "--config", str(request), "--dry-run",
                             "--json"], env=env, capture_output=True, text=True, check=False, timeout=120)
    assert priced.returncode == 0, priced.stdout + priced.stderr
    assert json.loads(priced.stdout)["admitted"] is True
    assert len(client.get("/v1/jobs", params={"kind": "synth"}).json()["jobs"]) == 1


def test_a_job_at_its_token_cap_registers_what_it_made_as_partial_and_a_refusal_says_what_fits(
        service: ServiceContext, tiny_model: Path) -> None:
    _, key = auth.create_agent(service.engine, service.settings, "frugal", max_request_flops=1e9)
    seeds = [{"prompt": "What is a red-drop?", "completion": "A customer under -27 dBm."},
             {"prompt": "Who handles T2 tickets?", "completion": "The field team."}]
    request = {"task": "instructions", "num_records": 8, "seed_examples": seeds,
               "generator": {"type": "model", "model": str(tiny_model), "max_new_tokens": 8, "batch_size": 8},
               "limits": {"max_tokens": 40}, "filters": {"near_duplicate": None, "diversity_rouge_l": None}}

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with Client(build_mcp_server(ServiceRef(service), key)) as client:
            too_big = await call(client, "generate_synthetic_data", **(request | {"num_records": 5000}), dry_run=True)
            refused = await client.call_tool("generate_synthetic_data", request | {"num_records": 5000})
            assert refused.is_error and "limit_exceeded" in refused.content[0].text
            job = await call(client, "generate_synthetic_data", **request)
            return too_big, job, await wait_final(client, job["job"]["id"])

    too_big, started, job = anyio.run(main)
    assert not too_big["admitted"] and "max_request_flops" in too_big["refusal"]
    assert "num_records <= " in too_big["refusal"]
    assert job["state"] == "succeeded", job["error"]
    metrics = job["metrics"]
    assert metrics["partial"] and metrics["stop_reason"] == "max_tokens" and 1 <= metrics["records"] < 8
    assert metrics["tokens_generated"] <= 40 and metrics["dataset_id"]
    assert 0 < job["flops_used"] <= started["estimate_flops"]
    assert _dataset(service, metrics["dataset_id"]).lineage["partial"] is True
