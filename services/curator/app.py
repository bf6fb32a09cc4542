"""The curator service's HTTP app: `create_app(settings)` wires the dataset routes to a `CuratorService`
(services/curator/service.py holds the logic).

    ssb serve curator --port 8001          (cli/serve_command.py runs this app on uvicorn)
    curl -F file=@problems.jsonl -F 'options={"k": 4}' http://127.0.0.1:8001/v1/datasets

`POST /v1/datasets` takes a JSONL or Parquet file (multipart: `file`, optional `options` as JSON and `name`) or a
JSON body `{"rows": [...], "options": {...}, "name": ...}`. The whole upload is checked before anything is stored:
a bad row rejects it with 422 naming every bad row (up to ten), duplicate ids too; over `SSB_MAX_UPLOAD_BYTES` or
`SSB_MAX_PROBLEMS`, 413. With an `Idempotency-Key` header, an upload sent again (its answer lost) answers as the first
did and creates nothing (`ssb submit` sends one, and sends again when the curator does not answer).
Errors share one envelope with the other services (services/http.py); with `SSB_CURATOR_API_KEY` set, every endpoint
but the probes and the API docs needs `Authorization: Bearer <key>`. `/metrics` is Prometheus text: each dataset's
problems by state, the queue and its workers, and this service's requests.
"""

from __future__ import annotations

import logging
from typing import Annotated, get_args

from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from services.curator.service import CurationOverview, CuratorService
from services.curator.settings import CuratorSettings
from services.errors import ServiceError
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
from shared.curator_api import (
    DATASET_NAME_MAX_LENGTH,
    DatasetCreated,
    DatasetList,
    DatasetOptions,
    DatasetRows,
    DatasetState,
    DatasetStatus,
    NewDatasetOptions,
)
from shared.datasets import DatasetError, DatasetTooLarge, parse_problem_file, parse_problem_rows
from shared.workers import REDIS_UNAVAILABLE

log = logging.getLogger("ssb.curator")

ERROR_RESPONSES = error_responses(401, 404, 413, 422, 503)
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[!-~]+$",
        description="Any new value per upload (e.g. a UUID): the same upload sent again with it within 24 hours (its "
        "answer lost) answers as the first did and creates nothing; sent with another upload, 422.",
    ),
]
FORM_PARTS = ("file", "options", "name")
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": DatasetRows.model_json_schema(ref_template="#/components/schemas/{model}")},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "A .jsonl or .parquet file."},
                        "options": {"type": "string", "description": "DatasetOptions as JSON."},
                        "name": {"type": "string", "maxLength": DATASET_NAME_MAX_LENGTH},
                    },
                }
            },
        },
    }
}


def service_of(request: Request) -> CuratorService:
    return request.app.state.service


router = APIRouter()


@router.get("/metrics", tags=["probes"], response_class=Response, responses=error_responses(401))
def metrics(request: Request) -> Response:
    """Prometheus text: every dataset's problems by state and its tokens/s, the datasets by state, the jobs waiting and
    the workers listening, then this service's requests."""
    overview = service_of(request).overview()
    return metrics_response(curation_metrics(overview) + request.app.state.metrics.exposition())


def curation_metrics(overview: CurationOverview) -> bytes:
    registry = CollectorRegistry()
    problems = Gauge("ssb_curator_problems", "Problems by dataset and state (the funnel: queued, running, paired, "
                     "each drop reason, failed, cancelled).", ["dataset", "state"], registry=registry)
    rate = Gauge("ssb_curator_tokens_per_second", "Tokens the teacher generated per second of the dataset's curation.",
                 ["dataset"], registry=registry)
    datasets = Gauge("ssb_curator_datasets", "Datasets by state.", ["state"], registry=registry)
    Gauge("ssb_curator_queued_jobs", "Jobs waiting in the curation queue.", registry=registry).set(overview.queued_jobs)
    Gauge("ssb_curator_workers", "Workers listening to the curation queue.", registry=registry).set(overview.workers)
    for state in get_args(DatasetState):
        datasets.labels(state).set(sum(status.state == state for status in overview.datasets))
    for status in overview.datasets:
        for state, count in status.funnel.model_dump().items():
            problems.labels(status.id, state).set(count)
        rate.labels(status.id).set(status.tokens_per_second)
    return generate_latest(registry)


@router.post(
    "/v1/datasets",
    status_code=201,
    response_model=DatasetCreated,
    responses=ERROR_RESPONSES,
    openapi_extra=UPLOAD_BODY,
    tags=["datasets"],
)
async def create_dataset(request: Request, idempotency_key: IdempotencyKey = None):
    """Upload problems (a JSONL or Parquet file, or JSON rows) with curation options; every problem is queued."""
    problems, options, name = await read_upload(request)
    return await run_in_threadpool(service_of(request).create_dataset, problems, options, name, idempotency_key)


@router.get("/v1/datasets", response_model=DatasetList, responses=ERROR_RESPONSES, tags=["datasets"])
def list_datasets(request: Request):
    """Every dataset with its status and funnel, oldest first."""
    return service_of(request).list_datasets()


@router.get("/v1/datasets/{dataset_id}", response_model=DatasetStatus, responses=ERROR_RESPONSES, tags=["datasets"])
def dataset_status(dataset_id: str, request: Request):
    """Status, the funnel (its counts add up to the problems), tokens/s, problems/minute and time left."""
    return service_of(request).status(dataset_id)


@router.get("/v1/datasets/{dataset_id}/pairs", responses=ERROR_RESPONSES, tags=["datasets"])
def dataset_pairs(dataset_id: str, request: Request) -> StreamingResponse:
    """The verified pairs so far as JSONL, streamed (the format of `ssb pairs export`)."""
    return StreamingResponse(service_of(request).pair_lines(dataset_id), media_type="application/x-ndjson")


@router.get("/v1/datasets/{dataset_id}/dropped", responses=ERROR_RESPONSES, tags=["datasets"])
def dataset_dropped(dataset_id: str, request: Request) -> StreamingResponse:
    """The problems that gave no pair, and why, as JSONL."""
    return StreamingResponse(service_of(request).dropped_lines(dataset_id), media_type="application/x-ndjson")


@router.delete("/v1/datasets/{dataset_id}", response_model=DatasetStatus, responses=ERROR_RESPONSES, tags=["datasets"])
def cancel_dataset(dataset_id: str, request: Request):
    """Cancel what has not started (those problems end `cancelled`); running jobs finish; no training run starts."""
    return service_of(request).cancel(dataset_id)


async def read_upload(request: Request) -> tuple[list, DatasetOptions, str | None]:
    """The upload's problems, options and name, all checked; raises ServiceError (413, 422) naming what is wrong."""
    body = await request.body()  # over SSB_MAX_UPLOAD_BYTES: refused with 413 as it arrives (`LimitRequestBodies`)
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await read_form(Request(request.scope, replay(body)))
        rows = DatasetRows.model_validate_json(body)
        check_training_request(rows.options)
        cap = problem_cap(request)
        return await run_in_threadpool(parse_problem_rows, rows.rows, max_problems=cap), rows.options, rows.name
    except ValidationError as exc:
        raise validation_refusal(exc) from exc
    except DatasetTooLarge as exc:
        raise ServiceError(413, str(exc), "too_large", "file") from exc
    except DatasetError as exc:
        raise ServiceError(422, f"the dataset was rejected whole:\n{exc}", "invalid_dataset", "file") from exc


def replay(body: bytes):
    """An ASGI `receive` that hands over an already read body, so the form parser can read it again."""

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def read_form(request: Request) -> tuple[list, DatasetOptions, str | None]:
    """A multipart upload: a `file` part, optional `options` (JSON) and `name`; any other part is refused."""
    async with request.form() as form:
        unknown = sorted(set(form.keys()) - set(FORM_PARTS))
        if unknown:
            message = f"unknown form parts {unknown}; a multipart upload has {list(FORM_PARTS)}"
            raise ServiceError(422, message, "invalid_request", unknown[0])
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            message = "a multipart upload needs a `file` part (.jsonl or .parquet)"
            raise ServiceError(422, message, "invalid_request", "file")
        for part in ("options", "name"):
            if isinstance(form.get(part), UploadFile):
                raise ServiceError(422, f"`{part}` is a text part, not a file", "invalid_request", part)
        options = read_options(form.get("options"))
        name = form.get("name")
        if name and len(name) > DATASET_NAME_MAX_LENGTH:
            message = f"name: at most {DATASET_NAME_MAX_LENGTH} characters, got {len(name)}"
            raise ServiceError(422, message, "invalid_request", "name")
        name = name or (upload.filename or "")[:DATASET_NAME_MAX_LENGTH]
        content = await upload.read()
        limit = request.app.state.settings.max_upload_bytes  # what the problems may take once read, as for JSONL
        problems = await run_in_threadpool(
            parse_problem_file, content, upload.filename or "upload.jsonl", max_read_bytes=limit,
            max_problems=problem_cap(request),
        )
        return problems, options, name or None


def problem_cap(request: Request) -> int:
    """How many problems an upload may hold, refused (413) at the first one past it rather than after holding them
    all: `SSB_MAX_PROBLEMS`, whatever `limit` keeps of them (every problem uploaded is read and checked, so a `limit`
    must not lift the bound on what is read)."""
    return request.app.state.settings.max_problems


def read_options(raw: str | None) -> NewDatasetOptions:
    """A multipart upload's `options` part (JSON), checked as the JSON body's are."""
    try:
        options = NewDatasetOptions.model_validate_json(raw) if raw else NewDatasetOptions()
    except ValidationError as exc:
        raise validation_refusal(exc, ("options",)) from exc
    check_training_request(options)
    return options


def validation_refusal(exc: ValidationError, prefix: tuple = ()) -> ServiceError:
    """The 422 naming every field pydantic refused (`prefix`: where the validated object sits in the upload)."""
    errors = exc.errors()
    where = ".".join(str(part) for part in (*prefix, *errors[0]["loc"])) or None
    messages = [f"{'.'.join(str(p) for p in (*prefix, *e['loc'])) or 'body'}: {e['msg']}" for e in errors]
    return ServiceError(422, "; ".join(messages), "invalid_request", where)


def check_training_request(options: DatasetOptions) -> None:
    """`options.train` checked now against the trainer's own request schema, as the trainer will read it when curation
    ends: a mistake is a 422 at upload, not a `training_error` hours later."""
    if options.train is None:
        return
    from services.trainer.schemas import RunRequest  # the trainer's wire schema: pydantic only, no torch

    if "dataset_id" in options.train:
        message = "options.train.dataset_id: set by the curator (this dataset's id); leave it out"
        raise ServiceError(422, message, "invalid_request", "options.train.dataset_id")
    try:
        RunRequest.model_validate({**options.train, "dataset_id": "this-dataset"})
    except ValidationError as exc:
        raise validation_refusal(exc, ("options", "train")) from exc


def create_app(settings: CuratorSettings | None = None, service: CuratorService | None = None) -> FastAPI:
    """The curator app, on `service` (or one built from `settings`: Redis is connected lazily, on first use)."""
    settings = settings or CuratorSettings()
    app = FastAPI(
        title="SSB curator",
        version="1",
        description="Datasets in over HTTP; RQ workers turn each problem into a verified teacher/student pair "
        "through the teacher service, or record why not.",
    )
    app.state.settings = settings
    app.state.service = service or CuratorService(settings)
    app.include_router(probes(lambda request: service_of(request).readiness_problem(), "Redis answers"))
    app.include_router(router)
    app.state.metrics = RequestMetrics("curator")
    register_error_handlers(app, log, unavailable=REDIS_UNAVAILABLE)
    app.add_middleware(LimitRequestBodies, max_bytes=settings.max_upload_bytes)
    require_bearer_key(app, settings.curator_key())
    measure_requests(app, app.state.metrics)
    return app
