"""The teacher's wire schemas: the compact top-k encoding round-trips exactly (float32), is far smaller and faster than
JSON, and requests are bounded with errors that name the field."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from pydantic import ValidationError

from shared.teacher_api import (
    AdapterLoadRequest,
    ExplanationsRequest,
    LogprobsRequest,
    RolloutsRequest,
    TopKBase64,
    TopKJson,
    decode_topk,
    encode_topk,
)


def random_topk(tokens: int, k: int, seed: int = 0) -> tuple[list[list[int]], list[list[float]]]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 150_000, size=(tokens, k), dtype=np.int32)
    logprobs = np.sort(-rng.exponential(3.0, size=(tokens, k)).astype(np.float32), axis=1)[:, ::-1]
    return ids.tolist(), logprobs.tolist()


def test_base64_round_trip_is_exact_for_float32_values():
    ids, logprobs = random_topk(7, 5)
    encoded = encode_topk(ids, logprobs, "base64")
    assert isinstance(encoded, TopKBase64) and encoded.shape == (7, 5)
    assert decode_topk(TopKBase64.model_validate_json(encoded.model_dump_json())) == (ids, logprobs)
    assert decode_topk(encode_topk(ids, logprobs, "json")) == (ids, logprobs)


def test_hand_computed_bytes_are_little_endian():
    encoded = encode_topk([[1, 256]], [[-0.5, -2.0]], "base64")
    import base64

    assert base64.b64decode(encoded.ids) == bytes([1, 0, 0, 0, 0, 1, 0, 0])
    assert base64.b64decode(encoded.logprobs) == np.array([-0.5, -2.0], dtype="<f4").tobytes()


def test_empty_and_ragged_arrays():
    assert decode_topk(encode_topk([], [], "base64")) == ([], [])
    with pytest.raises(ValueError, match="tokens, k"):
        encode_topk([[1, 2], [3]], [[0.0, 0.0], [0.0]], "base64")
    bad = TopKBase64(shape=(2, 2), ids="AAAAAA==", logprobs="AAAAAA==")
    with pytest.raises(ValueError, match="shape says 2x2"):
        decode_topk(bad)


def test_compact_encoding_is_less_than_half_the_bytes_of_json_for_1000_tokens_at_k20():
    """Size and encode+decode time, 1,000 tokens x k=20 (printed; benchmarks/teacher_service.py reports them). The times
    are about equal: turning the arrays back into Python lists costs as much as parsing JSON."""
    ids, logprobs = random_topk(1000, 20)

    def timed(encoding: str, cls):
        started = time.perf_counter()
        for _ in range(5):
            text = encode_topk(ids, logprobs, encoding).model_dump_json()
            decode_topk(cls.model_validate_json(text))
        return len(text), (time.perf_counter() - started) / 5

    json_bytes, json_seconds = timed("json", TopKJson)
    b64_bytes, b64_seconds = timed("base64", TopKBase64)
    print(f"\njson {json_bytes:,} B {1e3 * json_seconds:.1f} ms; base64 {b64_bytes:,} B {1e3 * b64_seconds:.1f} ms")
    assert b64_bytes == pytest.approx(40_000 * 4 * 4 / 3, rel=0.01)
    assert b64_bytes < json_bytes / 2


def error_fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def test_requests_are_bounded_and_errors_name_the_field():
    with pytest.raises(ValidationError) as exc:
        RolloutsRequest.model_validate({"questions": []})
    assert error_fields(exc.value) == {"questions"}
    with pytest.raises(ValidationError) as exc:
        RolloutsRequest.model_validate({"questions": [{"question": "1+1?", "sampling": {"n": 0}}]})
    assert error_fields(exc.value) == {"questions.0.sampling.n"}
    with pytest.raises(ValidationError) as exc:
        ExplanationsRequest.model_validate({"items": [{"question": "q", "correct_response": "a"}]})
    assert error_fields(exc.value) == {"items.0.incorrect_response"}
    with pytest.raises(ValidationError, match="exactly one of prompt_token_ids and messages"):
        LogprobsRequest.model_validate({"reply_text": "x"})
    with pytest.raises(ValidationError) as exc:
        AdapterLoadRequest.model_validate({"name": "../evil"})
    assert error_fields(exc.value) == {"name"}


def test_defaults_are_the_papers():
    rollouts = RolloutsRequest.model_validate({"questions": [{"question": "q"}]})
    assert (rollouts.sampling.n, rollouts.sampling.temperature, rollouts.sampling.top_k) == (4, 0.8, 50)
    explanations = ExplanationsRequest.model_validate(
        {"items": [{"question": "q", "correct_response": "a", "incorrect_response": "b"}]}
    )
    assert (explanations.sampling.temperature, explanations.sampling.logprobs) == (0.4, 20)
    assert json.loads(rollouts.model_dump_json())["topk_encoding"] == "base64"
