"""What the three services' HTTP apps share: one error envelope for every error (`shared.teacher_api.ErrorResponse`;
a `ServiceError` from services/errors.py answers with its own status), the bearer-key gate, and Prometheus metrics of
the requests.

    register_error_handlers(app, log)                      bad fields 422 naming the field, refusals by their status,
                                                           unexpected errors 500 (logged), all in the envelope
    require_bearer_key(app, key)                           every path but the probes and the API's own docs needs
                                                           `Authorization: Bearer <key>`, compared in constant time
    app.add_middleware(LimitRequestBodies, max_bytes=n)    a body over n bytes is refused with 413 as it arrives
    measure_requests(app, RequestMetrics("curator"))       requests, errors, latency and response sizes per endpoint
                                                           (`ssb_curator_requests_total`, ...), 401s and 503s included
    app.include_router(probes(readiness_problem, "Redis answers"))      /healthz and /readyz
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import ServiceError
from shared.teacher_api import ErrorDetail, ErrorResponse

PROBES = ("/healthz", "/readyz")
DOCS = ("/docs", "/redoc", "/openapi.json")
OPEN_PATHS = (*PROBES, *DOCS)  # what a key never guards: the probes, and the API's description (no data in it)


def probes(
    readiness_problem: Callable[[Request], str | None], ready_when: str, retry_after_seconds: int = 2
) -> APIRouter:
    """`/healthz` (the process answers) and `/readyz`: 200 when `readiness_problem(request)` (run in a thread: it may
    block on Redis) finds none, else 503 saying it, with Retry-After."""
    router = APIRouter(tags=["probes"])

    @router.get("/healthz")
    async def healthz() -> dict:
        """The process answers."""
        return {"status": "ok"}

    async def readyz(request: Request):
        problem = await run_in_threadpool(readiness_problem, request)
        if problem:
            return error_response(503, problem, "not_ready", headers={"Retry-After": str(retry_after_seconds)})
        return {"status": "ready"}

    router.add_api_route("/readyz", readyz, methods=["GET"], responses=error_responses(503),
                         description=f"200 when {ready_when}; 503 otherwise.")
    return router


def error_responses(*statuses: int) -> dict:
    """The `responses=` of a route: these statuses answer in the envelope (for the OpenAPI schema)."""
    return {status: {"model": ErrorResponse} for status in statuses}


def error_response(status: int, message: str, type_: str, param: str | None = None, headers=None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def refusal_response(exc: ServiceError, retry_after_seconds: int | None = None) -> JSONResponse:
    """A refusal in the envelope, with Retry-After on a 429 when `retry_after_seconds` is given."""
    headers = {"Retry-After": str(retry_after_seconds)} if exc.status == 429 and retry_after_seconds else None
    return error_response(exc.status, exc.message, exc.type, exc.param, headers)


def field_path(location) -> str:
    """`body.rows.3.question` -> `rows.3.question`: a field as the client named it."""
    return ".".join(str(part) for part in location if part not in ("body", "query", "path"))


def register_error_handlers(
    app: FastAPI,
    log: logging.Logger,
    *,
    retry_after_seconds: int | None = None,
    unavailable: tuple[type[Exception], ...] = (),
) -> None:
    """Every error in one envelope: bad fields 422 (named), refusals by their status (429 with Retry-After when
    `retry_after_seconds` is given), HTTP errors by theirs, the `unavailable` errors (a store the service needs is
    unreachable) 503 with Retry-After, unexpected ones 500 (logged with their traceback)."""

    @app.exception_handler(RequestValidationError)
    async def invalid_fields(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        messages = [f"{field_path(e['loc']) or 'body'}: {e['msg']}" for e in errors]
        return error_response(422, "; ".join(messages), "invalid_request", field_path(errors[0]["loc"]) or None)

    @app.exception_handler(ServiceError)
    async def refused(request: Request, exc: ServiceError) -> JSONResponse:
        return refusal_response(exc, retry_after_seconds)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "too_large" if isinstance(exc, BodyTooLarge) else "http_error"
        return error_response(exc.status_code, str(exc.detail), type_, headers=exc.headers)

    async def dependency_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s on %s: %s", type(exc).__name__, request.url.path, exc)
        message = f"the service cannot reach what it stores its state in ({type(exc).__name__}); try again shortly"
        return error_response(503, message, "unavailable", headers={"Retry-After": "5"})

    for error in unavailable:
        app.add_exception_handler(error, dependency_down)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


class BodyTooLarge(StarletteHTTPException):
    """A request body over the service's limit: 413."""


class LimitRequestBodies:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 in the envelope, by its declared length
    before any of it is read, or as soon as what arrives passes the limit (a body sent without a length): never held
    whole first. Whatever reads the body meets `BodyTooLarge`: a route's body parsing hands it to the app's handlers;
    from a middleware inside this one that reads the body itself, it is answered here. The probes and GETs read no
    body and pass untouched."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        received = 0
        responding = False

        async def limited_receive():
            nonlocal received
            if responding:  # a streaming response listens for the client's disconnect: no body is read any more
                return await receive()
            if declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(413, f"the request body is {int(declared)} bytes; at most {limit}")
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(413, f"the request body is over {limit} bytes; at most {limit}")
            return message

        async def watched_send(message) -> None:
            nonlocal responding
            responding = responding or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as exc:
            if responding:
                raise
            await error_response(413, str(exc.detail), "too_large")(scope, receive, send)


def bearer_refusal(
    request: Request, key: str | None, open_paths: tuple[str, ...] = OPEN_PATHS
) -> JSONResponse | None:
    """The 401 for a request without `Authorization: Bearer <key>` (compared in constant time), or None: the key is
    right, none is configured, or the path is open."""
    if not key or request.url.path in open_paths:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
        return None
    return error_response(
        401, "a valid `Authorization: Bearer <key>` header is needed", "unauthorized",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_bearer_key(app: FastAPI, key: str | None, open_paths: tuple[str, ...] = OPEN_PATHS) -> None:
    """With a key, every request but those to `open_paths` needs `Authorization: Bearer <key>`; 401 otherwise.
    Without one, nothing is checked."""
    if not key:
        return

    @app.middleware("http")
    async def gate(request: Request, call_next):
        return bearer_refusal(request, key, open_paths) or await call_next(request)


class RequestMetrics:
    """One service's requests by endpoint and status, errors, latency and response sizes, in a registry of its own
    (a service adds its own metrics to `registry`)."""

    def __init__(self, service: str):
        self.registry = CollectorRegistry()
        labels = ["endpoint", "status"]
        self.requests = Counter(f"ssb_{service}_requests", "Requests by endpoint and status.", labels,
                                registry=self.registry)
        self.errors = Counter(f"ssb_{service}_errors", "Responses with a 4xx or 5xx status.", labels,
                              registry=self.registry)
        self.seconds = Histogram(f"ssb_{service}_request_seconds", "Time to answer, by endpoint.", ["endpoint"],
                                 registry=self.registry)
        self.response_bytes = Histogram(
            f"ssb_{service}_response_bytes",
            "Response body size, by endpoint.",
            ["endpoint"],
            buckets=(1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8),
            registry=self.registry,
        )

    def observe(self, endpoint: str, status: int, seconds: float, size: int | None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.seconds.labels(endpoint).observe(seconds)
        if size is not None:
            self.response_bytes.labels(endpoint).observe(size)

    def observe_response(self, request: Request, response: Response | None, started: float) -> None:
        """A finished request, by its route's path (`unmatched` when none matched); `started` from perf_counter. No
        response: the route raised an unexpected error, which the outermost error handler answers with a 500."""
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        if response is None:
            self.observe(endpoint, 500, time.perf_counter() - started, None)
            return
        size = response.headers.get("content-length")
        self.observe(endpoint, response.status_code, time.perf_counter() - started, int(size) if size else None)

    async def measure(self, request: Request, answer: Callable[[], Awaitable[Response]]) -> Response:
        """`answer()` observed: its response, or a 500 for an unexpected error (which Starlette's outermost handler
        answers, past every middleware)."""
        started = time.perf_counter()
        try:
            response = await answer()
        except Exception:
            self.observe_response(request, None, started)
            raise
        self.observe_response(request, response, started)
        return response

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def measure_requests(app: FastAPI, metrics: RequestMetrics) -> None:
    """Observe every request into `metrics`, by its route's path (`unmatched` when none matched). Register it after
    every other middleware, so that it is the outermost and sees their answers (401, 503) too."""

    @app.middleware("http")
    async def measure(request: Request, call_next):
        return await metrics.measure(request, lambda: call_next(request))


def metrics_response(body: bytes) -> Response:
    """Prometheus text exposition."""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
