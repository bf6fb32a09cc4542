"""The teacher app before its engine is up (no engine started): probes, 503 with Retry-After, auth on and off, and
the error envelope. The same app with the real engine is tested in test_service.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.teacher.app import create_app
from services.teacher.settings import TeacherSettings

KEY = "app-test-key"


@pytest.fixture(scope="module")
def open_app():
    return TestClient(create_app(TeacherSettings(retry_after_seconds=3)))


@pytest.fixture(scope="module")
def keyed_app():
    return TestClient(create_app(TeacherSettings(teacher_api_key=KEY)))


def test_healthz_answers_while_readyz_and_work_say_not_ready(open_app):
    assert open_app.get("/healthz").json() == {"status": "ok"}
    for response in (open_app.get("/readyz"), open_app.post("/v1/rollouts", json={"questions": [{"question": "q"}]})):
        assert response.status_code == 503 and response.headers["Retry-After"] == "3"
        assert response.json()["error"] == {
            "message": "the engine is starting", "type": "not_ready", "param": None, "code": 503
        }
    assert open_app.get("/v1/models").status_code == 503
    assert open_app.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 503


def test_without_a_key_nothing_asks_for_one(open_app):
    assert open_app.get("/v1/models").status_code == 503
    assert open_app.get("/metrics").status_code == 200
    assert open_app.get("/openapi.json").status_code == 200


def test_with_a_key_everything_but_the_probes_and_the_docs_needs_it(keyed_app):
    assert keyed_app.get("/healthz").status_code == 200
    assert keyed_app.get("/readyz").status_code == 503
    for path in ("/openapi.json", "/docs", "/redoc"):  # the API's description holds no data
        assert keyed_app.get(path).status_code == 200
    for path in ("/v1/models", "/metrics", "/v1/rollouts"):
        assert keyed_app.get(path).status_code == 401
        assert keyed_app.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert keyed_app.get(path, headers={"Authorization": KEY}).status_code == 401
    authorised = {"Authorization": f"Bearer {KEY}"}
    assert keyed_app.get("/metrics", headers=authorised).status_code == 200
    assert keyed_app.get("/v1/models", headers=authorised).status_code == 503
    assert KEY not in keyed_app.get("/v1/models").text


def test_openapi_documents_every_endpoint_and_field(open_app):
    schema = open_app.get("/openapi.json").json()
    for path in ("/v1/rollouts", "/v1/explanations", "/v1/logprobs", "/v1/models", "/v1/adapters",
                 "/v1/adapters/{name}", "/v1/completions", "/v1/chat/completions", "/healthz", "/readyz", "/metrics"):
        assert path in schema["paths"], path
    request = schema["components"]["schemas"]["RolloutsRequest"]
    assert all("description" in field for field in request["properties"].values())
    assert request["properties"]["questions"]["maxItems"] == 256


def test_the_engine_is_built_as_the_settings_say():
    from services.teacher.service import engine_options

    settings = TeacherSettings(
        dtype="bfloat16", kv_cache_gib=0.75, max_model_len=2048, max_logprobs=8, seed=5, enable_lora=False
    )
    options = engine_options(settings, "/models/small")
    built = (options.model, options.dtype, options.kv_cache_gib, options.max_model_len, options.max_logprobs)
    assert built == ("/models/small", "bfloat16", 0.75, 2048, 8)
    assert (options.seed, options.enable_lora) == (5, False)


def test_a_symlinked_file_in_an_adapter_directory_is_not_copied(tmp_path):
    """The engine's copy of an adapter holds its files, not what a link in it points to (outside the directory)."""
    from services.teacher.service import snapshot_adapter

    adapter = tmp_path / "adapters" / "a"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "secret").write_text("not the adapter's")
    (adapter / "adapter_model.safetensors").symlink_to(tmp_path / "secret")
    (adapter / "checkpoints").mkdir()
    copy = snapshot_adapter(adapter, tmp_path / "copy")
    assert sorted(path.name for path in copy.iterdir()) == ["adapter_config.json"]


@pytest.mark.parametrize(
    ("body", "route", "requests"),
    [({"prompt": "2 + 2 ="}, "/v1/completions", 1), ({"prompt": ["a", "b", "c"]}, "/v1/completions", 3),
     ({"prompt": [1, 2, 3]}, "/v1/completions", 1), ({"prompt": [[1, 2], [3]]}, "/v1/completions", 2),
     ({"prompt": []}, "/v1/completions", 1), ({"prompt": ["a", "b"], "n": 8}, "/v1/completions", 16),
     ({"prompt": ["a", "b"], "n": "8"}, "/v1/completions", 16), ({"prompt": "a", "n": 8.0}, "/v1/completions", 8),
     ({"prompt": "a", "n": "many"}, "/v1/completions", 1), ({"prompt": "a", "n": None}, "/v1/completions", 1),
     ({"messages": [{}] * 5}, "/v1/chat/completions", 1),
     ({"messages": [{}], "n": 4}, "/v1/chat/completions", 4),
     ({"messages": [[{}]] * 3}, "/v1/chat/completions/batch", 3),
     ({"messages": [[{}]] * 3, "n": 2}, "/v1/chat/completions/batch", 6), ([1, 2], "/v1/completions", 1),
     (None, "/v1/completions", 1)],
)
def test_an_openai_request_counts_one_engine_request_per_prompt_and_sample(body, route, requests):
    """A completion's prompts (texts, or lists of token ids; one list of ids is one prompt), a chat one, a batch chat
    its conversations, each times `n` as vLLM reads it ("8" and 8.0 are 8); anything else one, for vLLM to refuse."""
    from services.teacher.openai_routes import prompts_in, route_path

    assert prompts_in(body, route) == requests
    assert route_path({"path": "/ssb/v1/completions", "root_path": "/ssb"}) == route_path({"path": "/v1/completions"})


def test_an_engine_that_fails_to_start_says_so_for_good(tmp_path):
    """The engine cannot be built (here: no model where the settings point): `/readyz` says why, as a 503 of type
    `start_failed` without Retry-After (waiting will not help), which `ssb up` stops on (cli/supervisor.py)."""
    import time

    missing = tmp_path / "no-model-here"
    with TestClient(create_app(TeacherSettings(model=str(missing)))) as client:
        deadline = time.monotonic() + 60
        while (response := client.get("/readyz")).json()["error"]["type"] == "not_ready":
            assert time.monotonic() < deadline, response.text
            time.sleep(0.1)
        error = response.json()["error"]
        assert response.status_code == 503 and "Retry-After" not in response.headers, response.headers
        assert error["type"] == "start_failed" and error["message"].startswith("the engine failed to start: "), error
        assert str(missing) in error["message"], error
        work = client.post("/v1/rollouts", json={"questions": [{"question": "q"}]})  # refused alike
        assert work.status_code == 503 and work.json()["error"] == error and "Retry-After" not in work.headers


def test_a_teacher_stopped_while_its_engine_is_built_stops_once_it_is_built(monkeypatch):
    """SIGTERM (here: the app's shutdown) while the engine is still being built: the shutdown waits for the build (a
    half-built engine's processes must still be stopped), then closes it, and does not begin watching its life (the
    watch ran for as long as the engine lived, and the process never ended). The logic alone, on an engine standing
    in for vLLM's, built when the test lets it."""
    import threading

    from services.teacher import app as app_module

    built, closed, died = threading.Event(), [], []

    class StandIn:
        ready = True
        model_name = "m"

        def close(self):
            closed.append(True)

    async def no_openai_state(app, service):
        return None

    monkeypatch.setattr(app_module.TeacherService, "start", staticmethod(lambda settings: built.wait(30) and StandIn()))
    monkeypatch.setattr(app_module, "init_openai_state", no_openai_state)
    client = TestClient(create_app(TeacherSettings(), on_engine_death=lambda: died.append(True) or True))
    client.__enter__()
    threading.Timer(1.0, built.set).start()  # the build ends after the shutdown began
    stopping = threading.Thread(target=client.__exit__, args=(None, None, None), daemon=True)
    stopping.start()
    stopping.join(timeout=30)
    assert not stopping.is_alive(), "the shutdown never ended"
    assert closed == [True] and died == []
