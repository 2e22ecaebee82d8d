"""A throwaway local Ray head for tests: 127.0.0.1, its own temp dir and ports, the Jobs API up.

    with ray_head(num_cpus=2) as cluster:
        JobSubmissionClient(cluster.dashboard_url).submit_job(entrypoint="python -m training_core SPEC")

The Jobs API lives in the dashboard (its job module), so the dashboard is on, bound to 127.0.0.1;
`ray start` is told every port it would otherwise take a fixed default for (client server 10001,
agent 52365, ...), so two heads on one machine never collide. The head runs as `ray start --block`
in a session of its own, with the interpreter's bin directory first on PATH as an activated virtual
environment would have it: the Jobs API runs an entrypoint's `python` from the head's PATH, the way
a real cluster's nodes run the environment they were started from.

Stopping sends SIGTERM to that `ray start` process, which shuts down what it started (GCS, raylet,
dashboard, workers); whatever of its process tree is still there after the grace period is killed
by pid. `ray stop --force` is not used: it kills every Ray process of the user on the machine,
other people's clusters included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.events import read_events

if TYPE_CHECKING:
    from training_core.spec import JobResult

START_TIMEOUT_SECONDS = 90.0
"""Seconds for the Jobs API to answer; the head takes about 9 on two busy CPU cores."""


@dataclass(frozen=True)
class RayCluster:
    address: str
    """The GCS address (`127.0.0.1:PORT`): `ray.init(address=...)`, `ray start --address=...`."""
    dashboard_url: str
    """The Jobs API (`http://127.0.0.1:PORT`): `JobSubmissionClient(dashboard_url)`."""
    temp_dir: Path
    """Ray's session files and logs (`session_latest/logs`), removed when the head stops."""
    start_seconds: float
    """From `ray start` to the Jobs API answering."""


def available_or_reason() -> tuple[bool, str]:
    try:
        import ray.job_submission  # noqa: F401  (the Jobs API client needs ray[default])
    except ImportError as error:
        return False, f"ray[default] is not installed ({error}); pip install -e '.[ray]' (CI installs it with .[dev])"
    return True, ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[RayCluster]:
    """Start a head with `num_cpus` CPUs and no GPUs, yield its addresses, stop it afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ws-ray-"))  # short: Ray's socket paths must fit 107 bytes
    dashboard_port = _free_port()
    ray_bin = Path(sys.executable).parent
    command = [
        str(ray_bin / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
        "--num-cpus", str(num_cpus), "--num-gpus", "0",
        # a fixed amount, small: by default Ray sizes its object store at 30% of the machine's memory
        "--object-store-memory", str(200 * 1024**2),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
        "--dashboard-agent-grpc-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
        "--metrics-export-port", str(_free_port()), "--temp-dir", str(temp_dir)]
    env = {**os.environ, "PATH": f"{ray_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           # On SIGTERM a node first drains until no actor is left on it; Ray Train leaves a detached
           # one (its autoscaling coordinator), so the drain would wait out its whole timeout.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    with (temp_dir / "ray-start.log").open("wb") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=temp_dir)
    try:
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_jobs_api(dashboard_url, head, temp_dir)
        yield RayCluster(address=_gcs_address(command), dashboard_url=dashboard_url, temp_dir=temp_dir,
                         start_seconds=time.monotonic() - started)
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _gcs_address(command: list[str]) -> str:
    return f"127.0.0.1:{command[command.index('--port') + 1]}"


def _wait_for_jobs_api(dashboard_url: str, head: subprocess.Popen[bytes], temp_dir: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if head.poll() is not None:
            log = (temp_dir / "ray-start.log").read_text(encoding="utf-8", errors="replace")
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log[-3000:]}")
        try:
            with urllib.request.urlopen(f"{dashboard_url}/api/jobs/", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the Ray Jobs API at {dashboard_url} did not answer within {START_TIMEOUT_SECONDS} s; "
                       f"see {temp_dir}/session_latest/logs")


def _stop(head: subprocess.Popen[bytes], grace_seconds: float = 20.0) -> None:
    import psutil  # installed with ray

    try:
        tree = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    head.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace_seconds)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    head.wait(timeout=grace_seconds)


# What the Ray tests share: a job spec, the environment a test submission gets, its processes.

ROOT = Path(__file__).resolve().parents[1]
JOB_MARKER = "WS_TEST_RAY_JOB"
"""Set in a test submission's environment, so a test finds every process of its job (driver and
Ray Train workers alike) by reading /proc, wherever Ray started them."""


def submission_env(job_id: str) -> dict[str, str]:
    """This source tree first on the path (as a node with weightsmith installed would have it), one
    thread a process on two shared cores, no hub, and the marker that finds the job's processes."""
    return {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", JOB_MARKER: job_id}


def training_processes(job_id: str) -> list[Any]:
    """The live processes (psutil) that train `job_id`: the entrypoint child and Ray Train's workers,
    told apart by the marker in their environment from the other processes Ray gives the job's
    runtime environment (its supervisor, the Ray Train controller)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if (process.environ().get(JOB_MARKER) == job_id and process.status() != psutil.STATUS_ZOMBIE
                    and any(part in " ".join(process.cmdline()) for part in ("training_core", "RayTrainWorker"))):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def write_sft_spec(work: Path, base_model: Path, devices: int = 1, **hyperparameters: Any) -> Path:
    """A tiny SFT job on 48 chat records, as benchmarks/run_spec.py writes one; returns the spec's path."""
    from tests.conftest import chat_records, write_jsonl
    from training_core.spec import Hyperparameters, JobSpec

    work.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(work / "chat.jsonl", chat_records(48))
    hyper = Hyperparameters(**{"learning_rate": 3e-3, "max_steps": 6, "per_device_batch_size": 4,
                               "gradient_accumulation_steps": 1, "max_seq_length": 64, "eval_fraction": 0.0,
                               "warmup_ratio": 0.0, "save_steps": 10**6, **hyperparameters})
    run_dir = work / "run"
    spec = JobSpec(job_id=work.name, method="sft", run_dir=str(run_dir), output_dir=str(run_dir / "output"),
                   base_model=str(base_model), train_files=[str(data)], hyperparameters=hyper, devices=devices,
                   flops_per_token=1000.0)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.write(run_dir / "spec.json")
    return run_dir / "spec.json"


def assert_resumed_to_the_end(run_dir: Path, checkpoints: list[int], max_steps: int) -> JobResult:
    """The second run resumed from the newest checkpoint (or later), trained every step after it up to
    `max_steps`, and left a succeeded result, which is returned."""
    from training_core.spec import JobResult

    events = read_events(run_dir)
    [resumed] = [e for e in events if e["message"].startswith("resuming from step")]
    assert resumed["data"]["step"] >= max(checkpoints)
    after = [e["data"]["step"] for e in events[events.index(resumed):] if e["type"] == "metrics"]
    assert after[0] == resumed["data"]["step"] + 1 and after[-1] == max_steps
    result = JobResult.read(run_dir)
    assert result is not None and result.status == "succeeded" and result.steps == max_steps
    return result
