"""Serving throughput: the engine against a plain sequential `generate` loop and `transformers serve`.

    .venv/bin/python benchmarks/serve_throughput.py [--requests 64] [--clients 8] [--new-tokens 64] \\
        [--rounds 3] [--threads 1]
    .venv/bin/python benchmarks/serve_throughput.py --url http://HOST:PORT/openai/v1 --api-key KEY \\
        --model NAME [--model-dir DIR]    # a running service's endpoint instead of starting one

Side by side in one run, on the same ~10M-parameter model (preset `small`, tokenizer trained on the
sample corpus, built on the fly unless `--model-dir` names one), the same `--requests` chat requests
(questions from the sample corpus), greedy, `--new-tokens` new tokens at most:

- service: `weightsmith serve` in a temporary home, its `/openai/v1` with an agent's key, the model
  registered by a real continued pre-training job of one step at learning rate 1e-7 (the service
  serves only models its jobs made; the weights stay the same to float precision), or `--url`;
  `--clients` concurrent clients (the official `openai` client, one thread each), each sending its
  next request when the last returns;
- engine: the same engine process the service starts (`python -m training_core.serving`), called
  directly: the difference from the service is the gateway's cost (keys, admission, charging);
- sequential: one `model.generate` per request, one after another, in this process (no HTTP);
- transformers serve: `transformers serve DIR` from the installed transformers, offline, the same
  clients; also with `--continuous-batching` (paged attention) where that runs on this device.

All servers stay up for the whole run and the systems take turns, `--rounds` times, so that a load
that drifts (a shared machine) falls on all of them alike; tokens/s is each system's median round.
Tokens/s counts the completion tokens each answer reports (up to its end of sequence) over the
round's wall time; latency is each request's time from send to complete answer, over all rounds
(for the sequential loop: its own `generate`, no queueing behind the others). On a CPU shared with
other work give `--threads` (every system gets that torch thread count): threads that outnumber the
free cores stall each other, ten times over on a busy two-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_core import presets
from training_core.modelinfo import count_parameters
from training_core.serving.client import EngineProcess

SAMPLE = ROOT / "examples" / "sample_corpus"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
Conversation = list[dict[str, str]]
Round = tuple[int, float, list[float]]
"""Completion tokens, wall seconds, per-request latencies."""


def over_http(base_url: str, model: str, clients: int, new_tokens: int, api_key: str = "unused"
              ) -> Callable[[list[Conversation]], Round]:
    api = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)

    def one(messages: Conversation) -> tuple[int, float]:
        started = time.perf_counter()
        reply = api.chat.completions.create(model=model, messages=messages, max_tokens=new_tokens,
                                            temperature=0)
        return reply.usage.completion_tokens, time.perf_counter() - started

    def run(conversations: list[Conversation]) -> Round:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            answers = list(pool.map(one, conversations))
        return sum(tokens for tokens, _ in answers), time.perf_counter() - started, [t for _, t in answers]

    return run


def sequential_loop(model_dir: Path, new_tokens: int) -> Callable[[list[Conversation]], Round]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    stops = set(model.generation_config.eos_token_id)

    def one(messages: Conversation) -> tuple[int, float]:
        started = time.perf_counter()
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        generated = output[0, inputs["input_ids"].shape[1]:].tolist()
        tokens = next((i + 1 for i, token in enumerate(generated) if token in stops), len(generated))
        return tokens, time.perf_counter() - started

    def run(conversations: list[Conversation]) -> Round:
        started = time.perf_counter()
        answers = [one(messages) for messages in conversations]
        return sum(tokens for tokens, _ in answers), time.perf_counter() - started, [t for _, t in answers]

    return run


class NotRunning(Exception):
    """Why a system could not be measured on this machine."""


@contextlib.contextmanager
def transformers_serve(model_dir: Path, threads: int | None, continuous_batching: bool) -> Iterator[str]:
    """`transformers serve` on the model, offline; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, **OFFLINE, **({"OMP_NUM_THREADS": str(threads)} if threads is not None else {})}
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
               *(["--continuous-batching"] if continuous_batching else [])]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while not _answers(f"http://127.0.0.1:{port}/health"):
                if process.poll() is not None:
                    log.seek(0)
                    raise NotRunning(f"exited with {process.returncode}: "
                                     f"{log.read().decode(errors='replace')[-600:]}")
                if time.monotonic() > deadline:
                    raise NotRunning("not ready within 300 s")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            process.wait(timeout=30)


@contextlib.contextmanager
def weightsmith_serve(model_dir: Path, tmp: Path, threads: int | None) -> Iterator[tuple[str, str, str]]:
    """`weightsmith serve` in a home under `tmp`, with an agent whose model is `model_dir` registered by a
    real job; yields the endpoint's base URL, the agent's key and the model's id."""
    from server.settings import Settings
    from server.store.agents import create_agent
    from server.store.db import make_engine, migrate

    settings = Settings(home=tmp / "home", data_roots=[tmp, SAMPLE])
    store = make_engine(settings.db_url)
    migrate(store)
    _, key = create_agent(store, settings, "benchmark")
    store.dispose()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, **OFFLINE, "WEIGHTSMITH_HOME": str(settings.home),
           "WEIGHTSMITH_DATA_ROOTS": f'["{tmp}", "{SAMPLE}"]', "WEIGHTSMITH_WORKER_SLOTS": "1",
           **({"WEIGHTSMITH_SERVE_THREADS": str(threads)} if threads else {})}
    with (tmp / "serve.log").open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "server.cli.main", "serve", "--port", str(port)],
                                   env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=120)
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{base}/docs"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"weightsmith serve did not start: {(tmp / 'serve.log').read_text()[-800:]}")
            time.sleep(0.2)
        dataset = api.post("/datasets", json={"path": str(SAMPLE / "procedures.txt")}).json()["dataset"]["id"]
        job = api.post("/trainings", json={
            "method": "continued_pretrain", "base_model": str(model_dir), "datasets": [dataset],
            "adapter": "full", "model_name": "served",
            "hyperparameters": {"max_steps": 1, "learning_rate": 1e-7, "max_seq_length": 64}}).json()
        while (ended := api.post(f"/jobs/{job['job']['id']}/wait", json={"timeout_seconds": 45}).json()
               )["state"] not in ("succeeded", "failed", "cancelled"):
            pass
        if ended["state"] != "succeeded":
            raise SystemExit(f"registering the model failed: {ended}")
        yield f"{base}/openai/v1", key, ended["model_id"]
    finally:
        api.close()
        process.terminate()
        process.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _report(name: str, rounds: list[Round] | str, reference: float | None) -> float | None:
    if isinstance(rounds, str):
        print(f"{name:<42} did not run: {rounds}")
        return None
    rate = statistics.median(tokens / seconds for tokens, seconds, _ in rounds)
    latencies = sorted(latency for _, _, per_request in rounds for latency in per_request)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    each = ", ".join(f"{tokens / seconds:.0f}" for tokens, seconds, _ in rounds)
    ratio = f"  {rate / reference:5.2f}x sequential" if reference else ""
    print(f"{name:<42} {rate:7.0f} tokens/s (rounds: {each})  p50 {statistics.median(latencies):6.2f} s  "
          f"p99 {p99:6.2f} s{ratio}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for every system")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: `small`, built on the fly")
    parser.add_argument("--url", default=None, help="an OpenAI-compatible base URL to measure instead")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--model", default=None, help="the model's name at --url (default: its directory)")
    parser.add_argument("--skip-transformers-serve", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    engine_name = "engine (training_core.serving)"
    service_name = f"service ({args.url or 'weightsmith serve, /openai/v1'})"

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
        model_dir = args.model_dir or presets.build_base_model("small", texts, Path(tmp) / "small")
        questions = [line.strip() for text in texts for line in text.splitlines() if len(line.strip()) > 20]
        conversations = [[{"role": "user", "content": questions[i % len(questions)]}]
                         for i in range(args.requests)]
        print(f"model: {count_parameters(model_dir):,} parameters; {args.requests} chat requests, "
              f"{args.clients} clients, {args.new_tokens} new tokens at most, greedy, {args.rounds} rounds, "
              f"torch threads: {args.threads or 'default'}")

        systems: dict[str, Callable[[list[Conversation]], Round]] = {}
        if args.url:
            systems[service_name] = over_http(args.url, args.model or str(model_dir), args.clients,
                                              args.new_tokens, args.api_key)
        else:
            url, key, model = servers.enter_context(weightsmith_serve(model_dir, Path(tmp), args.threads))
            systems[service_name] = over_http(url, model, args.clients, args.new_tokens, key)
        threads = ["--threads", str(args.threads)] if args.threads else []
        engine = servers.enter_context(EngineProcess(memory_mb=1024, env=OFFLINE, extra_args=threads))
        assert engine.base_url is not None
        systems[engine_name] = over_http(engine.base_url, str(model_dir), args.clients, args.new_tokens)
        systems["sequential generate loop"] = sequential_loop(model_dir, args.new_tokens)
        skipped: dict[str, str] = {}
        for batching in ([] if args.skip_transformers_serve else [False, True]):
            name = "transformers serve" + (" --continuous-batching" if batching else "")
            try:
                url = servers.enter_context(transformers_serve(model_dir, args.threads, batching))
                systems[name] = over_http(url, str(model_dir), args.clients, args.new_tokens)
            except NotRunning as reason:
                skipped[name] = str(reason)

        results: dict[str, list[Round] | str] = {name: [] for name in systems}
        for name, run in systems.items():  # warm-up: model loads, first-call allocations
            try:
                run(conversations[: args.clients])
            except openai.APIError as error:
                results[name] = f"answered with an error: {error}"
        for _ in range(args.rounds):
            for name, run in systems.items():
                if isinstance(outcome := results[name], list):
                    outcome.append(run(conversations))
        batches = httpx.get(f"{engine.base_url.removesuffix('/v1')}/stats", timeout=30).json()
        print(f"engine batches (direct calls), requests in each: {batches['requests_per_batch']}")

    reference = _report("sequential generate loop", results.pop("sequential generate loop"), None)
    our_rate = _report(service_name, results.pop(service_name), reference)
    rates = {name: _report(name, outcome, reference) for name, outcome in {**results, **skipped}.items()}
    for name, rate in rates.items():
        if rate and our_rate:
            target = " (target >= 1.0x)" if name.startswith("transformers") else ""
            print(f"service / {name}: {our_rate / rate:.2f}x{target}")
    if our_rate and reference:
        print(f"service / sequential loop: {our_rate / reference:.2f}x (target >= 2.0x)")


if __name__ == "__main__":
    main()
