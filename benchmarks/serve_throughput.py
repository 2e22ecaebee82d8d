"""Serving throughput: the engine against a plain sequential `generate` loop and `transformers serve`.

    .venv/bin/python benchmarks/serve_throughput.py [--requests 64] [--clients 8] [--new-tokens 64] \
        [--threads 1]
    .venv/bin/python benchmarks/serve_throughput.py --url http://HOST:PORT/openai/v1 --api-key KEY \
        --model NAME [--model-dir DIR]    # the service's endpoint instead of a bare engine process

Side by side in one run, on the same ~10M-parameter model (preset `small`, tokenizer trained on the
sample corpus, built on the fly unless `--model-dir` names one), the same `--requests` chat requests
(questions from the sample corpus), greedy, `--new-tokens` new tokens at most:

- engine: `python -m training_core.serving` (or `--url`), `--clients` concurrent clients (the
  official `openai` client, one thread each), each sending its next request when the last returns;
- sequential: one `model.generate` per request, one after another, in this process (no HTTP);
- transformers serve: `transformers serve DIR` from the installed transformers, offline, the same
  clients; also with `--continuous-batching` (paged attention) where that runs on this device.

Tokens/s counts the completion tokens each answer reports (up to its end of sequence) over the
wall time of all requests; latency is each request's time from send to complete answer (for the
sequential loop, its own `generate`, with no queueing behind the others). On a CPU shared with
other work, give `--threads` (every system gets the same torch thread count): threads that
outnumber the free cores stall each other, ten times over on a busy two-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
Result = tuple[int, float, list[float]]
"""Completion tokens, wall seconds, per-request latencies."""


def run_clients(base_url: str, model: str, conversations: list[list[dict[str, str]]], clients: int,
                new_tokens: int, api_key: str = "unused") -> Result:
    api = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)

    def one(messages: list[dict[str, str]]) -> tuple[int, float]:
        started = time.perf_counter()
        reply = api.chat.completions.create(model=model, messages=messages, max_tokens=new_tokens,
                                            temperature=0)
        return reply.usage.completion_tokens, time.perf_counter() - started

    one(conversations[0])  # warm-up: loads the model
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(one, conversations))
    return sum(tokens for tokens, _ in answers), time.perf_counter() - started, [t for _, t in answers]


def sequential_loop(model_dir: Path, conversations: list[list[dict[str, str]]], new_tokens: int) -> Result:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()

    def one(messages: list[dict[str, str]]) -> tuple[int, float]:
        started = time.perf_counter()
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        generated = output[0, inputs["input_ids"].shape[1]:].tolist()
        stops = set(model.generation_config.eos_token_id)
        tokens = next((i + 1 for i, token in enumerate(generated) if token in stops), len(generated))
        return tokens, time.perf_counter() - started

    one(conversations[0])
    started = time.perf_counter()
    answers = [one(messages) for messages in conversations]
    return sum(tokens for tokens, _ in answers), time.perf_counter() - started, [t for _, t in answers]


def transformers_serve(model_dir: Path, run: Callable[[str], Result], threads: int | None,
                       continuous_batching: bool) -> Result | str:
    """Start `transformers serve` on the model; the figures, or why it did not run here."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
               *(["--continuous-batching"] if continuous_batching else [])]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    return f"exited with {process.returncode}: {log.read().decode(errors='replace')[-600:]}"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    return "not ready within 300 s"
                time.sleep(0.2)
            try:
                return run(f"http://127.0.0.1:{port}/v1")
            except openai.APIError as error:
                return f"answered with an error: {error}"
        finally:
            process.terminate()
            process.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _report(name: str, result: Result | str, reference: float | None) -> float | None:
    if isinstance(result, str):
        print(f"{name:<34} did not run: {result}")
        return None
    tokens, seconds, latencies = result
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    rate = tokens / seconds
    ratio = f"  {rate / reference:5.2f}x the sequential loop" if reference else ""
    print(f"{name:<34} {rate:8.0f} tokens/s  p50 {statistics.median(latencies):6.2f} s  p99 {p99:6.2f} s  "
          f"({tokens} tokens in {seconds:.1f} s){ratio}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
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

    with tempfile.TemporaryDirectory() as tmp:
        texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
        model_dir = args.model_dir or presets.build_base_model("small", texts, Path(tmp) / "small")
        questions = [line.strip() for text in texts for line in text.splitlines() if len(line.strip()) > 20]
        conversations = [[{"role": "user", "content": questions[i % len(questions)]}]
                         for i in range(args.requests)]
        model_name = args.model or str(model_dir)
        print(f"model: {count_parameters(model_dir):,} parameters; {args.requests} chat requests, "
              f"{args.clients} clients, {args.new_tokens} new tokens at most, greedy, torch threads: "
              f"{args.threads or 'default'}")

        def clients(url: str, model: str = str(model_dir), key: str = "unused") -> Result:
            return run_clients(url, model, conversations, args.clients, args.new_tokens, key)

        if args.url:
            ours: Result | str = clients(args.url, model_name, args.api_key)
        else:
            extra = ["--threads", str(args.threads)] if args.threads is not None else []
            with EngineProcess(memory_mb=1024, extra_args=extra,
                               env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}) as engine:
                assert engine.base_url is not None
                ours = clients(engine.base_url)
                batches = httpx.get(f"{engine.base_url.removesuffix('/v1')}/stats", timeout=30).json()
                print(f"engine batches, requests in each: {batches['requests_per_batch']}")
        sequential = sequential_loop(model_dir, conversations, args.new_tokens)
        others: dict[str, Result | str] = {}
        if not args.skip_transformers_serve:
            for batching in (False, True):
                name = "transformers serve" + (" --continuous-batching" if batching else "")
                others[name] = transformers_serve(model_dir, clients, args.threads, batching)

    reference = _report("sequential generate loop", sequential, None)
    our_rate = _report(f"engine ({args.url or 'training_core.serving'})", ours, reference)
    rates = {name: _report(name, result, reference) for name, result in others.items()}
    for name, rate in rates.items():
        if rate and our_rate:
            print(f"engine / {name}: {our_rate / rate:.2f}x (target >= 1.0x)")
    if our_rate and reference:
        print(f"engine / sequential loop: {our_rate / reference:.2f}x (target >= 2.0x)")


if __name__ == "__main__":
    main()
