"""Service settings: one object, read from `WEIGHTSMITH_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SynthEndpoint(BaseModel):
    """An OpenAI-compatible endpoint the operator lets synth jobs use (vLLM, llama.cpp, Ollama, a hosted API)."""

    base_url: str = Field(description="Up to /v1, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="The model name the endpoint serves.")
    api_key_env: str | None = Field(None, description="Environment variable holding the key; the key itself is "
                                    "never stored in a request, record or log.")
    max_concurrency: int = Field(4, ge=1, le=256)
    requests_per_second: float | None = Field(None, gt=0)


class Settings(BaseSettings):
    """Everything an operator can set. `WEIGHTSMITH_HOME=/srv/ws weightsmith serve`."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTSMITH_", env_nested_delimiter="__")

    home: Path = Field(Path(".weightsmith"), description="Service home: database, datasets, runs, models.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default SQLite in WAL mode at HOME/weightsmith.db. "
        "postgresql+psycopg://... for a store shared by several machines.")
    data_roots: list[Path] = Field(
        default_factory=list,
        description="Directories datasets and base models may be registered from by path; "
        "anything outside them is refused. JSON list, e.g. '[\"/data\"]'.")
    studies_database_url: str | None = Field(
        None, description="Optuna storage of the tune studies (optuna-dashboard opens it); default the service's "
        "own database, where Optuna's tables sit beside the service's. A SQLAlchemy URL keeps them in another.")
    host: str = Field("127.0.0.1", description="Address `serve` binds.")
    port: int = Field(8765, description="Port `serve` binds.")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:*", "localhost:*", "[::1]:*"],
        description="Host headers the MCP endpoint accepts (DNS-rebinding protection).")
    worker_slots: int = Field(1, description="Jobs the embedded executor runs at once; 0 disables it.")
    executor: Literal["local", "ray"] = Field("local", description=(
        "Where jobs run: local child processes of the workers, or a Ray cluster (Jobs API per run, Ray "
        "Train across devices); ray needs ray_address, `pip install -e .[ray]`, and the home on storage "
        "every node reaches."))
    ray_address: str | None = Field(None, description="The Ray head's dashboard, where its Jobs API answers: "
                                    "http://HEAD:8265.")
    ray_python: str = Field("python", description="The Python a Ray node starts a job with (its weightsmith "
                            "environment's).")
    ray_gpus: bool = Field(False, description="With the Ray executor: a job's devices are GPUs (else CPUs).")
    max_devices: int | None = Field(None, description="The most devices one job may ask for; default: this "
                                    "machine's GPUs or CPU cores, or 1 with the Ray executor (set it to what a "
                                    "job may spread over the cluster).")
    child_threads: int | None = Field(
        None, description="CPU threads per training process (OMP_NUM_THREADS); default: the cores left after "
        "one for the service, shared among the slots.")
    lease_seconds: float = Field(30.0, description="A worker's claim on a job lasts this long without a heartbeat.")
    heartbeat_seconds: float = Field(5.0, description="How often a worker renews its leases and relays events.")
    validation_stale_seconds: float = Field(
        300.0, description="A job still `validating` this long after it was created lost the process checking "
        "its datasets' snapshots (a crash); a worker checks them again and queues or fails it.")
    cancel_grace_seconds: float = Field(10.0, description="Wait after the cooperative cancel before SIGTERM, "
                                        "and again before SIGKILL.")
    max_attempts: int = Field(3, description="Runs of one job that may end without a result before it fails as "
                              "crashed; a run given back at a clean service stop does not count.")
    serve_engine: Literal["cpu", "vllm"] = Field("cpu", description=(
        "What generates for /openai/v1: the built-in engine (batched transformers generate, LoRA adapters on a "
        "cached base), or vLLM on a GPU machine (one `vllm serve` per base model, adapters loaded at run time)."))
    serve_memory_mb: int = Field(4096, description="Memory the built-in engine keeps models in (least recently "
                                 "used evicted first).")
    serve_threads: int | None = Field(None, description="CPU threads of the built-in engine (default one per "
                                      "core; 1 or 2 where training jobs share the cores).")
    serve_max_tokens: int = Field(1024, description="Most tokens one request may generate (max_tokens x n).")
    serve_max_concurrent: int = Field(8, description="Requests one agent may have generating at once.")
    public_url: str | None = Field(None, description="How agents reach this service (what list_models shows for "
                                   "the OpenAI-compatible endpoint); default http://HOST:PORT.")
    job_memory_mb: int = Field(default_factory=lambda: _job_memory_mb(), description=(
        "Memory for one job's whole process tree (its sandboxes included), enforced by a control group where "
        "the machine allows one; default: the machine's memory less 2 GB for the service, shared among the slots."))
    job_max_processes: int = Field(8192, description="Processes and threads one job's tree may have (control group).")
    max_upload_bytes: int = Field(20_000_000, description="Cap on an inline dataset upload.")
    max_record_bytes: int = Field(1_000_000, description="Cap on one dataset record.")
    local_agent: str = Field("local", description="Identity of the caller over stdio when no key is given.")
    local_agent_key: str | None = Field(None, description="API key that selects the stdio caller's identity.")

    synth_endpoints: dict[str, SynthEndpoint] = Field(
        default_factory=dict, description="OpenAI-compatible endpoints synth jobs may name, as JSON: "
        '{"local-vllm": {"base_url": "http://127.0.0.1:8000/v1", "model": "qwen", "api_key_env": "VLLM_KEY"}}.')
    synth_max_records: int = Field(50_000, description="Most records one synth request may ask for.")
    synth_max_tokens: int = Field(5_000_000, description="Most tokens one synth request may generate.")

    # Default limits for a new agent; `weightsmith agents add NAME --max-flops ...` overrides them.
    default_max_request_flops: float = Field(5e15, description="Per-request compute cap (FLOPs).")
    default_max_request_seconds: float = Field(3600.0, description="Per-request wall-clock cap.")
    default_max_request_params: int = Field(2_000_000_000, description="Largest model a request may train.")
    default_max_request_tokens: int = Field(500_000_000, description="Most tokens one request may train on.")
    default_max_dataset_bytes: int = Field(2_000_000_000, description="Largest dataset one request may use.")
    default_budget_flops: float = Field(5e16, description="Rolling compute budget per agent (FLOPs).")
    default_budget_window_seconds: float = Field(86400.0, description="Window of the rolling budget.")
    default_max_concurrent_jobs: int = Field(4, description="Jobs an agent may have active at once.")

    @field_validator("synth_endpoints")
    @classmethod
    def _keys_reach_the_child(cls, endpoints: dict[str, SynthEndpoint]) -> dict[str, SynthEndpoint]:
        # Jobs run in children whose environment has every WEIGHTSMITH_* variable removed.
        for name, endpoint in endpoints.items():
            if endpoint.api_key_env and endpoint.api_key_env.startswith("WEIGHTSMITH_"):
                raise ValueError(f"synth_endpoints.{name}.api_key_env: {endpoint.api_key_env} is removed from job "
                                 "processes' environment; name a variable without the WEIGHTSMITH_ prefix")
        return endpoints

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'weightsmith.db').resolve()}"

    @property
    def studies_url(self) -> str:
        return self.studies_database_url or self.db_url

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def _job_memory_mb() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    slots = int(os.environ.get("WEIGHTSMITH_WORKER_SLOTS", "1") or 1)
    return max(1024, (total - 2048) // max(1, slots))
