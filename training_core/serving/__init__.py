"""Serving trained models: an engine process that speaks OpenAI's protocol, and a client to start it.

    python -m training_core.serving --port 0 --memory-mb 2048 --ready-file ready.json   # the engine
    from training_core.serving.client import EngineProcess                              # no torch

The service answers agents at `/openai/v1` (keys, names, guardrails, charging) and forwards each
request here, or to a vLLM server on a GPU machine (`vllm.py`, untested): both speak the same protocol.
Modules: `protocol` (request bodies, errors), `rows` (per-row sampling and stopping inside one
`generate`), `models` (loading, LoRA adapters on a shared base, LRU eviction), `engine` (dynamic
batching on a worker thread), `app` (routes), `client` (the process, from the service's side).

Nothing is imported here, so `client`, `protocol` (pydantic only: the service's proxy can validate a
body exactly as the engine will, whichever back end serves it) and `vllm` stay free of torch.
"""
