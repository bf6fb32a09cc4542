"""The teacher client's failure handling, against a scripted transport (the real service is in
tests/services/teacher/test_service.py): retries with backoff on 503, 429 and connection errors, then a named error."""

from __future__ import annotations

import httpx
import pytest

from shared.schemas import SamplingSettings
from shared.teacher_client import TeacherClient, TeacherPool, TeacherRejected, TeacherTimedOut, TeacherUnavailable

MODELS = {
    "object": "list", "data": [{"id": "m"}], "model": "/models/m", "max_model_len": 4096, "vocab_size": 10,
    "max_logprobs": 64, "adapters": [],
}


def scripted(*responses):
    """A transport answering each call with the next response (a status and JSON, or an exception to raise)."""
    calls = []
    queue = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        status, body, headers = item
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handle), calls


def client(transport, retries=3) -> TeacherClient:
    return TeacherClient("http://teacher", api_key="k", retries=retries, backoff_seconds=0.001, transport=transport)


def test_retries_through_503_429_and_connection_errors():
    busy = (429, {"error": {"message": "busy"}}, {"Retry-After": "0"})
    starting = (503, {"error": {"message": "starting"}}, {"Retry-After": "0"})
    transport, calls = scripted(httpx.ConnectError("refused"), starting, busy, (200, MODELS, {}))
    assert client(transport).model_name == "/models/m"
    assert len(calls) == 4 and calls[0].headers["Authorization"] == "Bearer k"


def test_gives_up_with_teacher_unavailable():
    transport, calls = scripted(*[(503, {"error": {"message": "the engine is starting"}}, {})] * 3)
    with pytest.raises(TeacherUnavailable, match="the engine is starting"):
        client(transport, retries=2).models()
    assert len(calls) == 3


def test_a_busy_teacher_is_waited_for_beyond_the_retries_but_not_forever():
    busy = (429, {"error": {"message": "1000 engine requests pending"}}, {"Retry-After": "0"})
    transport, calls = scripted(*[busy] * 6, (200, MODELS, {}))
    assert client(transport, retries=2).model_name == "/models/m" and len(calls) == 7
    transport, calls = scripted(*[busy] * 1000)
    patient = TeacherClient("http://teacher", retries=2, backoff_seconds=0.001, busy_wait_seconds=0.2,
                            transport=transport)  # fmt: skip
    with pytest.raises(TeacherUnavailable, match="busy for 0 s: 1000 engine requests pending"):
        patient.models()
    assert 3 < len(calls) < 1000


def test_a_generation_that_timed_out_or_got_a_504_is_not_sent_again():
    transport, calls = scripted(httpx.ReadTimeout("no answer"), (200, MODELS, {}))
    with pytest.raises(TeacherTimedOut, match="no answer within the read timeout"):
        client(transport).request("POST", "/v1/rollouts", json={})
    assert len(calls) == 1
    transport, calls = scripted((504, {"error": {"message": "gateway timeout"}}, {}), (200, MODELS, {}))
    with pytest.raises(TeacherTimedOut, match="504 gateway timeout"):
        client(transport).request("POST", "/v1/rollouts", json={})
    assert len(calls) == 1
    transport, calls = scripted(httpx.ReadTimeout("no answer"), (200, MODELS, {}))
    pool = TeacherPool(["http://a", "http://b"], retries=3, backoff_seconds=0.001, transport=transport)
    with pytest.raises(TeacherTimedOut):  # nor to another service of the pool
        pool.call("request", "POST", "/v1/rollouts", json={})
    assert len(calls) == 1
    transport, calls = scripted(httpx.ReadTimeout("no answer"), (504, {}, {}), (200, MODELS, {}))
    assert client(transport).model_name == "/models/m" and len(calls) == 3  # a GET is sent again


def test_waiting_out_a_busy_teacher_spends_no_retry():
    busy = (429, {"error": {"message": "busy"}}, {"Retry-After": "0"})
    starting = (503, {"error": {"message": "starting"}}, {"Retry-After": "0"})
    transport, calls = scripted(*[busy] * 6, starting, starting, (200, MODELS, {}))
    assert client(transport, retries=2).model_name == "/models/m" and len(calls) == 9


def test_a_4xx_is_rejected_at_once_with_the_field():
    error = {"error": {"message": "sampling.n: too big", "type": "invalid_request", "param": "sampling.n", "code": 422}}
    transport, calls = scripted((422, error, {}))
    with pytest.raises(TeacherRejected) as rejected:
        client(transport).models()
    assert (rejected.value.status, rejected.value.param, len(calls)) == (422, "sampling.n", 1)


def test_unreachable_service_is_unavailable():
    with TeacherClient("http://127.0.0.1:9", retries=1, backoff_seconds=0.001) as unreachable:
        with pytest.raises(TeacherUnavailable, match="ConnectError"):
            unreachable.models()


def test_a_pool_takes_turns_and_skips_a_teacher_that_cannot_be_reached():
    """Two teachers answer in turn; when one is down, every call goes to the other; when both are, the error says so."""
    from shared.teacher_client import TeacherPool

    hosts = []
    down = set()

    def handle(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host in down:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json=MODELS)

    pool = TeacherPool(["http://a", "http://b"], api_key="k", retries=0, transport=httpx.MockTransport(handle))
    for _ in range(4):
        pool.call("models")
    assert sorted(hosts) == ["a", "a", "b", "b"] and hosts[0] != hosts[1]
    down.add("a")
    hosts.clear()
    for _ in range(3):
        assert pool.call("models").model == "/models/m"
    assert hosts.count("b") == 3
    down.add("b")
    with pytest.raises(TeacherUnavailable):
        pool.call("models")
    pool.close()


def test_an_adapter_another_client_loaded_meanwhile_counts_as_loaded():
    """Two workers asking for the same adapter at once: the second load is a 409 (loaded already), which
    `ensure_adapter` checks and accepts; a 409 for anything else is still an error."""
    loaded = {**MODELS, "adapters": [{"name": "round-1", "path": "round-1"}]}
    taken = {"error": {"message": "name: loaded already", "type": "conflict", "param": "name", "code": 409}}
    transport, calls = scripted((200, MODELS, {}), (409, taken, {}), (200, loaded, {}))
    client(transport).ensure_adapter("round-1")
    assert [c.method for c in calls] == ["GET", "POST", "GET"]
    transport, _ = scripted((200, MODELS, {}), (409, taken, {}), (200, MODELS, {}))
    with pytest.raises(TeacherRejected):
        client(transport).ensure_adapter("round-1")


def test_waiting_for_readiness_rides_out_a_start_and_stops_at_once_where_no_wait_helps():
    """`/readyz`: no answer and 503 `not_ready` are waited out; a 503 `start_failed` (the engine could not be built), or
    an answer no teacher gives (a 404: another service at that URL), ends the wait at once; so does no answer at all
    for `unreachable_seconds`."""
    starting = (503, {"error": {"message": "loading", "type": "not_ready"}}, {})
    transport, calls = scripted(httpx.ConnectError("refused"), starting, (429, {}, {}), (200, {"status": "ready"}, {}))
    client(transport).wait_ready(unreachable_seconds=60)
    assert [c.url.path for c in calls] == ["/readyz"] * 4

    failed = (503, {"error": {"message": "no model at /m", "type": "start_failed"}}, {})
    for answer, says in [(failed, "could not start its engine: no model at /m"), ((404, {}, {}), "answered 404, as no"),
                         ((401, {}, {}), "answered 401")]:
        transport, calls = scripted(answer)
        with pytest.raises(TeacherUnavailable, match=says):
            client(transport).wait_ready()
        assert len(calls) == 1

    for silence, says in [(httpx.ConnectError("refused"), "ConnectError"), ((502, {}, {}), "502 from something"),
                          ((503, {"error": "<html>"}, {}), "503 from something in front of it")]:
        transport, calls = scripted(silence)
        with pytest.raises(TeacherUnavailable, match=f"no teacher answers at http://teacher \\({says}"):
            client(transport).wait_ready(unreachable_seconds=0)
        assert len(calls) == 1


def test_a_rollout_on_an_adapter_the_teacher_no_longer_holds_loads_it_and_is_sent_again():
    """The teacher restarted since the adapter was loaded (it holds none): the 404 naming `adapter` loads it again and
    the batch is sent once more; a second 404 is the caller's."""
    state = {"loaded": True, "posts": 0}
    missing = {"error": {"message": "adapter: no adapter named 'r1'", "type": "not_found", "param": "adapter",
                         "code": 404}}
    answer = {"model": "m", "adapter": "r1", "prompt_version": "v", "results": [
        {"prompt": {"messages": [], "text": "q", "token_ids": [1]},
         "samples": [{"text": "2", "token_ids": [5], "finish_reason": "stop"}]}]}

    def teacher(request: httpx.Request) -> httpx.Response:
        adapters = [{"name": "r1", "path": "r1"}] if state["loaded"] else []
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={**MODELS, "adapters": adapters})
        if request.url.path == "/v1/adapters":
            state["loaded"] = True
            return httpx.Response(201, json={"name": "r1", "path": "r1"})
        state["posts"] += 1
        if state["posts"] == 1:
            state["loaded"] = False  # the teacher restarted after the first check
        return httpx.Response(404, json=missing) if not state["loaded"] else httpx.Response(200, json=answer)

    sampling = [SamplingSettings(max_tokens=4)]
    (result,) = client(httpx.MockTransport(teacher)).rollouts(["q"], sampling, adapter="r1")
    assert result.generations[0].text == "2" and state["posts"] == 2


def test_curations_two_calls_at_once_share_the_teachers_bound_through_every_engine_that_wraps_a_client():
    """`rollouts_and_explanations` sends both calls inside `sharing_the_bound`: a client's requests are then half of
    what the teacher admits at once (curation's two calls never refuse each other), through a pool and through the
    curator's rollouts from an adapter alike; one call alone (no explanations yet) keeps whole requests, and so does
    every other call (evaluation)."""
    from services.curator.jobs import AdapterRollouts
    from shared.engine import HintedQuestion

    bounded = {**MODELS, "max_pending_requests": 16}
    transport, _ = scripted((200, bounded, {}))
    pool = TeacherPool(["http://teacher"], transport=transport)
    seen = []

    class Recording(AdapterRollouts):
        def rollouts(self, questions, sampling, **kwargs):
            seen.append(("rollouts", pool.clients[0].batch_size))
            return []

        def explanations(self, items, sampling, **kwargs):
            seen.append(("explanations", pool.clients[0].batch_size))
            return []

    engine = Recording(pool, "r1")
    item = HintedQuestion(question="1 + 1?", correct_response="2", incorrect_response="3")
    greedy = SamplingSettings(n=1, temperature=0.0)
    engine.rollouts_and_explanations(["2 + 2?"], [greedy], [item], [greedy])
    assert sorted(seen) == [("explanations", 8), ("rollouts", 8)]
    seen.clear()
    engine.rollouts_and_explanations([], [], [item], [greedy])  # the last batch's explanations alone
    assert seen == [("explanations", 16)] and pool.clients[0].batch_size == 16
