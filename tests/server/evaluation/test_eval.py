"""Evaluation end to end: suites, eval jobs, the gate, drift and reports, through the real MCP client
(in memory), REST through its HTTP client, and the HTML report rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from mcp import Client

from server.api.app import rest_app
from server.api.mcp import build_mcp_server
from server.context import ServiceContext, ServiceRef
from server.store import agents as auth
from tests.conftest import CHAT_FACTS, chat_records, quick_hyperparameters, write_jsonl
from tests.server.api.test_mcp_in_memory import call, wait_final

SUITE_YAML = """
name: chat-facts
dataset: {dataset}
cluster_key: source
decoding: {{max_new_tokens: 12, batch_size: 8}}
kpis:
  - name: exact
    grader: {{type: exact, ignore_case: true}}
    threshold: 0.5
    allowed_regression: 0.05
  - name: rouge
    grader: {{type: similarity, metric: rouge_l}}
    allowed_regression: 0.05
  - name: ppl
    grader: {{type: perplexity}}
    direction: lower
    aggregation: median
    allowed_regression: 5
composite: "0.5 * exact + 0.5 * rouge"
"""


def eval_records(n: int = 24) -> list[dict[str, Any]]:
    """The chat facts as prompt/completion items; the two phrasings of a fact share a cluster."""
    records = []
    for i in range(n):
        question, answer = CHAT_FACTS[i % len(CHAT_FACTS)]
        prompt = question if (i // len(CHAT_FACTS)) % 2 == 0 else f"Quick question: {question}"
        records.append({"prompt": prompt, "completion": answer, "metadata": {"source": f"fact{i % len(CHAT_FACTS)}"}})
    return records


@pytest.fixture
def agent_keys(service: ServiceContext) -> tuple[str, str]:
    _, key_a = auth.create_agent(service.engine, service.settings, "eval-a")
    _, key_b = auth.create_agent(service.engine, service.settings, "eval-b")
    return key_a, key_b


def rest_client(service: ServiceContext, key: str) -> TestClient:
    return TestClient(rest_app(ServiceRef(service)), headers={"Authorization": f"Bearer {key}"})


def test_malformed_suites_are_refused_field_by_field_and_store_nothing(service: ServiceContext, tmp_path: Path,
                                                                        agent_keys: tuple[str, str]) -> None:
    data = write_jsonl(tmp_path / "items.jsonl", eval_records(12))

    async def main() -> None:
        async with Client(build_mcp_server(ServiceRef(service), local_key=agent_keys[0], toolsets=("all",))) as client:
            dataset = (await call(client, "upload_dataset", path=str(data)))["dataset"]["id"]
            bad = (f"name: broken\ndataset: {dataset}\nkpis:\n  - {{name: a, grader: {{type: bleu}}}}\n"
                   "  - {name: b, grader: {type: regex, pattern: '(['}}\n"
                   "  - {name: c, grader: {type: exact}, direction: up}\ncomposite: a + b\n")
            refused = await client.call_tool("create_eval_suite", {"definition": bad})
            message = refused.content[0].text
            assert refused.is_error and "3 problem(s)" in message
            for field in ("kpis[0].grader", "unknown grader type 'bleu'", "kpis[1].grader",
                          "invalid regular expression", "kpis[2].direction"):
                assert field in message
            formula = await client.call_tool("create_eval_suite", {"definition": json.dumps({
                "name": "f", "dataset": dataset, "kpis": [{"name": "a", "grader": {"type": "exact"}}],
                "composite": "a + accuracy"})})
            assert formula.is_error and "composite" in formula.content[0].text
            assert "'accuracy', which is no KPI" in formula.content[0].text
            not_yaml = await client.call_tool("create_eval_suite", {"definition": "name: [unclosed"})
            assert not_yaml.is_error and "not valid YAML: line" in not_yaml.content[0].text
            assert (await call(client, "list_eval_suites"))["suites"] == []

    anyio.run(main)


def test_a_suite_missing_its_fields_is_refused_in_our_words_not_pydantics(service: ServiceContext,
                                                                          agent_keys: tuple[str, str]) -> None:
    async def main() -> Any:
        async with Client(build_mcp_server(ServiceRef(service), local_key=agent_keys[0])) as client:
            return await client.call_tool("create_eval_suite", {"definition": json.dumps({"suite": 1})})

    refused = anyio.run(main)
    text = refused.content[0].text
    assert refused.is_error and text.startswith("invalid_request: the suite has 4 problem(s): name: is required")
    assert "suite: is not a field here; the fields are name, dataset" in text
    assert "Field required" not in text and "Extra inputs" not in text
    assert refused.structured_content["error"]["problems"][0] == {"param": "name", "message": "is required"}


def test_agent_runs_an_eval_on_a_model_directory_and_reads_the_report(
        service: ServiceContext, tmp_path: Path, tiny_model: Path, agent_keys: tuple[str, str]) -> None:
    data = write_jsonl(tmp_path / "items.jsonl", eval_records(24))

    async def main() -> tuple[dict[str, Any], dict[str, Any], str]:
        async with Client(build_mcp_server(ServiceRef(service), local_key=agent_keys[0], toolsets=("all",))) as client:
            dataset = (await call(client, "upload_dataset", path=str(data)))["dataset"]["id"]
            created = await call(client, "create_eval_suite", definition=SUITE_YAML.format(dataset=dataset))
            again = await call(client, "create_eval_suite", definition=SUITE_YAML.format(dataset=dataset))
            assert created["id"] == again["id"] and created["items"] == 24
            assert created["kpis"] == ["exact", "rouge", "ppl"]
            started = await call(client, "run_eval", model=str(tiny_model), suite_id=created["id"], baseline="none")
            assert started["admitted"] and started["models_to_run"] == [str(tiny_model)]
            assert started["estimate_flops"] > 0
            job = await wait_final(client, started["job"]["id"])
            assert job["state"] == "succeeded", job["error"]
            assert job["kind"] == "eval" and job["flops_used"] > 0
            report = await call(client, "read_eval_report", ref=started["job"]["id"])
            page = await call(client, "read_eval_report", ref=job["metrics"]["report_id"], page=2)
            resource = await client.read_resource(f"weightsmith://reports/{job['metrics']['report_id']}.html")
            return report, page, resource.contents[0].text

    report, page, html = anyio.run(main)
    kpis = {k["name"]: k for k in report["kpis"]}
    # An untrained model answers none of the facts: the exact-match threshold is missed, so the verdict fails.
    assert kpis["exact"]["value"] == 0.0 and kpis["exact"]["threshold_met"] is False
    assert report["verdict"] == "fail" and kpis["exact"]["gate"] is None
    assert kpis["ppl"]["value"] > 1.0
    assert any("misses its threshold" in step for step in report["next_steps"])
    assert len(report["items"]) == 3 and all(item["scores"]["exact"] == 0.0 for item in report["items"])
    assert [item["index"] for item in page["items"]] == [20, 21, 22, 23]
    assert "<svg" in html and "Verdict" in html


@pytest.mark.slow
def test_train_job_with_an_eval_suite_is_gated_against_its_base_and_the_html_report_renders(
        service: ServiceContext, tmp_path: Path, tiny_model: Path, agent_keys: tuple[str, str],
        chromium: str) -> None:
    """Train LoRA SFT on the facts with eval_suite set (no merged copy, so the eval loads the adapter on
    its base with PEFT): the eval job that follows scores the new model and its base on the same
    items, and the trained model is better by design."""
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(48))
    items = write_jsonl(tmp_path / "items.jsonl", eval_records(24))

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
        async with Client(build_mcp_server(ServiceRef(service), local_key=agent_keys[0], toolsets=("all",))) as client:
            train_ds = (await call(client, "upload_dataset", path=str(train)))["dataset"]["id"]
            items_ds = (await call(client, "upload_dataset", path=str(items)))["dataset"]["id"]
            suite_id = (await call(client, "create_eval_suite", definition=SUITE_YAML.format(dataset=items_ds)))["id"]
            launched = await call(client, "launch_training", base_model=str(tiny_model), datasets=[train_ds],
                                  adapter="lora", eval_suite=suite_id,
                                  hyperparameters=quick_hyperparameters(max_steps=60, learning_rate=3e-3))
            trained = await wait_final(client, launched["job"]["id"])
            assert trained["state"] == "succeeded", trained["error"]
            # Queued in the transaction that ended the train job: there the moment it is seen succeeded.
            evals = (await call(client, "list_jobs", kind="eval"))["jobs"]
            assert len(evals) == 1
            evaluated = await wait_final(client, evals[0]["id"])
            assert evaluated["state"] == "succeeded", evaluated["error"]
            report = await call(client, "read_eval_report", ref=trained["model_id"])
            drift = await call(client, "check_drift", against=trained["model_id"], dataset_id=items_ds,
                               suite_id=suite_id)
            # The other way round, against another baseline: the base model, gated against the trained one.
            reverse = await call(client, "read_eval_report", ref=report["baseline"], baseline=trained["model_id"])
            ppl = next(k for k in reverse["kpis"] if k["name"] == "ppl")
            assert reverse["baseline"] == trained["model_id"] and ppl["gate"]["verdict"] == "fail"
            assert reverse["verdict"] == "fail" and reverse["next_steps"]
            return trained, report, drift, suite_id

    trained, report, drift, suite_id = anyio.run(main)
    assert report["baseline"] == str(tiny_model) and report["model"] == trained["model_id"]
    kpis = {k["name"]: k for k in report["kpis"]}
    assert kpis["ppl"]["gate"]["delta"] < 0 and kpis["ppl"]["gate"]["verdict"] == "pass", kpis["ppl"]
    assert kpis["rouge"]["gate"]["test"] == "cluster_bootstrap"
    assert kpis["rouge"]["gate"]["delta"] > 0
    # The suite's items are the training facts, so their data is not drifted from the training data.
    assert drift["data"]["js_distance"] < 0.1 and set(drift["kpi"]) == {"exact", "rouge", "ppl"}

    rest = rest_client(service, agent_keys[0])
    priced = rest.post("/v1/evals", json={"model": trained["model_id"], "suite_id": suite_id, "dry_run": True})
    # Its base already has a report on the suite, so only the model itself would run again.
    assert priced.status_code == 200 and priced.json()["models_to_run"] == [trained["model_id"]]
    assert priced.json()["admitted"] and priced.json()["job"] is None
    by_model = rest.get(f"/v1/reports/{trained['model_id']}")
    assert by_model.status_code == 200 and by_model.json()["verdict"] == report["verdict"]
    html = rest.get(by_model.json()["html_url"])
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert html.text.count("<svg") >= 4 and "Training curve" in html.text
    other = rest_client(service, agent_keys[1]).get(by_model.json()["html_url"])
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"

    page_path = tmp_path / "report.html"
    page_path.write_text(html.text, encoding="utf-8")
    screenshot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={screenshot}", "--window-size=800,1400", page_path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert_non_trivial_png(screenshot)


def assert_non_trivial_png(path: Path) -> None:
    """A real page: a sizeable PNG whose pixels are far from uniform (plots, text, colours)."""
    from PIL import Image

    assert path.stat().st_size > 20_000, f"screenshot is only {path.stat().st_size} bytes"
    image = Image.open(path).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50
    blue = sum(count for count, (r, g, b) in colours if b > 150 and r < 100)  # the model's KPI bars and curve
    assert blue > 500, "no plot colour in the screenshot"


@pytest.fixture(scope="session")
def chromium() -> Iterator[str]:
    """Debian's chromium, installed with apt when missing and allowed (root); else the test skips."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False, capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and could not be installed (needs root and apt)")
    yield found


def test_an_eval_that_no_longer_fits_after_training_is_noted_on_the_train_job_which_still_succeeds(
        service: ServiceContext, tmp_path: Path, tiny_model: Path, agent_keys: tuple[str, str]) -> None:
    """The eval a train job asked for is admitted when the train job ends: a limit lowered meanwhile
    refuses it, and the refusal is a warning on the succeeded train job, with no eval job left behind."""
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(16))
    items = write_jsonl(tmp_path / "items.jsonl", eval_records(24))

    async def main() -> tuple[str, dict[str, Any], list[dict[str, Any]], list[str]]:
        async with Client(build_mcp_server(ServiceRef(service), local_key=agent_keys[0], toolsets=("all",))) as client:
            train_ds = (await call(client, "upload_dataset", path=str(train)))["dataset"]["id"]
            items_ds = (await call(client, "upload_dataset", path=str(items)))["dataset"]["id"]
            suite_id = (await call(client, "create_eval_suite", definition=SUITE_YAML.format(dataset=items_ds)))["id"]
            launched = await call(client, "launch_training", base_model=str(tiny_model), datasets=[train_ds],
                                  adapter="full", eval_suite=suite_id,
                                  hyperparameters=quick_hyperparameters(max_steps=4))
            auth.set_limits(service.engine, "eval-a", {"max_request_flops": 1.0})  # `weightsmith agents set`
            trained = await wait_final(client, launched["job"]["id"])
            evals = (await call(client, "list_jobs", kind="eval"))["jobs"]
            events = await call(client, "get_job_events", job_id=trained["id"], limit=200)
            return suite_id, trained, evals, [e["message"] for e in events["events"] if e["level"] == "warning"]

    suite_id, trained, evals, warnings = anyio.run(main)
    assert trained["state"] == "succeeded" and trained["model_id"], trained["error"]
    assert evals == []
    assert any(m.startswith(f"the eval on {suite_id} was not started") and
               "max_request_flops" in m for m in warnings), warnings
