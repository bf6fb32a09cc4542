"""The teacher service's HTTP app: `create_app(settings, engine=None)` assembles routes, errors, auth and metrics around
a `TeacherService` (services/teacher/service.py holds the logic; the routes here only wire).

    ssb serve teacher --port 8000          (cli/serve_command.py runs this app on uvicorn)

The engine is built in the app's lifespan, in a thread, so `/healthz`, `/metrics` and the API docs answer at once while
`/readyz` and every other endpoint say 503 with Retry-After until the engine is up, and again if it dies (a served
teacher then ends within seconds, `on_engine_death`). Uvicorn's SIGTERM/SIGINT handling ends the lifespan, which shuts
the engine's processes down. Errors share one envelope with the other services (services/http.py); with
`SSB_TEACHER_API_KEY` set, every endpoint but the two probes and the API docs (`/docs`, `/redoc`, `/openapi.json`) needs
`Authorization: Bearer <key>`, compared in constant time. A request body over `SSB_MAX_REQUEST_BYTES` is a 413, refused
as it arrives. `/metrics` is vLLM's Prometheus registry plus this service's requests, errors, latency and response
sizes per endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager, suppress

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Gauge, generate_latest

from services.http import (
    DOCS,
    PROBES,
    LimitRequestBodies,
    RequestMetrics,
    bearer_refusal,
    error_response,
    error_responses,
    metrics_response,
    register_error_handlers,
)
from services.teacher.openai_routes import (
    OpenAIAdmission,
    attach_openai_routers,
    init_openai_state,
    register_vllm_error_handler,
)
from services.teacher.service import TeacherService
from services.teacher.settings import TeacherSettings
from shared.teacher_api import (
    START_FAILED,
    AdapterCard,
    AdapterLoadRequest,
    ExplanationsRequest,
    GenerationsResponse,
    LogprobsRequest,
    LogprobsResponse,
    ModelsResponse,
    RolloutsRequest,
)

log = logging.getLogger("ssb.teacher")

ALWAYS_OPEN = (*PROBES, "/metrics", *DOCS)  # answered while the engine is not ready
ENGINE_WATCH_SECONDS = 2.0  # how often a served teacher looks whether its engine still lives
ERROR_RESPONSES = error_responses(400, 401, 404, 409, 413, 422, 429, 503)


def service_of(request: Request) -> TeacherService:
    return request.app.state.service


def json_of(model) -> Response:
    """A response model as JSON, without validating it a second time (top-k payloads are large)."""
    return Response(model.model_dump_json(), media_type="application/json")


async def unless_disconnected(request: Request, work) -> Response:
    """Await `work` (a route's coroutine), cancelling it when the client disconnects first: its engine requests are
    then aborted (vLLM aborts a request whose generator is cancelled) instead of generating for nobody, and counting
    against `max_pending_requests`, while a client that timed out sends the same work again. FastAPI has read the body
    by now, so the only message left to receive is the disconnect."""
    job = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([job, listener], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (job, listener):
            task.cancel()
    if not job.done() or job.cancelled():
        log.info("%s: the client disconnected; its engine requests were aborted", request.url.path)
        return Response(status_code=499)  # nobody reads it
    return json_of(job.result())


router = APIRouter()


@router.get("/healthz", tags=["probes"])
async def healthz() -> dict:
    """The process answers (the engine may still be starting)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["probes"], responses=error_responses(503))
async def readyz(request: Request):
    """200 when the engine is up and healthy; 503 with Retry-After while it starts, or when it died (`ssb serve
    teacher` then ends within seconds); 503 of type `start_failed`, without, when it failed to start (it never will:
    restart the service)."""
    return not_ready_response(request.app) or {"status": "ready", "model": service_of(request).model_name}


@router.post("/v1/rollouts", response_model=GenerationsResponse, responses=ERROR_RESPONSES, tags=["teacher"])
async def rollouts(body: RolloutsRequest, request: Request):
    """Sample `n` answers per bare question with the student prompt (the paper's rollout settings by default)."""
    return await unless_disconnected(request, service_of(request).rollouts(body))


@router.post("/v1/explanations", response_model=GenerationsResponse, responses=ERROR_RESPONSES, tags=["teacher"])
async def explanations(body: ExplanationsRequest, request: Request):
    """Hinted explanations with the teacher's per-token top-k log-probabilities (raw model distribution)."""
    return await unless_disconnected(request, service_of(request).explanations(body))


@router.post("/v1/logprobs", response_model=LogprobsResponse, responses=ERROR_RESPONSES, tags=["teacher"])
async def logprobs(body: LogprobsRequest, request: Request):
    """Per reply token, its log-probability and the top-k under the prompt, in one forward pass."""
    return await unless_disconnected(request, service_of(request).logprobs(body))


@router.get("/v1/models", response_model=ModelsResponse, responses=ERROR_RESPONSES, tags=["teacher"])
async def models(request: Request):
    """The base model, its context length and vocabulary size, and the adapters loaded (OpenAI's list in `data`)."""
    return service_of(request).models()


@router.post("/v1/adapters", response_model=AdapterCard, status_code=201, responses=ERROR_RESPONSES, tags=["adapters"])
async def load_adapter(body: AdapterLoadRequest, request: Request):
    """Load a PEFT LoRA adapter from the adapters directory under a name."""
    return await service_of(request).load_adapter(body)


@router.delete("/v1/adapters/{name}", status_code=204, responses=ERROR_RESPONSES, tags=["adapters"])
async def unload_adapter(name: str, request: Request) -> Response:
    """Unload an adapter."""
    await service_of(request).unload_adapter(name)
    return Response(status_code=204)


@router.get("/metrics", tags=["probes"])
async def metrics(request: Request) -> Response:
    """Prometheus text: vLLM's registry (requests running and waiting, KV cache, tokens, latencies), then ours."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    service = request.app.state.service
    if service is not None:
        request.app.state.pending.set(service.pending)
    return metrics_response(generate_latest(get_prometheus_registry()) + request.app.state.metrics.exposition())


def readiness_problem(app: FastAPI) -> str | None:
    """Why the service cannot serve now, or None."""
    if app.state.startup_error is not None:
        return f"the engine failed to start: {app.state.startup_error}"
    if app.state.service is None:
        return "the engine is starting"
    if not app.state.service.ready:
        return "the engine has died; restart the service"
    return None


def retry_after(app: FastAPI) -> dict[str, str]:
    return {"Retry-After": str(app.state.settings.retry_after_seconds)}


def register_middleware(app: FastAPI, settings: TeacherSettings) -> None:
    """The bearer key, then readiness (503 while the engine is not up), then the route; every answer measured. One
    middleware layer: each layer of Starlette's costs every request on this hot path its own task and stream."""
    key = settings.teacher_key()

    @app.middleware("http")
    async def gate(request: Request, call_next):
        async def answer():
            return bearer_refusal(request, key) or not_ready_refusal(request) or await call_next(request)

        return await app.state.metrics.measure(request, answer)


def not_ready_refusal(request: Request) -> JSONResponse | None:
    """The 503 for a request that needs the engine while it is not up (`not_ready_response`), or None."""
    return None if request.url.path in ALWAYS_OPEN else not_ready_response(request.app)


def not_ready_response(app: FastAPI) -> JSONResponse | None:
    """None when the engine is up; else a 503 saying why: of type `start_failed` and without Retry-After when it
    failed to start (no wait will help), `not_ready` with Retry-After while it starts or after it died."""
    problem = readiness_problem(app)
    if problem is None:
        return None
    if app.state.startup_error is not None:
        return error_response(503, problem, START_FAILED)
    return error_response(503, problem, "not_ready", headers=retry_after(app))


async def start_service(app: FastAPI, settings: TeacherSettings) -> None:
    """Build the engine in a thread (the event loop keeps answering probes), then the OpenAI routes' state."""
    try:
        service = await asyncio.to_thread(TeacherService.start, settings)
        try:
            await init_openai_state(app, service)
        except BaseException:
            service.close()  # the engine's processes go with the failed start
            raise
        app.state.service = service
        log.info("teacher ready: %s", service.model_name)
    except Exception as exc:
        log.exception("the engine failed to start")
        app.state.startup_error = f"{type(exc).__name__}: {exc}"
        return
    if app.state.on_engine_death is not None and not app.state.stopping:
        await end_when_the_engine_dies(app)


async def end_when_the_engine_dies(app: FastAPI, every_seconds: float = ENGINE_WATCH_SECONDS) -> None:
    """Once the engine has died (the OOM killer took its core process), this teacher can never serve again: it ends
    (`on_engine_death`, which says whether it did: not when the server is stopping already, a signal having reached
    the engine too), so that what runs it restarts it (compose's `restart: unless-stopped`) or stops with it
    (`ssb up`), instead of answering 503 for ever."""
    while app.state.service.ready and not app.state.stopping:
        await asyncio.sleep(every_seconds)
    if not app.state.stopping and app.state.on_engine_death():
        log.error("the engine has died: the teacher stops, to be started again")
        app.state.engine_died = True


def create_app(
    settings: TeacherSettings | None = None,
    engine: TeacherService | None = None,
    on_engine_death: Callable[[], bool] | None = None,
) -> FastAPI:
    """The teacher app. With `engine` (a started `TeacherService`) it serves that; else it builds one at start-up,
    and, given `on_engine_death`, calls it once that engine has died: it ends the server and says True, or False when
    the server is stopping already (`app.state.engine_died` then says which)."""
    settings = settings or TeacherSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = None
        if engine is not None:
            await init_openai_state(app, engine)
            app.state.service = engine
        else:
            starting = asyncio.create_task(start_service(app, settings))
        try:
            yield
        finally:
            app.state.stopping = True  # an engine still being built is not watched once it is up
            if starting is not None and app.state.service is not None:
                starting.cancel()  # the watch on the engine's life, once it started
            if starting is not None:
                with suppress(asyncio.CancelledError):
                    await starting  # an engine half-built in its thread must still be shut down
            if app.state.service is not None:
                try:
                    app.state.service.close()
                except Exception:  # a dead engine may fail to stop cleanly; its processes are gone either way
                    log.exception("the engine's shutdown raised")
                log.info("engine shut down")

    app = FastAPI(
        title="SSB teacher",
        version="1",
        description="Rollouts, hinted explanations with top-k log-probabilities, scoring and LoRA adapters on one "
        "vLLM engine; vLLM's OpenAI-compatible completions on the same engine.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
    app.state.startup_error = None
    app.state.on_engine_death = on_engine_death
    app.state.engine_died = False
    app.state.stopping = False
    app.state.metrics = RequestMetrics("teacher")
    app.state.pending = Gauge(
        "ssb_teacher_pending_engine_requests", "Engine requests admitted and not finished.",
        registry=app.state.metrics.registry,
    )
    app.include_router(router)
    attach_openai_routers(app)
    register_error_handlers(app, log, retry_after_seconds=settings.retry_after_seconds)
    register_vllm_error_handler(app, error_response)
    app.add_middleware(OpenAIAdmission, retry_after_seconds=settings.retry_after_seconds)  # inside the gate below
    app.add_middleware(LimitRequestBodies, max_bytes=settings.max_request_bytes)  # around what reads bodies
    register_middleware(app, settings)
    return app
