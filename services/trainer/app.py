"""The trainer service's HTTP app: `create_app(settings)` assembles routes, errors and auth around a `TrainerService`
(services/trainer/service.py holds the logic; the routes here only wire). Training and evaluation run in train
workers (`ssb worker train`), which take the jobs this service queues in Redis.

    ssb serve trainer --port 8002          (cli/serve_command.py runs this app on uvicorn)

Errors share one envelope with the other services (services/http.py): 422 names the bad field, 404 an unknown id, 409 a
conflict (an existing run id with other settings, a new run id that an adapter already has, an adapter not trained yet),
413 a body over `SSB_MAX_REQUEST_BYTES`. With `SSB_TRAINER_API_KEY` set, every endpoint but the two probes and the API
docs (`/docs`, `/redoc`, `/openapi.json`) needs `Authorization: Bearer <key>`, compared in constant time. `/metrics` is
Prometheus text: runs and evaluations by status, running runs' step and loss, the queues and their workers, and this
service's requests.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import get_args

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from services.http import (
    LimitRequestBodies,
    RequestMetrics,
    error_responses,
    measure_requests,
    metrics_response,
    probes,
    register_error_handlers,
    require_bearer_key,
)
from services.trainer.schemas import (
    EvalCreated,
    EvalRequest,
    EvalStatusName,
    Evaluation,
    Run,
    RunCreated,
    RunList,
    RunRequest,
    RunStatusName,
)
from services.trainer.service import TrainerOverview, TrainerService
from services.trainer.settings import TrainerSettings
from shared.workers import REDIS_UNAVAILABLE, connect_redis

log = logging.getLogger("ssb.trainer")

ERROR_RESPONSES = error_responses(401, 404, 409, 413, 422, 503)


def service_of(request: Request) -> TrainerService:
    return request.app.state.service


router = APIRouter()


@router.get("/metrics", tags=["probes"], response_class=Response, responses=error_responses(401))
def metrics(request: Request) -> Response:
    """Prometheus text: runs and evaluations by status, each running run's step and loss, the jobs waiting and the
    train workers, then this service's requests."""
    overview = service_of(request).overview()
    return metrics_response(training_metrics(overview) + request.app.state.metrics.exposition())


def training_metrics(overview: TrainerOverview) -> bytes:
    registry = CollectorRegistry()
    runs = Gauge("ssb_trainer_runs", "Runs by status.", ["status"], registry=registry)
    evaluations = Gauge("ssb_trainer_evaluations", "Evaluations by status.", ["status"], registry=registry)
    queued = Gauge("ssb_trainer_queued_jobs", "Jobs waiting, by queue.", ["queue"], registry=registry)
    Gauge("ssb_trainer_workers", "Workers listening to the train queue.", registry=registry).set(overview.workers)
    step = Gauge("ssb_trainer_run_step", "A running run's optimizer steps done.", ["run"], registry=registry)
    total = Gauge("ssb_trainer_run_total_steps", "A running run's optimizer steps in all.", ["run"], registry=registry)
    loss = Gauge("ssb_trainer_run_loss", "A running run's latest logged loss.", ["run"], registry=registry)
    for status in get_args(RunStatusName):
        runs.labels(status).set(sum(run.status == status for run in overview.runs))
    for status in get_args(EvalStatusName):
        evaluations.labels(status).set(overview.evaluations_by_status.get(status, 0))
    for kind, count in overview.queued_jobs.items():
        queued.labels(kind).set(count)
    for run in overview.runs:
        if run.status == "running":
            step.labels(run.id).set(run.step)
            if run.total_steps is not None:
                total.labels(run.id).set(run.total_steps)
            if run.metrics and run.metrics.get("loss") is not None:
                loss.labels(run.id).set(run.metrics["loss"])
    return generate_latest(registry)


@router.post("/v1/runs", status_code=202, response_model=RunCreated, responses=ERROR_RESPONSES, tags=["runs"])
def create_run(body: RunRequest, request: Request, response: Response):
    """Queue a training run on a curated dataset (or a pair store inside the data directory)."""
    run, created = service_of(request).create_run(body)
    response.headers["Location"] = f"/v1/runs/{run.id}"
    return RunCreated(id=run.id, status=run.status, url=f"/v1/runs/{run.id}")


@router.get("/v1/runs", response_model=RunList, responses=ERROR_RESPONSES, tags=["runs"])
def list_runs(request: Request, limit: int = Query(default=100, ge=1, le=1000, description="Most runs returned.")):
    """Runs, newest first."""
    return RunList(runs=service_of(request).list_runs(limit))


@router.get("/v1/runs/{run_id}", response_model=Run, responses=ERROR_RESPONSES, tags=["runs"])
def get_run(run_id: str, request: Request):
    """Status, step of total, latest metrics, time left, round and parent, and whether it resumed."""
    return service_of(request).get_run(run_id)


@router.delete("/v1/runs/{run_id}", response_model=Run, responses=ERROR_RESPONSES, tags=["runs"])
def cancel_run(run_id: str, request: Request):
    """Cancel a queued or running run: it ends `cancelled` (409 if it already succeeded or failed); a queued one never
    starts, a running one stops before its next metrics line or checkpoint (every `log_every` steps), keeping its
    checkpoints; no adapter is published."""
    return service_of(request).cancel_run(run_id)


@router.get("/v1/runs/{run_id}/metrics", responses=ERROR_RESPONSES, tags=["runs"],
            response_class=Response)
def get_metrics(run_id: str, request: Request):
    """The per-step metrics as JSONL (one line per logged optimizer step)."""
    return Response(service_of(request).metrics_jsonl(run_id), media_type="application/x-ndjson")


@router.get("/v1/runs/{run_id}/curve.png", responses=ERROR_RESPONSES, tags=["runs"], response_class=Response)
def get_curve(run_id: str, request: Request):
    """Loss, gradient norm and explanation length against step (drawn from the steps so far while running)."""
    return Response(service_of(request).curve_png(run_id), media_type="image/png")


@router.get("/v1/runs/{run_id}/adapter", responses=ERROR_RESPONSES, tags=["runs"],
            response_class=StreamingResponse)
def get_adapter(run_id: str, request: Request):
    """The adapter as a gzipped tar: `<run id>/adapter_config.json`, `adapter_model.safetensors` (PEFT) and
    `training_config.json`."""
    chunks = service_of(request).adapter_archive(run_id)
    headers = {"Content-Disposition": f'attachment; filename="{run_id}.tar.gz"'}
    return StreamingResponse(chunks, media_type="application/gzip", headers=headers)


@router.post("/v1/evals", status_code=202, response_model=EvalCreated, responses=ERROR_RESPONSES, tags=["evals"])
def create_eval(body: EvalRequest, request: Request, response: Response):
    """Queue an evaluation of the base model and/or adapters on a benchmark or uploaded problems."""
    evaluation, _ = service_of(request).create_evaluation(body)
    response.headers["Location"] = f"/v1/evals/{evaluation.id}"
    return EvalCreated(id=evaluation.id, status=evaluation.status, url=f"/v1/evals/{evaluation.id}")


@router.get("/v1/evals/{eval_id}", response_model=Evaluation, responses=ERROR_RESPONSES, tags=["evals"])
def get_eval(
    eval_id: str,
    request: Request,
    problems: bool = Query(default=True, description="Include every problem's answers (large for big benchmarks)."),
):
    """Status, progress, and once done the accuracy table and per-problem results."""
    return service_of(request).get_evaluation(eval_id, problems=problems)


def create_app(settings: TrainerSettings | None = None, service: TrainerService | None = None) -> FastAPI:
    """The trainer app over `service` (default: one on the settings' Redis, connected at start-up)."""
    settings = settings or TrainerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = service or TrainerService(settings, connect_redis(settings.redis_url))
        try:
            yield
        finally:
            if service is None:
                app.state.service.redis.close()

    app = FastAPI(
        title="SSB trainer",
        version="1",
        description="LoRA distillation runs on curated datasets (queued to train workers), their metrics, curves and "
        "adapters; evaluations of the base model and adapters through the teacher service.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(probes(lambda request: service_of(request).readiness_problem(), "Redis answers"))
    app.include_router(router)
    app.state.metrics = RequestMetrics("trainer")
    register_error_handlers(app, log, unavailable=REDIS_UNAVAILABLE)
    app.add_middleware(LimitRequestBodies, max_bytes=settings.max_request_bytes)
    require_bearer_key(app, settings.trainer_key())
    measure_requests(app, app.state.metrics)
    return app
