"""The REST transport under /v1: thin routes over `tools/`, bearer keys, errors as JSON."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse

from server import auth
from server.context import ServiceContext, ServiceRef
from server.errors import WeightsmithError
from server.models import Agent
from tools import datasets as dataset_tools
from tools import jobs as job_tools
from tools import models as model_tools
from tools import quota as quota_tools
from tools.datasets import DatasetList, UploadDatasetRequest, ValidationView
from tools.jobs import EventPage, JobList, MetricHistory
from tools.launch_training import LaunchResult, LaunchTrainingRequest, launch_training
from tools.models import ModelList
from tools.quota import Quota
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


@router.get("/quota", response_model=Quota, tags=["agents"])
def get_quota(service: Service, agent: CurrentAgent) -> Quota:
    return quota_tools.get_quota(service, agent)


async def error_handler(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, WeightsmithError)
    return JSONResponse(status_code=err.http_status, content={"error": err.to_dict()})
