"""The REST transport under /v1: thin routes over `tools/`, bearer keys, errors as JSON."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from server.context import ServiceContext, ServiceRef
from server.errors import WeightsmithError
from server.store import agents as auth
from server.store.tables import Agent
from tools import datasets as dataset_tools
from tools import eval_suites
from tools import jobs as job_tools
from tools import models as model_tools
from tools import quota as quota_tools
from tools import read_eval_report as reports
from tools.check_drift import DriftResult, check_drift
from tools.datasets import DatasetList, UploadDatasetRequest, ValidationView
from tools.eval_suites import SuiteList, SuiteView
from tools.generate_synthetic_data import SynthLaunch, SynthRequest, generate_synthetic_data
from tools.jobs import EventPage, JobList, MetricHistory
from tools.launch_training import LaunchResult, LaunchTrainingRequest, launch_training
from tools.models import ModelList
from tools.quota import Quota
from tools.read_eval_report import ReportView
from tools.run_eval import RunEvalRequest, RunEvalResult, run_eval
from tools.tune_hyperparameters import TuneRequest, TuneStarted, tune_hyperparameters
from tools.views import JobView


def service_dep(request: Request) -> ServiceContext:
    ref: ServiceRef = request.app.state.service
    return ref.get()


Service = Annotated[ServiceContext, Depends(service_dep)]


def agent_dep(service: Service, authorization: Annotated[str | None, Header()] = None) -> Agent:
    key = (authorization or "").removeprefix("Bearer ").strip() or None
    return auth.agent_for_key(service.engine, key)


CurrentAgent = Annotated[Agent, Depends(agent_dep)]

router = APIRouter(prefix="/v1")


@router.post("/trainings", response_model=LaunchResult, tags=["training"])
def post_training(body: LaunchTrainingRequest, service: Service, agent: CurrentAgent) -> LaunchResult:
    return launch_training(service, agent, body)


@router.post("/studies", response_model=TuneStarted, tags=["training"])
def post_study(body: TuneRequest, service: Service, agent: CurrentAgent) -> TuneStarted:
    return tune_hyperparameters(service, agent, body)


@router.get("/studies/{study_id}/trials", tags=["training"])
def get_study_trials(study_id: str, service: Service, agent: CurrentAgent) -> dict[str, Any]:
    return {"study_id": study_id, "trials": job_tools.study_trials(service, agent, study_id)}


@router.get("/jobs", response_model=JobList, tags=["jobs"])
def get_jobs(service: Service, agent: CurrentAgent, state: Annotated[list[str] | None, Query()] = None,
             kind: str | None = None, limit: int = 10, cursor: float | None = None) -> JobList:
    return job_tools.list_jobs(service, agent, state, kind, limit, cursor)


@router.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"])
def get_job(job_id: str, service: Service, agent: CurrentAgent) -> JobView:
    return job_tools.get_job(service, agent, job_id)


@router.post("/jobs/{job_id}/wait", response_model=JobView, tags=["jobs"])
async def wait_job(job_id: str, service: Service, agent: CurrentAgent, timeout_seconds: float = 45) -> JobView:
    return await job_tools.wait_for_job(service, agent, job_id, timeout_seconds)


@router.post("/jobs/{job_id}/cancel", response_model=JobView, tags=["jobs"])
def cancel_job(job_id: str, service: Service, agent: CurrentAgent) -> JobView:
    return job_tools.cancel_job(service, agent, job_id)


@router.get("/jobs/{job_id}/events", response_model=EventPage, tags=["jobs"])
def get_events(job_id: str, service: Service, agent: CurrentAgent, after_seq: int = 0, limit: int = 50,
               type: str | None = None) -> EventPage:
    return job_tools.get_job_events(service, agent, job_id, after_seq, limit, type)


@router.get("/jobs/{job_id}/metrics", response_model=MetricHistory, tags=["jobs"])
def get_metrics(job_id: str, service: Service, agent: CurrentAgent, metric: str = "loss",
                max_points: int = 200) -> MetricHistory:
    return job_tools.get_metric_history(service, agent, job_id, metric, max_points)


@router.post("/datasets", response_model=ValidationView, tags=["datasets"])
def post_dataset(body: UploadDatasetRequest, service: Service, agent: CurrentAgent) -> ValidationView:
    return dataset_tools.upload_dataset(service, agent, body)


@router.get("/datasets", response_model=DatasetList, tags=["datasets"])
def get_datasets(service: Service, agent: CurrentAgent, limit: int = 50) -> DatasetList:
    return dataset_tools.list_datasets(service, agent, limit)


@router.get("/datasets/{dataset_id}/validation", response_model=ValidationView, tags=["datasets"])
def get_validation(dataset_id: str, service: Service, agent: CurrentAgent, limit: int = 50) -> ValidationView:
    return dataset_tools.validate_dataset(service, agent, dataset_id, limit)


@router.get("/models", response_model=ModelList, tags=["models"])
def get_models(service: Service, agent: CurrentAgent, limit: int = 20) -> ModelList:
    return model_tools.list_models(service, agent, limit)


# --- issue 4: evaluation routes ---
class SuiteBody(BaseModel):
    definition: str | dict[str, Any]


@router.post("/eval-suites", response_model=SuiteView, tags=["eval"])
def post_eval_suite(body: SuiteBody, service: Service, agent: CurrentAgent) -> SuiteView:
    return eval_suites.create_eval_suite(service, agent, body.definition)


@router.get("/eval-suites", response_model=SuiteList, tags=["eval"])
def get_eval_suites(service: Service, agent: CurrentAgent, limit: int = 20) -> SuiteList:
    return eval_suites.list_eval_suites(service, agent, limit)


@router.post("/evals", response_model=RunEvalResult, tags=["eval"])
def post_eval(body: RunEvalRequest, service: Service, agent: CurrentAgent) -> RunEvalResult:
    return run_eval(service, agent, body)


@router.get("/drift", response_model=DriftResult, tags=["eval"])
def get_drift(against: str, service: Service, agent: CurrentAgent, dataset_id: str | None = None,
              suite_id: str | None = None) -> DriftResult:
    return check_drift(service, agent, against, dataset_id, suite_id)


# Before /reports/{ref}, which would also match "rep_x.html".
@router.get("/reports/{report_id}.html", response_class=HTMLResponse, tags=["eval"])
def get_report_html(report_id: str, service: Service, agent: CurrentAgent) -> HTMLResponse:
    return HTMLResponse(reports.read_eval_report_html(service, agent, report_id))


@router.get("/reports/{ref}", response_model=ReportView, tags=["eval"])
def get_report(ref: str, service: Service, agent: CurrentAgent, baseline: str | None = None,
               page: int = 0) -> ReportView:
    """A report by report, job or model id (a model known by its directory: use its report or job id)."""
    return reports.read_eval_report(service, agent, ref, baseline, page)


@router.get("/quota", response_model=Quota, tags=["agents"])
def get_quota(service: Service, agent: CurrentAgent) -> Quota:
    return quota_tools.get_quota(service, agent)


@router.post("/synthetic-data", response_model=SynthLaunch, tags=["synthetic data"])
def post_synthetic_data(body: SynthRequest, service: Service, agent: CurrentAgent) -> SynthLaunch:
    return generate_synthetic_data(service, agent, body)


async def error_handler(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, WeightsmithError)
    return JSONResponse(status_code=err.http_status, content={"error": err.to_dict()})
