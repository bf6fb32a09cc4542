"""The teacher engine on the real small model: chat rendering, batched sampling, and which distribution it reports."""

import math
import os
import tempfile
from pathlib import Path

import pytest

from services.teacher.engine import EngineEnvironmentError, engine_environment, remove_ipc_directory
from shared.prompts import build_student_messages
from shared.schemas import SamplingSettings
from tests.conftest import engine_dtype

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"


def test_render_uses_the_models_chat_template(engine):
    prompt = engine.render(build_student_messages(QUESTION))
    assert prompt.text.startswith("<|im_start|>system\n")
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert QUESTION in prompt.text
    assert engine.tokenizer.decode(prompt.token_ids) == prompt.text


def test_batched_generation_returns_n_samples_that_stop_at_end_of_turn(engine):
    prompts = [engine.render(build_student_messages(q)) for q in (QUESTION, "What is 5 + 6?")]
    # One of these six samples ends at its 56th token (float32: the same on any CPU); 64 decoding steps instead of 128.
    results = engine.generate(prompts, SamplingSettings(n=3, temperature=0.8, top_k=50, max_tokens=64, seed=1))
    assert [len(r) for r in results] == [3, 3]
    stopped = [g for r in results for g in r if g.finish_reason == "stop"]
    assert stopped, "no sample ended at <|im_end|>"
    for generation in stopped:
        assert generation.token_ids[-1] == engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert "<|im_end|>" not in generation.text


def test_reporting_counts_a_calls_sequences_as_they_finish_and_changes_no_output(engine):
    """Two requests that finish at different steps: 2 + 3 sequences, reported at the start, after the short one and at
    the end; seeded outputs the same as without reporting, and nothing reported outside the block."""
    prompts = [engine.render(build_student_messages(q)) for q in (QUESTION, "What is 5 + 6?")]
    sampling = [
        SamplingSettings(n=2, temperature=0.8, max_tokens=2, seed=1),
        SamplingSettings(n=3, temperature=0.8, max_tokens=16, seed=2),
    ]
    reports: list[tuple[int, int]] = []
    with engine.reporting(lambda finished, total: reports.append((finished, total))):
        reported = engine.generate(prompts, sampling)
    plain = engine.generate(prompts, sampling)
    assert reports == [(0, 5), (2, 5), (5, 5)]
    assert [[g.token_ids for g in r] for r in reported] == [[g.token_ids for g in r] for r in plain]


def test_seeded_sampling_is_reproducible(engine):
    prompt = engine.render(build_student_messages(QUESTION))
    sampling = SamplingSettings(n=2, temperature=1.0, max_tokens=20, seed=123)
    first, second = engine.generate([prompt], sampling), engine.generate([prompt], sampling)
    assert [g.token_ids for g in first[0]] == [g.token_ids for g in second[0]]


def test_logprobs_are_the_unmodified_distribution_not_the_temperature_scaled_one(engine):
    """Generate at T=0.4 with top-k log-probabilities, then score the same token ids in a separate pass.

    The scoring pass sees no temperature, so its numbers are the model's own distribution. The stored ones agree with it
    up to the engine's rounding (float32: about 1e-5 on average; bfloat16: 0.08 to 0.10 measured on an AMX CPU), and
    are far from what temperature scaling would give (log_softmax(logp / T)).
    """
    k, temperature = 20, 0.4
    prompt = engine.render(build_student_messages(QUESTION))
    (generation,) = engine.generate(
        [prompt], SamplingSettings(temperature=temperature, max_tokens=48, seed=7, logprobs=k)
    )[0]
    assert len(generation.topk_ids) == len(generation.token_ids) > 10
    scored_ids, scored_logprobs = engine.score(prompt.token_ids, generation.token_ids, k)

    raw_diffs, tempered_diffs = [], []
    for t in range(len(generation.token_ids)):
        assert len(generation.topk_ids[t]) == k
        assert generation.topk_logprobs[t] == sorted(generation.topk_logprobs[t], reverse=True)
        stored = dict(zip(generation.topk_ids[t], generation.topk_logprobs[t]))
        scored = dict(zip(scored_ids[t], scored_logprobs[t]))
        scaled = {i: lp / temperature for i, lp in scored.items()}
        top = max(scaled.values())
        log_norm = top + math.log(sum(math.exp(v - top) for v in scaled.values()))
        for token_id in stored.keys() & scored.keys():
            raw_diffs.append(abs(stored[token_id] - scored[token_id]))
            tempered_diffs.append(abs(stored[token_id] - (scaled[token_id] - log_norm)))
    assert len(raw_diffs) > 10 * k
    mean_raw = sum(raw_diffs) / len(raw_diffs)
    mean_tempered = sum(tempered_diffs) / len(tempered_diffs)
    bound = 0.2 if engine_dtype(engine) == "bfloat16" else 1e-3
    assert mean_raw < bound, f"stored vs scored log-probabilities differ by {mean_raw:.3g} on average"
    assert mean_tempered > 10 * mean_raw, (mean_raw, mean_tempered)


def test_each_engine_builds_with_a_socket_directory_of_its_own_and_the_variables_come_back(monkeypatch, tmp_path):
    """vLLM's variables hold only while an engine is built: its IPC sockets' directory, new inside the user's
    VLLM_RPC_BASE_PATH, and the multiprocessing switch. The directory stays for the engine to remove on closing (the
    SIGTERM test and the user path check that nothing is left), and goes at once if the build fails."""
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with engine_environment(in_process=True) as ipc_dir:
        assert os.environ["VLLM_RPC_BASE_PATH"] == ipc_dir and Path(ipc_dir).parent == tmp_path
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert Path(ipc_dir).is_dir()
    assert os.environ["VLLM_RPC_BASE_PATH"] == str(tmp_path) and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    with pytest.raises(RuntimeError, match="no engine"), engine_environment() as failed:
        raise RuntimeError("no engine")
    assert not Path(failed).exists() and os.environ["VLLM_RPC_BASE_PATH"] == str(tmp_path)
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", "")  # as an empty line of a .env file sets it: the temporary directory
    with engine_environment() as default:
        assert Path(default).is_absolute() and Path(default).parent == Path(tempfile.gettempdir())
    remove_ipc_directory(default)
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path / "missing"))
    with pytest.raises(EngineEnvironmentError, match=f"VLLM_RPC_BASE_PATH={tmp_path / 'missing'} .No such file"):
        with engine_environment():
            pass


def test_the_session_engine_keeps_its_socket_directory_while_open(engine):
    assert Path(engine.ipc_dir).is_dir() and not engine.closed
