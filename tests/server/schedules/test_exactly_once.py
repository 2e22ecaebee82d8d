"""Two service processes on one PostgreSQL database, ticking from the same moment on: every due firing
starts exactly once, whichever process claims it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

from server.schedules import definitions
from server.service import open_service
from server.settings import Settings
from server.store import agents
from server.store.tables import Job, ScheduleRun
from tests import postgres
from tests.conftest import chat_records, quick_hyperparameters, write_jsonl
from tools.upload_dataset import UploadDatasetRequest, upload_dataset

SCHEDULES = 100
T0 = 1_700_000_000.0  # 2023-11-14, before the `at` below

# Each ticker says it is ready and waits for the start file, so that both tick at the same moment:
# started one after the other, the first would fire everything before the second had imported.
TICKER = """
import sys, json, time
from pathlib import Path
from server.schedules.scheduler import Scheduler
from server.service import open_service
from server.settings import Settings
settings = Settings.model_validate_json(sys.argv[1])
start = Path(sys.argv[3])
with open_service(settings, workers=False, scheduler=False) as ctx:
    scheduler = Scheduler(ctx, sys.argv[2])
    Path(sys.argv[3] + "." + sys.argv[2]).touch()
    while not start.exists():
        time.sleep(0.01)
    print(json.dumps(sum(scheduler.tick(float(now)) for now in sys.argv[4:])))
"""


@pytest.mark.slow
def test_two_processes_ticking_together_start_each_of_100_due_firings_once(settings: Settings, tmp_path: Path) -> None:
    bin_dir, reason = postgres.available_or_reason()
    if bin_dir is None:
        pytest.skip(reason)
    with postgres.postgres_server(bin_dir) as url:
        settings = settings.model_copy(update={"database_url": url})
        with open_service(settings, workers=False, scheduler=False) as ctx:
            agent = agents.create_agent(ctx.engine, settings, "fleet", max_concurrent_jobs=1000)[0]
            data = write_jsonl(tmp_path / "chats.jsonl", chat_records(8))
            dataset = upload_dataset(ctx, agent, UploadDatasetRequest(path=str(data))).dataset
            assert dataset is not None
            request = {"base_model": str(settings.data_roots[1] / "tiny"), "datasets": [dataset.id],
                       "hyperparameters": quick_hyperparameters(max_steps=1)}
            for i in range(SCHEDULES):
                spec = definitions.ScheduleSpec.model_validate({
                    "name": f"s{i}", "trigger": {"at": "2027-01-15T08:00:00Z"}, "kind": "train", "request": request})
                definitions.create(ctx, agent, spec, T0)
        due = str(1_800_000_100.0)  # just after the `at` (2027-01-15T08:00Z), for both
        ticks = [due, str(float(due) + 1), str(float(due) + 2)]
        start = tmp_path / "start"
        owners = ("proc-a", "proc-b")
        processes = [subprocess.Popen([sys.executable, "-c", TICKER, settings.model_dump_json(), owner, str(start),
                                       *ticks], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for owner in owners]
        deadline = time.monotonic() + 300
        while not all(Path(f"{start}.{owner}").exists() for owner in owners):
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a ticker did not start"
            time.sleep(0.05)
        start.touch()
        fired = []
        for process in processes:
            out, err = process.communicate(timeout=600)
            assert process.returncode == 0, err
            fired.append(json.loads(out.strip().splitlines()[-1]))
        with open_service(settings, workers=False, scheduler=False) as ctx, Session(ctx.engine) as session:
            runs = session.exec(select(func.count()).select_from(ScheduleRun)).one()
            started = session.exec(select(func.count()).select_from(ScheduleRun)
                                   .where(ScheduleRun.state == "started")).one()
            jobs = session.exec(select(func.count()).select_from(Job)).one()
    assert sum(fired) == SCHEDULES and runs == SCHEDULES and started == SCHEDULES and jobs == SCHEDULES
    print(f"\n[schedules] two processes fired {fired[0]} + {fired[1]} = {sum(fired)} of {SCHEDULES} due firings; "
          f"{jobs} jobs started")
