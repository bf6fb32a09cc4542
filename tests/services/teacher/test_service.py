"""The teacher service as a real process on loopback (tests/services/teacher/conftest.py), on the real small model:
endpoints, batching across clients, top-k agreement with scoring, adapters, every bad input's status, auth, and
curation through the service writing the same pairs as in-process (with two explanation attempts per problem)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from services.curator.curation import curate
from services.teacher.engine import resolved_dtype
from shared.arithmetic import make_arithmetic_problems
from shared.prompts import PROMPT_VERSION, build_student_messages
from shared.settings import CurationConfig, Settings
from shared.storage import PairStore
from shared.teacher_api import TopKBase64, decode_topk
from shared.teacher_client import TeacherClient, TeacherRejected
from tests.cli.test_cli import ssb_side_by_side
from tests.prometheus_text import metric
from tests.services.teacher.conftest import API_KEY, MAX_PENDING_REQUESTS, MAX_REQUEST_BYTES
from tests.teacher_server import write_tiny_adapter

LOGPROB_TOLERANCE = 1e-3
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"
pytestmark = pytest.mark.engine


def test_probes_and_models(teacher_server):
    with teacher_server.client(key=None) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").status_code == 200
        assert anonymous.get("/openapi.json").json()["info"]["title"] == "SSB teacher"  # its docs need no key
        assert anonymous.get("/v1/models").status_code == 401
    with teacher_server.client() as http:
        models = http.get("/v1/models").json()
    assert models["max_model_len"] == 4096 and models["vocab_size"] == 49152 and models["max_logprobs"] == 64
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
    assert models["model"].endswith("SmolLM2-135M-Instruct")
    assert models["dtype"] == resolved_dtype(Settings().dtype)  # the variables it was started with, as here


def test_the_model_runs_in_the_engine_cores_process(teacher_server, lora_teacher_server):
    """Each service starts one engine process, its core, which also runs the model (vLLM's CPU build would start the
    model in a third process: docs/BENCHMARKS.md, "Engine start")."""
    import psutil

    for server in (teacher_server, lora_teacher_server):
        names = [p.name() for p in psutil.Process(server.process.pid).children(recursive=True)]
        assert [name for name in names if name.startswith("VLLM::")] == ["VLLM::EngineCore"], names


def test_rollouts_return_n_samples_with_the_prompt_as_rendered(teacher_server, engine):
    body = {
        "questions": [{"question": QUESTION}, {"question": "What is 5 + 6?"}],
        "sampling": {"n": 3, "temperature": 0.8, "top_k": 50, "max_tokens": 12, "seed": 1},
    }
    with teacher_server.client() as http:
        response = http.post("/v1/rollouts", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["prompt_version"] == PROMPT_VERSION
    assert [len(r["samples"]) for r in data["results"]] == [3, 3]
    expected = engine.render(build_student_messages(QUESTION))
    assert data["results"][0]["prompt"]["token_ids"] == expected.token_ids
    assert data["results"][0]["prompt"]["text"] == expected.text
    for sample in data["results"][0]["samples"]:
        assert 1 <= len(sample["token_ids"]) <= 12 and sample["finish_reason"] in ("stop", "length")
        assert sample["topk"] is None


def test_concurrent_clients_are_batched_together(teacher_server):
    """8 clients at once: all complete, and the engine generated their tokens in far fewer steps than tokens (from
    vLLM's own metrics: generation tokens against engine iterations), which only batching can do."""
    with teacher_server.client() as http:
        before = http.get("/metrics").text

        def ask(i: int):
            body = {"questions": [{"question": f"What is {i} + {i}?"}], "sampling": {"n": 1, "max_tokens": 24}}
            return http.post("/v1/rollouts", json=body)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(ask, range(8)))
        after = http.get("/metrics").text
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    tokens = metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total")
    steps = metric(after, "vllm:iteration_tokens_total_count") - metric(before, "vllm:iteration_tokens_total_count")
    assert tokens == sum(len(r.json()["results"][0]["samples"][0]["token_ids"]) for r in responses)
    assert tokens / steps > 2.5, f"{tokens} tokens in {steps} engine steps: not batched"
    assert metric(after, "ssb_teacher_requests_total", 'endpoint="/v1/rollouts",status="200"') >= 8
    assert metric(after, "ssb_teacher_response_bytes_count", 'endpoint="/v1/rollouts"') >= 8
    assert "vllm:kv_cache_usage_perc" in after and "vllm:num_requests_waiting" in after


def test_explanation_topk_agree_with_scoring_the_same_tokens(teacher_server):
    """The explanation's stored top-k (raw distribution, sampled at T=0.4) against `/v1/logprobs` of the same token ids
    under the same prompt. Tolerance: the same top-1 token at >= 90% of positions, and log-probabilities of the tokens
    in both top-20s within 0.1 on average (the bound of a bf16 engine, decoding step by step against one prefill; the
    suite's float32 engine agrees to about 1e-5)."""
    item = {"question": QUESTION, "correct_response": "3 + 4 = 7. \\boxed{7}", "incorrect_response": "3 + 3 = 6"}
    body = {"items": [item], "sampling": {"temperature": 0.4, "max_tokens": 32, "seed": 3, "logprobs": 20}}
    with teacher_server.client() as http:
        explained = http.post("/v1/explanations", json=body).json()["results"][0]
        sample = explained["samples"][0]
        ids, logprobs = decode_topk(TopKBase64.model_validate(sample["topk"]))
        scoring = {"prompt_token_ids": explained["prompt"]["token_ids"], "reply_token_ids": sample["token_ids"]}
        scoring["k"] = 20
        scored = http.post("/v1/logprobs", json=scoring).json()
    scored_ids, scored_logprobs = decode_topk(TopKBase64.model_validate(scored["topk"]))
    assert len(ids) == len(scored_ids) == len(sample["token_ids"]) > 10
    same_top1 = sum(a[0] == b[0] for a, b in zip(ids, scored_ids)) / len(ids)
    diffs = []
    for row_ids, row_lps, s_ids, s_lps in zip(ids, logprobs, scored_ids, scored_logprobs):
        stored, other = dict(zip(row_ids, row_lps)), dict(zip(s_ids, s_lps))
        diffs += [abs(stored[t] - other[t]) for t in stored.keys() & other.keys()]
    assert same_top1 >= 0.9 and sum(diffs) / len(diffs) < 0.1, (same_top1, sum(diffs) / len(diffs), max(diffs))
    # The reply token's own log-probability is reported beside its top-k.
    for token, row_ids, value in zip(sample["token_ids"], scored_ids, scored["logprobs"]):
        if token in row_ids:
            assert value == pytest.approx(scored_logprobs[scored_ids.index(row_ids)][row_ids.index(token)])


BAD_INPUTS = [
    ("/v1/rollouts", {"questions": [{"question": "q", "sampling": {"n": 0}}]}, 422, "questions.0.sampling.n"),
    ("/v1/rollouts", {"questions": [{"question": "q"}], "sampling": {"max_tokens": 0}}, 422, "sampling.max_tokens"),
    ("/v1/rollouts", {"questions": [{"question": "q"}] * 257}, 422, "questions"),
    ("/v1/rollouts", {"questions": []}, 422, "questions"),
    ("/v1/rollouts", {"questions": [{"question": "q"}], "sampling": {"logprobs": 65}}, 400, "sampling.logprobs"),
    ("/v1/rollouts", {"questions": [{"question": "q"}], "sampling": {"max_tokens": 4090}}, 400, "sampling.max_tokens"),
    ("/v1/rollouts", {"questions": [{"question": "q"}], "sampling": {"n": 2, "temperature": 0}}, 400, "sampling"),
    ("/v1/rollouts", {"questions": [{"question": "q", "sampling": {"seed": 2**64}}]}, 422, "questions.0.sampling.seed"),
    ("/v1/rollouts", {"questions": [{"question": "q"}], "colour": "red"}, 422, "colour"),
    ("/v1/explanations", {"items": [{"question": "q", "correct_response": "a"}]}, 422, "items.0.incorrect_response"),
    ("/v1/logprobs", {"prompt_token_ids": [1], "reply_token_ids": [2], "k": 65}, 400, "k"),
    ("/v1/logprobs", {"prompt_token_ids": [1], "reply_token_ids": [10**6]}, 400, "reply_token_ids"),
    ("/v1/logprobs", {"reply_text": "x"}, 422, None),
]
# Adapters, asked of the teacher built for them.
BAD_ADAPTER_INPUTS = [
    ("/v1/rollouts", {"questions": [{"question": "q"}], "adapter": "nobody"}, 404, "adapter"),
    ("/v1/adapters", {"name": "x", "path": "../adapters/tiny"}, 400, "path"),
    ("/v1/adapters", {"name": "x", "path": "/etc"}, 400, "path"),
    ("/v1/adapters", {"name": "x", "path": "missing"}, 404, "path"),
]


def assert_refused(server, path: str, body: dict, status: int, param: str | None) -> str:
    """POST `body`; the error envelope has `status` and names `param` in its field and its message. Returns it."""
    with server.client() as http:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"]
    return error["message"]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_INPUTS)
def test_bad_input_gets_a_4xx_naming_the_field(teacher_server, path, body, status, param):
    assert_refused(teacher_server, path, body, status, param)


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_ADAPTER_INPUTS)
def test_bad_adapter_input_gets_a_4xx_naming_the_field(lora_teacher_server, path, body, status, param):
    assert_refused(lora_teacher_server, path, body, status, param)


def test_a_teacher_without_lora_refuses_adapters_with_409_saying_why(teacher_server):
    for path, body, param in (
        ("/v1/adapters", {"name": "tiny"}, "name"),
        ("/v1/rollouts", {"questions": [{"question": "q"}], "adapter": "tiny"}, "adapter"),
    ):
        message = assert_refused(teacher_server, path, body, 409, param)
        assert "without LoRA support" in message and "SSB_ENABLE_LORA" in message


def test_context_overflow_says_by_how_many_tokens(teacher_server, engine):
    prompt_tokens = len(engine.render(build_student_messages("q")).token_ids)
    body = {"questions": [{"question": "q"}], "sampling": {"max_tokens": 4090}}
    with teacher_server.client() as http:
        message = http.post("/v1/rollouts", json=body).json()["error"]["message"]
    assert f"by {prompt_tokens + 4090 - 4096} tokens" in message


def test_malformed_json_more_work_than_the_bound_and_more_than_is_left(teacher_server):
    """More prompts in one request than the bound admits at all: refused as invalid (no wait would help). More than
    is left while other work runs: 429 with Retry-After (the client waits and sends it again). The other work's client
    then leaves without its answer, and its engine requests end."""
    from http.client import HTTPConnection
    from urllib.parse import urlsplit

    one = {"questions": [{"question": "q"}], "sampling": {"max_tokens": 1}}
    # 16 prompts (the bound counts prompts) of 8 samples each: 128 sequences of up to 2048 tokens, minutes of decoding
    # on any CPU, still running when their client leaves.
    full = {"questions": [{"question": QUESTION}] * MAX_PENDING_REQUESTS,
            "sampling": {"n": 8, "temperature": 1.0, "max_tokens": 2048}}
    with teacher_server.client() as http:
        malformed = http.post("/v1/rollouts", content=b"{not json", headers={"Content-Type": "application/json"})
        assert malformed.status_code == 422 and malformed.json()["error"]["type"] == "invalid_request"
        too_many = http.post("/v1/rollouts", json={**one, "questions": one["questions"] * (MAX_PENDING_REQUESTS + 1)})
        address = urlsplit(teacher_server.url)
        leaving = HTTPConnection(address.hostname, address.port, timeout=60)
        try:  # sent, its answer never read
            leaving.request("POST", "/v1/rollouts", body=json.dumps(full),
                            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
            deadline = time.monotonic() + 30
            while metric(http.get("/metrics").text, "ssb_teacher_pending_engine_requests") < MAX_PENDING_REQUESTS:
                assert time.monotonic() < deadline, "the first request was never admitted"
                time.sleep(0.05)
            busy = http.post("/v1/rollouts", json=one)
        finally:
            leaving.close()
        deadline = time.monotonic() + 60
        while metric(http.get("/metrics").text, "ssb_teacher_pending_engine_requests") > 0:
            assert time.monotonic() < deadline, "the engine requests of a client that left still run"
            time.sleep(0.2)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "questions"
    assert f"at most {MAX_PENDING_REQUESTS} at once" in too_many.json()["error"]["message"]
    assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
    assert str(MAX_PENDING_REQUESTS) in busy.json()["error"]["message"]


def test_a_request_body_over_the_limit_is_refused_as_it_arrives(teacher_server):
    """Over `SSB_MAX_REQUEST_BYTES`: a 413 before the body is parsed, on the teacher's routes (FastAPI reads the body)
    and on vLLM's OpenAI routes (the admission layer reads it), with a length declared or sent in pieces without one.
    The teacher answers the next request as before."""
    long_question = "Add these numbers: " + " + ".join(["12345"] * (MAX_REQUEST_BYTES // 8))
    rollouts = json.dumps({"questions": [{"question": long_question}], "sampling": {"max_tokens": 1}}).encode()
    completions = json.dumps({"model": "base", "prompt": long_question, "max_tokens": 1}).encode()
    assert min(len(rollouts), len(completions)) > MAX_REQUEST_BYTES
    json_type = {"Content-Type": "application/json"}
    with teacher_server.client() as http:
        declared = http.post("/v1/rollouts", content=rollouts, headers=json_type)
        in_pieces = (completions[i : i + 65536] for i in range(0, len(completions), 65536))
        streamed = http.post("/v1/completions", content=in_pieces, headers=json_type)
        after = http.post("/v1/rollouts", json={"questions": [{"question": QUESTION}], "sampling": {"max_tokens": 2}})
    limit = MAX_REQUEST_BYTES
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"]["type"] == "too_large"
    assert declared.json()["error"]["message"] == f"the request body is {len(rollouts)} bytes; at most {limit}"
    assert streamed.status_code == 413, streamed.text
    assert streamed.json()["error"]["message"] == f"the request body is over {limit} bytes; at most {limit}"
    assert after.status_code == 200, after.text


def test_auth_is_required_and_the_key_never_echoed(teacher_server):
    with teacher_server.client(key=None) as anonymous, teacher_server.client(key="wrong") as wrong:
        for http in (anonymous, wrong):
            for response in (http.get("/v1/models"), http.get("/metrics"), http.post("/v1/rollouts", json={})):
                assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
                assert API_KEY not in response.text
    with teacher_server.client() as http:
        assert http.get("/v1/models").status_code == 200
    assert API_KEY not in teacher_server.log()


def test_adapter_loads_changes_the_output_and_unloads(lora_teacher_server):
    greedy = {"questions": [{"question": QUESTION}], "sampling": {"n": 1, "temperature": 0, "max_tokens": 4}}
    with lora_teacher_server.client() as http:
        others = http.get("/v1/models").json()["adapters"]  # what other tests left loaded
        assert "tiny" not in [a["name"] for a in others]
        base = http.post("/v1/rollouts", json=greedy).json()["results"][0]["samples"][0]["token_ids"]
        loaded = http.post("/v1/adapters", json={"name": "tiny"})
        assert loaded.status_code == 201 and loaded.json() == {"name": "tiny", "path": "tiny"}
        assert http.post("/v1/adapters", json={"name": "tiny"}).status_code == 409
        # The base model's own name, and paths no filesystem takes: refused, naming the field.
        served = http.get("/v1/models").json()["data"][0]["id"]
        clash = http.post("/v1/adapters", json={"name": served, "path": "tiny"})
        assert clash.status_code == 409 and clash.json()["error"]["param"] == "name", clash.text
        for path in ("a\u0000b", "x" * 300):
            unusable = http.post("/v1/adapters", json={"name": "odd", "path": path})
            assert unusable.status_code == 400 and unusable.json()["error"]["param"] == "path", unusable.text
        assert http.post("/v1/adapters", json={"name": "tiny", "replace": True}).status_code == 201
        assert http.get("/v1/models").json()["adapters"] == [*others, {"name": "tiny", "path": "tiny"}]
        adapted = http.post("/v1/rollouts", json={**greedy, "adapter": "tiny"})
        assert adapted.status_code == 200, adapted.text
        assert adapted.json()["results"][0]["samples"][0]["token_ids"] != base
        openai = http.post("/v1/completions", json={"model": "tiny", "prompt": "2 + 2 =", "max_tokens": 2})
        assert openai.status_code == 200 and openai.json()["model"] == "tiny", openai.text
        chat = http.post("/v1/chat/completions",
                         json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["model"] == "tiny", chat.text
        assert http.delete("/v1/adapters/tiny").status_code == 204
        assert http.get("/v1/models").json()["adapters"] == others
        assert http.post("/v1/rollouts", json={**greedy, "adapter": "tiny"}).status_code == 404
        assert http.delete("/v1/adapters/tiny").status_code == 404


def test_requests_on_an_adapter_and_on_its_replacement_share_the_engine_and_keep_it_alive(lora_teacher_server):
    """An adapter replaced while a request on it still runs, beside one on another adapter (the engine's two LoRA
    slots full): a request on the replacement waits for a slot, then runs in one batch with the earlier version's.
    vLLM tells adapters apart by name, so two versions under one name would be one adapter there, and the batch's
    other version, left out of the slots, kills the engine. Each load has a name of its own in the engine; the
    teacher's routes and the OpenAI ones still name it as loaded."""
    def rollout(adapter: str, max_tokens: int) -> dict:
        sampling = {"n": 1, "temperature": 1.0, "max_tokens": max_tokens, "seed": 0}
        return {"questions": [{"question": QUESTION}], "adapter": adapter, "sampling": sampling}

    with lora_teacher_server.client() as http, ThreadPoolExecutor(3) as pool:
        for name in ("replaced", "beside"):
            assert http.post("/v1/adapters", json={"name": name, "path": "tiny"}).status_code == 201
        pending = metric(http.get("/metrics").text, "ssb_teacher_pending_engine_requests")
        with lora_teacher_server.client() as other:
            long = pool.submit(other.post, "/v1/rollouts", json=rollout("replaced", 96))
            short = pool.submit(other.post, "/v1/rollouts", json=rollout("beside", 24))
            deadline = time.monotonic() + 60
            while metric(http.get("/metrics").text, "ssb_teacher_pending_engine_requests") < pending + 2:
                assert time.monotonic() < deadline, "the two rollouts never started"
                time.sleep(0.05)
            replaced = http.post("/v1/adapters", json={"name": "replaced", "path": "tiny", "replace": True})
            assert replaced.status_code == 201, replaced.text
            assert not long.done(), "the long rollout ended before the adapter was replaced: lengthen it"
            after = pool.submit(other.post, "/v1/rollouts", json=rollout("replaced", 24))
            for answer in (short.result(), after.result()):
                assert answer.status_code == 200, answer.text
            # The replacement's request ended while the earlier version's still ran: the engine's batches held both.
            assert not long.done(), "the long rollout ended before the replacement's request did: lengthen it"
            assert long.result().status_code == 200, long.result().text
        assert http.get("/readyz").status_code == 200
        openai = http.post("/v1/completions", json={"model": "replaced", "prompt": "2 + 2 =", "max_tokens": 2})
        assert openai.status_code == 200 and openai.json()["model"] == "replaced", openai.text
        for name in ("replaced", "beside"):
            assert http.delete(f"/v1/adapters/{name}").status_code == 204


def test_a_client_that_disconnects_has_its_engine_requests_aborted(teacher_server):
    """A client that gives up (a read timeout; a retry would send the same work again) ends its work at once: the
    engine aborts its requests instead of generating up to 2,048 tokens each for nobody."""
    import httpx

    long = {"questions": [{"question": QUESTION}] * 4, "sampling": {"n": 4, "temperature": 1.0, "max_tokens": 2048}}
    with teacher_server.client() as http:
        generated = metric(http.get("/metrics").text, "vllm:generation_tokens_total")
        with teacher_server.client(timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/rollouts", json=long)
        deadline = time.monotonic() + 60
        while metric(text := http.get("/metrics").text, "ssb_teacher_pending_engine_requests") > 0:
            assert time.monotonic() < deadline, "the engine requests of a client that left still run"
            time.sleep(0.2)
        generated = metric(text, "vllm:generation_tokens_total") - generated
        assert generated < 16 * 2048 / 8, f"{generated:.0f} tokens generated for a client that left after 1 s"
        assert http.post("/v1/rollouts", json={**long, "sampling": {"n": 1, "max_tokens": 2}}).status_code == 200


def test_an_adapter_serves_from_the_engines_own_copy_after_its_directory_is_gone(lora_teacher_server):
    """vLLM keeps two adapters in memory here (max_loras) and reads a dropped one again from its path when a request
    needs it. Loading two more drops the first, whose directory is then deleted (as a training run publishing again
    would): its next request is served, the same as before, from the engine's own copy; the engine stays up."""
    greedy = {"questions": [{"question": QUESTION}], "sampling": {"n": 1, "temperature": 0, "max_tokens": 4}}
    names = ["first", "second", "third"]
    for name in names:
        shutil.copytree(lora_teacher_server.adapters_dir / "tiny", lora_teacher_server.adapters_dir / name)
    try:
        with lora_teacher_server.client() as http:
            assert http.post("/v1/adapters", json={"name": "first"}).status_code == 201
            before = http.post("/v1/rollouts", json={**greedy, "adapter": "first"}).json()["results"][0]["samples"]
            for name in names[1:]:
                assert http.post("/v1/adapters", json={"name": name}).status_code == 201
                assert http.post("/v1/rollouts", json={**greedy, "adapter": name}).status_code == 200
            shutil.rmtree(lora_teacher_server.adapters_dir / "first")
            after = http.post("/v1/rollouts", json={**greedy, "adapter": "first"})
            assert after.status_code == 200, after.text
            assert after.json()["results"][0]["samples"][0]["token_ids"] == before[0]["token_ids"]
            assert http.get("/readyz").status_code == 200
            for name in names:
                assert http.delete(f"/v1/adapters/{name}").status_code == 204
    finally:
        for name in names:
            shutil.rmtree(lora_teacher_server.adapters_dir / name, ignore_errors=True)


def test_a_retired_adapter_copy_goes_once_no_request_may_use_it(tmp_path):
    """The copy of a replaced or unloaded adapter stays while a request admitted before its retirement runs (however
    long: it may be waiting in the engine's queue and need vLLM to read the copy again), and for the grace period after
    the last such request ended, then goes when a request ends; the logic alone, on a clock of the test's."""
    from services.teacher.service import RETIRED_COPY_GRACE_SECONDS, RetiredCopies

    now = [0.0]
    retired = RetiredCopies(clock=lambda: now[0])
    first, second = tmp_path / "1", tmp_path / "2"
    for copy in (first, second):
        copy.mkdir()
    older = retired.request()
    older.__enter__()  # admitted before the retirement: may run with the first copy
    retired.retire(first)
    with retired.request():  # admitted after it: runs with the replacement
        now[0] = 10 * RETIRED_COPY_GRACE_SECONDS
    assert first.exists()  # the older request still runs, long past the grace period
    older.__exit__(None, None, None)
    assert first.exists()  # the engine may still hold that request a moment: the grace period starts now
    now[0] += RETIRED_COPY_GRACE_SECONDS
    with retired.request():
        pass
    assert not first.exists()

    retired.retire(second)  # nothing running
    now[0] += RETIRED_COPY_GRACE_SECONDS / 2
    with retired.request():
        pass
    assert second.exists()  # within the grace period
    now[0] += RETIRED_COPY_GRACE_SECONDS
    with retired.request():
        pass
    assert not second.exists() and len(retired) == 0


class StandInEngine:
    """What `TeacherService` asks of vLLM's engine to load and remove adapters; a removal waits for `removed`."""

    model_config = SimpleNamespace(max_model_len=2048, get_vocab_size=lambda: 100)

    def __init__(self):
        self.removing = asyncio.Event()
        self.removed = asyncio.Event()
        self.removed.set()

    def get_tokenizer(self):
        return None

    async def add_lora(self, lora_request):
        return True

    async def remove_lora(self, lora_id):
        self.removing.set()
        await self.removed.wait()


def stand_in_service(tmp_path: Path):
    """A teacher service on `StandInEngine` whose adapters directory holds adapter `a`."""
    from services.teacher.engine import EngineOptions
    from services.teacher.service import TeacherService
    from services.teacher.settings import TeacherSettings

    adapters = tmp_path / "adapters"
    (adapters / "a").mkdir(parents=True)
    (adapters / "a" / "adapter_config.json").write_text("{}")
    engine = StandInEngine()
    settings = TeacherSettings(adapters_dir=adapters)
    options = EngineOptions(model="m", enable_lora=True)
    return TeacherService(engine, options, settings, "m", str(tmp_path / "ipc")), engine


def test_a_replaced_adapters_name_serves_the_new_weights_while_the_old_ones_are_removed(tmp_path):
    """The engine removes an adapter between two steps (on a CPU, minutes later): a request admitted meanwhile under
    the name gets the replacement, not the weights being removed (which vLLM would then load again). The logic alone,
    on an engine standing in for vLLM's that holds the removal until the test lets it go."""
    from shared.teacher_api import AdapterLoadRequest

    async def replace_while_serving():
        service, engine = stand_in_service(tmp_path)
        await service.load_adapter(AdapterLoadRequest(name="a"))
        first = service.lora_request("a")
        engine.removed.clear()
        replacing = asyncio.create_task(service.load_adapter(AdapterLoadRequest(name="a", replace=True)))
        await engine.removing.wait()  # the removal of the first weights under way
        during = service.lora_request("a")
        engine.removed.set()
        await replacing
        return first, during, service.lora_request("a")

    first, during, after = asyncio.run(replace_while_serving())
    assert during.lora_int_id != first.lora_int_id and during.lora_int_id == after.lora_int_id


def test_an_adapter_that_cannot_be_copied_for_want_of_space_is_not_said_to_be_changing(tmp_path, monkeypatch):
    """Only files gone while being read are a 409 on `path` ("retry": a run is publishing it again); a full disk is
    the teacher's own trouble, a 500 that says so (it was a 409 saying the files changed)."""
    import errno

    from services.errors import ServiceError
    from services.teacher.service import Conflict
    from shared.teacher_api import AdapterLoadRequest

    service, _ = stand_in_service(tmp_path)

    def no_space(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", no_space)
    with pytest.raises(ServiceError, match="could not copy the adapter's files: .*No space left") as raised:
        asyncio.run(service.load_adapter(AdapterLoadRequest(name="a")))
    assert raised.value.status == 500 and not isinstance(raised.value, Conflict)

    def gone(source, target):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(source))

    monkeypatch.setattr(shutil, "copy2", gone)
    with pytest.raises(Conflict, match="changed while being read"):
        asyncio.run(service.load_adapter(AdapterLoadRequest(name="a")))
    assert service.lora_requests == {} and not any((tmp_path / "ipc" / "adapters").iterdir())  # no copy left


def test_an_adapter_above_the_largest_rank_is_refused_saying_so(lora_teacher_server, model_path):
    """The session's LoRA teacher serves ranks up to 8 (SSB_MAX_LORA_RANK, tests/teacher_server.py): a rank-16 adapter
    gets a 400 that says why, and is not loaded."""
    directory = lora_teacher_server.adapters_dir / "rank16"
    write_tiny_adapter(model_path, directory, rank=16)
    try:
        with lora_teacher_server.client() as http:
            response = http.post("/v1/adapters", json={"name": "rank16"})
            assert response.status_code == 400, response.text
            assert "max_lora_rank" in response.json()["error"]["message"], response.text
            assert "rank16" not in [a["name"] for a in http.get("/v1/models").json()["adapters"]]
    finally:
        shutil.rmtree(directory)


def test_adapter_symlink_out_of_the_directory_is_refused(lora_teacher_server, tmp_path):
    (lora_teacher_server.adapters_dir / "outside").symlink_to(tmp_path, target_is_directory=True)
    with lora_teacher_server.client() as http:
        response = http.post("/v1/adapters", json={"name": "outside"})
    assert response.status_code == 400 and "outside the adapters directory" in response.json()["error"]["message"]


def test_openai_routes_share_the_engine(teacher_server):
    with teacher_server.client() as http:
        completion = http.post(
            "/v1/completions",
            json={"model": "SmolLM2-135M-Instruct", "prompt": "2 + 2 =", "max_tokens": 4, "logprobs": 2},
        )
        assert completion.status_code == 200, completion.text
        assert len(completion.json()["choices"][0]["logprobs"]["top_logprobs"]) >= 1
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert chat.status_code == 200, chat.text
        conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "2 + 2 ="}]]
        batch = http.post(
            "/v1/chat/completions/batch",
            json={"model": "SmolLM2-135M-Instruct", "messages": conversations, "max_tokens": 4},
        )
        assert batch.status_code == 200, batch.text
        assert sorted(choice["index"] for choice in batch.json()["choices"]) == [0, 1]  # one per conversation
        unknown = http.post("/v1/completions", json={"model": "nobody", "prompt": "x", "max_tokens": 1})
        assert unknown.status_code == 404


def test_openai_routes_count_against_the_teachers_bound(teacher_server):
    """vLLM's OpenAI routes are admitted as the teacher's own are, one engine request per prompt and sample: more
    than the bound admits at all is a 400 naming the field; a streamed completion counts until its stream ends, and
    any request meanwhile that would pass the bound gets 429 with Retry-After."""
    model = "SmolLM2-135M-Instruct"
    too_many = {"model": model, "prompt": ["2 + 2 ="] * (MAX_PENDING_REQUESTS + 1), "max_tokens": 1}
    full = {"model": model, "prompt": [QUESTION] * MAX_PENDING_REQUESTS, "max_tokens": 2048, "ignore_eos": True,
            "temperature": 1.0, "stream": True}
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with teacher_server.client() as http:
        refused = http.post("/v1/completions", json=too_many)
        too_many_samples = http.post("/v1/completions", json={**too_many, "prompt": "x", "n": MAX_PENDING_REQUESTS + 1})
        too_many_chats = http.post("/v1/chat/completions/batch",
                                   json={**chat, "messages": [chat["messages"]] * (MAX_PENDING_REQUESTS + 1)})
        with http.stream("POST", "/v1/completions", json=full) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # kept open: a closed iterator closes the stream
            assert next(lines).startswith("data: ")  # generating
            pending = metric(http.get("/metrics").text, "ssb_teacher_pending_engine_requests")
            busy_chat = http.post("/v1/chat/completions", json=chat)
            busy_rollouts = http.post("/v1/rollouts", json={"questions": [{"question": "q"}],
                                                            "sampling": {"max_tokens": 1}})
        deadline = time.monotonic() + 60  # the stream closed by its client: its engine requests end
        while metric(http.get("/metrics").text, "ssb_teacher_pending_engine_requests") > 0:
            assert time.monotonic() < deadline, "a closed stream still holds the bound"
            time.sleep(0.2)
        two = http.post("/v1/completions", json={**too_many, "prompt": too_many["prompt"][:2]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt", refused.text
    assert f"at most {MAX_PENDING_REQUESTS} at once" in refused.json()["error"]["message"]
    for response, param in [(too_many_samples, "prompt"), (too_many_chats, "messages")]:
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert pending == MAX_PENDING_REQUESTS
    assert busy_chat.status_code == 429 and busy_chat.headers["Retry-After"] == "1", busy_chat.text
    assert busy_rollouts.status_code == 429
    assert two.status_code == 200 and len(two.json()["choices"]) == 2, two.text


def file_content(path):
    """A stored file's content: a pair file's metadata and arrays (safetensors writes its metadata keys in no fixed
    order, so two writes of the same pair can differ in their bytes), any other file's bytes."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata(), {name: f.get_tensor(name).tobytes() for name in f.keys()}


def rollout_texts(store: PairStore) -> dict[str, list[str]]:
    texts = {d.problem_id: [r.text for r in d.rollouts] for d in store.iter_dropped()}
    texts.update({p.record.problem_id: [r.text for r in p.record.rollouts] for p in store.iter_pairs()})
    return texts


def test_curation_through_the_service_writes_the_same_pairs(teacher_server, engine, tmp_path):
    """Same problems, seed and settings, in-process and through the service: the same prompts, and the same pair files
    (records with the prompts as rendered, token ids as generated, raw log-probabilities) wherever the engine's samples
    agree.

    They agree for nearly every sample, not always all: the service submits a request's prompts to the engine one by
    one as they arrive, the in-process engine adds all of them before its first step, so the engine's batches differ,
    and a different batch shape can change the last bits of the logits; where a sampled token sits on such a tie, the
    sample diverges from there on. In bfloat16 that is common (on an AMX CPU 12 of 32 rollouts identical; 46 and 48 of
    48 on an AVX512-BF16 one), in float32, the suite's dtype (tests/conftest.py), rare. The test asserts at least
    85% of rollouts identical, and every pair present on both sides with the same rollouts and explanation equal: the
    record and tokens byte for byte, the top-k log-probabilities within 1e-3 (seen once on a 2-core AVX2 machine:
    identical tokens, log-probabilities that differ in their last bits).
    """
    problems = make_arithmetic_problems(8, seed=0)[5::2]  # of the first eight, the two with a mix: 5 and 7 (a pair)
    config = CurationConfig(
        k=4, seed=0, worked_example=True, rollout_max_tokens=96, explanation_max_tokens=96, explanation_attempts=2
    )
    local, remote = PairStore(tmp_path / "local"), PairStore(tmp_path / "remote")
    local_funnel = curate(problems, engine, local, config)
    with TeacherClient(teacher_server.url, api_key=API_KEY) as client:
        remote_funnel = curate(problems, client, remote, config)
    assert local_funnel.processed == remote_funnel.processed == len(problems)
    # Two explanation attempts per problem with a mix, through the client and the service as in-process.
    assert local_funnel.explanation_attempts == 2 * local_funnel.explained > 0
    assert remote_funnel.explanation_attempts == 2 * remote_funnel.explained
    for store in (local, remote):
        assert all(p.record.explanation_attempts == 2 for p in store.iter_pairs())
        assert all(d.explanation_attempts == 2 for d in store.iter_dropped() if d.explanation is not None)

    local_texts, remote_texts = rollout_texts(local), rollout_texts(remote)
    same = sum(a == b for pid in local_texts for a, b in zip(local_texts[pid], remote_texts[pid], strict=True))
    total = sum(len(texts) for texts in local_texts.values())
    local_files = {p.relative_to(local.root): file_content(p) for p in local.root.rglob("*") if p.is_file()}
    remote_files = {p.relative_to(remote.root): file_content(p) for p in remote.root.rglob("*") if p.is_file()}
    identical = sum(local_files[name] == remote_files.get(name) for name in local_files)
    print(f"\nrollouts identical: {same}/{total}; files identical: {identical}/{len(local_files)}")
    assert same / total >= 0.85

    both = set(local.pair_ids()) & set(remote.pair_ids())
    for problem_id in both:
        mine, theirs = local.load_pair(problem_id), remote.load_pair(problem_id)
        if mine.token_ids == theirs.token_ids and mine.record.rollouts == theirs.record.rollouts:
            assert_same_pair_file(
                local_files[local.pair_path(problem_id).relative_to(local.root)],
                remote_files[remote.pair_path(problem_id).relative_to(remote.root)],
            )
        assert mine.record.student_prompt == theirs.record.student_prompt


def assert_same_pair_file(mine, theirs) -> None:
    """Two pair files of the same tokens: the record and token ids byte for byte; the top-k log-probabilities to the
    last bits a batch shape can change, and the top-k ids wherever their log-probabilities are not tied that closely.
    """
    (mine_meta, mine_arrays), (their_meta, their_arrays) = mine, theirs
    assert mine_meta == their_meta
    assert mine_arrays["token_ids"] == their_arrays["token_ids"]
    if mine_arrays == their_arrays:
        return
    mine_lp, their_lp = (np.frombuffer(a["topk_logprobs"], dtype=np.float32) for a in (mine_arrays, their_arrays))
    mine_ids, their_ids = (np.frombuffer(a["topk_ids"], dtype=np.int32) for a in (mine_arrays, their_arrays))
    np.testing.assert_allclose(mine_lp, their_lp, atol=LOGPROB_TOLERANCE, rtol=0)
    k = len(mine_lp) // len(np.frombuffer(mine_arrays["token_ids"], dtype=np.int32))
    gaps = np.abs(np.diff(mine_lp.reshape(-1, k), axis=1))
    near_tie = np.zeros((len(gaps), k), dtype=bool)
    near_tie[:, 1:] |= gaps < LOGPROB_TOLERANCE
    near_tie[:, :-1] |= gaps < LOGPROB_TOLERANCE
    differ = mine_ids.reshape(-1, k) != their_ids.reshape(-1, k)
    assert not (differ & ~near_tie).any(), "top-k ids differ where their log-probabilities are not tied"


def test_client_names_the_refused_field(teacher_server):
    from shared.schemas import SamplingSettings

    with TeacherClient(teacher_server.url, api_key=API_KEY) as client:
        with pytest.raises(TeacherRejected) as refused:
            client.rollouts(["q"], [SamplingSettings(max_tokens=4090)])
    assert refused.value.status == 400 and refused.value.param == "questions.0.sampling.max_tokens"
    assert json.dumps(refused.value.message)


def test_a_round_two_curation_rolls_out_with_the_adapter_through_the_service(lora_teacher_server, tmp_path):
    """A curator job for a dataset with `rollout_adapter` (the previous round's student) curates through the teachers
    with `AdapterRollouts`: its rollouts come from the adapter, which the teacher loads on first use from its adapters
    directory (the same seeds give other rollouts than the base model's), and its store records the model as
    base+adapter."""
    from services.curator.jobs import AdapterRollouts
    from shared.teacher_client import TeacherPool

    problems = make_arithmetic_problems(2, seed=5)
    config = CurationConfig(k=2, seed=0, worked_example=True, rollout_max_tokens=16, explanation_max_tokens=16)
    base, adapted = PairStore(tmp_path / "base"), PairStore(tmp_path / "round-2")
    try:
        with TeacherPool([lora_teacher_server.url], api_key=API_KEY) as teacher:
            curate(problems, teacher, base, config)
            round_two = AdapterRollouts(teacher, "tiny")
            assert round_two.model_name == f"{teacher.model_name}+tiny"
            curate(problems, round_two, adapted, config)
    finally:
        with lora_teacher_server.client() as http:
            unloaded = http.delete("/v1/adapters/tiny").status_code
    assert unloaded == 204  # it was loaded by the curation

    def rollouts(store: PairStore) -> dict[str, list[str]]:
        found = {d.problem_id: [r.text for r in d.rollouts] for d in store.iter_dropped()}
        found |= {pair.record.problem_id: [r.text for r in pair.record.rollouts] for pair in store.iter_pairs()}
        return found

    assert rollouts(base).keys() == rollouts(adapted).keys() == {p.id for p in problems}
    assert rollouts(base) != rollouts(adapted)
    assert all(pair.record.model == "SmolLM2-135M-Instruct+tiny" for pair in adapted.iter_pairs())


def test_curate_and_eval_commands_use_the_service(lora_teacher_server, tmp_path):
    """`ssb curate --teacher-url` and `ssb eval --teacher-url` as a user runs them, the key from the environment; the
    eval's adapter is a name in the service's adapters directory, loaded on first use."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p.model_dump()) + "\n" for p in make_arithmetic_problems(2, seed=5)))
    env = {**os.environ, "SSB_TEACHER_API_KEY": API_KEY}

    def ssb(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cli.main", *args, "--teacher-url", lora_teacher_server.url]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
        return result

    ssb("curate", "--data", str(problems), "--out", str(tmp_path / "pairs"), "--rollout-max-tokens", "16",
        "--explanation-max-tokens", "16")
    store = PairStore(tmp_path / "pairs")
    assert len(store.pair_ids()) + len(list(store.iter_dropped())) == 2
    report = tmp_path / "eval.json"
    report.write_text("{}")  # an earlier evaluation's report there is replaced, and the command says so
    evaluated = ssb("eval", "--benchmark", str(problems), "--max-tokens", "8", "--adapter", "tiny",
                    "--out", str(report))
    assert "(it replaced the report that was there)" in " ".join(evaluated.stderr.split())
    report = json.loads(report.read_text())
    rows = report["rows"]
    assert [row["name"] for row in rows] == ["base", "tiny"] and all(row["problems"] == 2 for row in rows)
    assert report["config"]["worked_example"] is True  # the teacher serves the small default model, which needs it
    with lora_teacher_server.client() as http:
        assert http.delete("/v1/adapters/tiny").status_code == 204
    # Side by side (each waits on the teacher or on imports): the same curation again, everything in the store done;
    # an adapter the teacher does not have, said at once, before the base model answers a problem; an answer room
    # checked against the teacher's context, whatever this machine's SSB_MAX_MODEL_LEN says; a top-k above the largest
    # the teacher returns (64), said before its first rollout.
    url = ["--teacher-url", lora_teacher_server.url]
    rerun, missing, too_long, too_wide = ssb_side_by_side(
        ["curate", "--data", str(problems), "--out", str(tmp_path / "pairs"), "--rollout-max-tokens", "16",
         "--explanation-max-tokens", "16", *url],
        ["eval", "--benchmark", str(problems), "--adapter", "tinny", "--out", str(tmp_path / "none.json"), *url],
        ["eval", "--benchmark", str(problems), "--max-tokens", "5000", "--out", str(tmp_path / "none.json"), *url],
        ["curate", "--data", str(problems), "--out", str(tmp_path / "wide"), "--topk", "65", *url],
        envs=[env, env, {**env, "SSB_MAX_MODEL_LEN": "256"}, env],
    )
    said = " ".join(rerun.stderr.split())
    assert rerun.returncode == 0 and "already done (skipped) │ 2 │" in said, said
    assert len(store.pair_ids()) + len(list(store.iter_dropped())) == 2
    said = " ".join(missing.stderr.split())
    assert missing.returncode == 1 and "error: the teacher service:" in said and "tinny" in said, said
    said = " ".join(too_long.stderr.split())
    assert too_long.returncode == 2 and "--max-tokens 5000 leaves no room for the prompt in the teacher's 4096 " in said
    assert "evaluating" not in missing.stderr + too_long.stderr and not (tmp_path / "none.json").exists()
    said = " ".join(too_wide.stderr.split())
    assert too_wide.returncode == 2 and "--topk 65 is above the teacher's largest top-k of log-probabilities, 64" in (
        said
    )
    assert "curating" not in said and not (tmp_path / "wide" / "pairs").exists()


@pytest.mark.kills_teacher
def test_a_teacher_whose_engine_dies_ends_so_that_it_can_be_started_again(teacher_server):
    """Kill the engine's core process (as an out-of-memory kill would): the service, which can never serve again,
    ends within seconds with status 1 and every process of its gone, so that what runs it starts it again (compose's
    restart policy) or stops with it (`ssb up`), where it answered 503 for ever. Runs last in the session (the
    marker): the session's service is gone after it."""
    import psutil

    from tests.processes import kill_leftovers

    family = [psutil.Process(teacher_server.process.pid), *psutil.Process(teacher_server.process.pid).children()]
    (core,) = [p for p in family if "EngineCore" in " ".join(p.cmdline())]
    core.kill()
    try:
        returncode = teacher_server.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        returncode = None
    left = kill_leftovers(family, timeout=30)
    log = teacher_server.log()
    assert returncode == 1, f"exit status {returncode}:\n{log[-3000:]}"
    assert "the engine has died: the teacher stops" in log and not left, (left, log[-3000:])


def test_the_client_splits_its_work_by_what_the_teacher_admits_at_once(teacher_server):
    """A teacher that admits fewer engine requests at once (`SSB_MAX_PENDING_REQUESTS`, 16 here) than the client's
    largest request (256 prompts) says so in /v1/models, and the client sends requests it admits: 40 rollouts in 16,
    16 and 8, in order, instead of one refused request; and curation's rollouts and explanations, sent at once, share
    the bound (requests of 8: 16 of each and no 429 between them)."""
    from shared.engine import HintedQuestion
    from shared.schemas import SamplingSettings

    greedy = SamplingSettings(n=1, temperature=0.0, max_tokens=2)
    with TeacherClient(teacher_server.url, api_key=API_KEY) as client, teacher_server.client() as http:
        assert client.served().max_pending_requests == MAX_PENDING_REQUESTS and client.batch_size == 16
        questions = [f"What is {i} + 1?" for i in range(40)]
        results = client.rollouts(questions, [greedy] * 40)
        assert len(results) == 40
        assert all(question in result.prompt.text for question, result in zip(questions, results, strict=True))

        busy = 'endpoint="/v1/explanations",status="429"', 'endpoint="/v1/rollouts",status="429"'
        before = sum(metric(http.get("/metrics").text, "ssb_teacher_requests_total", labels) for labels in busy)
        items = [HintedQuestion(question=q, correct_response=f"{i + 1}", incorrect_response=f"{i}") for i, q in
                 enumerate(questions[:16])]
        with client.sharing_the_bound():
            assert client.batch_size == 8
        assert client.batch_size == 16
        answered, explained = client.rollouts_and_explanations(questions[16:32], [greedy] * 16, items, [greedy] * 16)
        after = sum(metric(http.get("/metrics").text, "ssb_teacher_requests_total", labels) for labels in busy)
    assert len(answered) == len(explained) == 16 and after == before
