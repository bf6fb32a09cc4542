"""What the services' apps share (services/http.py), on a small app of its own: every error in one envelope, the
bearer-key gate. Each service's own tests check the same through its real app."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from services.errors import ServiceError
from services.http import DOCS, PROBES, probes, register_error_handlers, require_bearer_key

KEY = "s3cret"


class Body(BaseModel):
    count: int


def make_app(key: str | None = None) -> FastAPI:
    app = FastAPI()
    app.state.problem = None
    app.include_router(probes(lambda request: request.app.state.problem, "the test says so", retry_after_seconds=7))

    @app.post("/v1/things")
    def things(body: Body) -> dict:
        return {"count": body.count}

    @app.get("/v1/busy")
    def busy() -> dict:
        raise ServiceError(429, "too many requests pending", "overloaded")

    @app.get("/v1/missing")
    def missing() -> dict:
        raise ServiceError(404, "no thing 'x'", "not_found", "thing_id")

    @app.get("/v1/broken")
    def broken() -> dict:
        raise RuntimeError("a bug")

    register_error_handlers(app, logging.getLogger("test"), retry_after_seconds=5)
    require_bearer_key(app, key, open_paths=(*PROBES, *DOCS))
    return app


@pytest.fixture
def client():
    return TestClient(make_app(), raise_server_exceptions=False)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == response.status_code
    return body["error"]


def test_a_bad_field_is_a_422_that_names_it(client):
    error = error_of(client.post("/v1/things", json={"count": "many"}))
    assert error["type"] == "invalid_request" and error["param"] == "count"
    assert error["message"].startswith("count: ")


def test_refusals_keep_their_status_type_and_field(client):
    missing = client.get("/v1/missing")
    assert missing.status_code == 404
    assert error_of(missing) == {"message": "no thing 'x'", "type": "not_found", "param": "thing_id", "code": 404}
    busy = client.get("/v1/busy")
    assert busy.status_code == 429 and busy.headers["retry-after"] == "5" and error_of(busy)["type"] == "overloaded"


def test_unknown_paths_and_unexpected_errors_answer_in_the_envelope(client):
    assert error_of(client.get("/v1/nowhere"))["type"] == "http_error"
    broken = client.get("/v1/broken")
    assert broken.status_code == 500 and error_of(broken) == {
        "message": "internal error: RuntimeError", "type": "internal_error", "param": None, "code": 500,
    }


def test_with_a_key_only_the_open_paths_answer_without_it():
    client = TestClient(make_app(KEY))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        refused = client.post("/v1/things", json={"count": 1}, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert error_of(refused)["type"] == "unauthorized"
    assert client.post("/v1/things", json={"count": 1}, headers={"Authorization": f"Bearer {KEY}"}).json() == {
        "count": 1
    }
    assert client.get("/healthz").status_code == 200 and client.get("/openapi.json").status_code == 200


def test_without_a_key_nothing_is_checked(client):
    assert client.post("/v1/things", json={"count": 2}).json() == {"count": 2}


def test_the_probes_say_why_the_service_is_not_ready(client):
    assert client.get("/healthz").json() == {"status": "ok"} and client.get("/readyz").json() == {"status": "ready"}
    client.app.state.problem = "Redis does not answer"
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == "7"
    assert error_of(not_ready) == {"message": "Redis does not answer", "type": "not_ready", "param": None, "code": 503}
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("service", ["curator", "trainer"])
def test_a_lost_redis_is_a_503_with_retry_after_on_the_real_apps(service):
    """Redis down is the service's state out of reach, not a bug: 503 and a time to come back, in the envelope."""
    from tests.teacher_server import free_port

    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    if service == "curator":
        from services.curator.app import create_app
        from services.curator.settings import CuratorSettings

        app, path = create_app(CuratorSettings(redis_url=unreachable)), "/v1/datasets"
    else:
        from services.trainer.app import create_app
        from services.trainer.settings import TrainerSettings

        app, path = create_app(TrainerSettings(redis_url=unreachable)), "/v1/runs"
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get(path)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "ConnectionError" in error_of(response)["message"]


def test_an_unexpected_error_is_counted_as_the_500_it_is_answered_with():
    """Starlette answers an unexpected error past every middleware: the request metrics still count it."""
    from services.http import RequestMetrics, measure_requests
    from tests.prometheus_text import metric

    app = make_app()
    metrics = RequestMetrics("test")
    measure_requests(app, metrics)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/v1/broken").status_code == 500
    text = metrics.exposition().decode()
    assert metric(text, "ssb_test_errors_total", 'endpoint="/v1/broken",status="500"') == 1
    assert metric(text, "ssb_test_requests_total", 'endpoint="/v1/broken",status="500"') == 1
