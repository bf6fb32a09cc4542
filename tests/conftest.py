"""Shared fixtures: the real small model and one real vLLM engine for the whole test session.

The engine starts once (about half a minute on the CPU) the first time a test asks for it; tests that need it carry the
`engine` marker. The tests that serve a LoRA adapter in-process share a second engine built for LoRA (`lora_engine`).
The default model is pulled by `make model` (a dependency of `make test`) or here on first use. The tests that need
Redis use one the session starts for itself (tests/redis_server.py).

Every engine of the suite, in-process or in a process it starts, computes in float32 (`SSB_DTYPE`; set it to run the
suite in another dtype). The suite compares engines that see different batches (in-process against the service, the
merged copy against the LoRA, curation by two workers against one process), and only float32 gives numbers that do not
change with the batch on every CPU: in bfloat16 on a CPU with AMX, vLLM's kernels change the logits with the batch's
shape (the same prompt and seed, alone and in a batch of 8: 0 of 4 samples the same, each parting after 9 to 34
tokens; in float32 4 of 4), and the CPUs without BF16 run float32 anyway. One test sets it back to `auto` for the
command it runs: `ssb run` in tests/cli/test_run.py, which should run as `make demo` does (its evaluations are in
float32 whatever the CPU).
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.redis_server import start_session_redis, stop_session_redis

# The suite's services, workers and commands read their settings from SSB_* variables: the host's own (an exported
# `.env`, SSB_MODEL, SSB_RETRY_AFTER_SECONDS) would change what they do. Only where the model lives and the dtype stay;
# loopback calls never go through a proxy.
for name in [name for name in os.environ if name.startswith("SSB_") and name not in ("SSB_HOME", "SSB_DTYPE")]:
    del os.environ[name]
os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
os.environ.setdefault("SSB_DTYPE", "float32")

# The suite's own Redis (tests/redis_server.py), up now: pytest imports this file before any conftest below it, and
# those read its URL when they are imported.
SESSION_REDIS = start_session_redis()


def pytest_configure(config):
    """A SIGTERM (a CI job's time limit, `kill`) ends the run as Ctrl-C does: the fixtures tear down, so the engines,
    services and Redis the session started stop with it instead of running on without it."""
    signal.signal(signal.SIGTERM, interrupt)


def interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_unconfigure(config):
    stop_session_redis(SESSION_REDIS)


@pytest.fixture(scope="session")
def settings():
    from shared.settings import Settings

    return Settings()


@pytest.fixture(scope="session")
def model_path(settings) -> str:
    from cli.runtime import ensure_model

    return ensure_model(None, settings)


def engine_dtype(engine) -> str:
    """The dtype an engine computes in, "auto" resolved."""
    from services.teacher.engine import resolved_dtype

    return resolved_dtype(engine.options.dtype)


@pytest.fixture(scope="session")
def engine(model_path, settings):
    """The base model without LoRA support: on a CPU, an engine built for LoRA runs plain requests at less than half
    the speed (docs/BENCHMARKS.md, "what LoRA support costs on a CPU"), and most tests need no adapter."""
    from services.teacher.engine import EngineOptions, TeacherEngine

    options = EngineOptions(model=model_path, dtype=settings.dtype, kv_cache_gib=2, max_logprobs=64, enable_lora=False)
    with TeacherEngine(options) as engine:
        yield engine


@pytest.fixture(scope="session")
def lora_engine(model_path, settings):
    """A second engine on the same model, built for LoRA adapters, for the tests that serve one in-process (theirs have
    rank 8 at most: on a CPU each step costs more with a larger bound, adapter or not)."""
    from services.teacher.engine import EngineOptions, TeacherEngine

    options = EngineOptions(
        model=model_path, dtype=settings.dtype, kv_cache_gib=0.5, max_logprobs=64, enable_lora=True, max_lora_rank=8
    )
    with TeacherEngine(options) as engine:
        yield engine


# How the session's curated pairs are made: the curation test's settings (paper sampling, the worked example, the
# demo's token limits, top-20), on six arithmetic problems of seed 0: the fifth to the eighth (the curator's two-worker
# test repeats them through the service) and two more that pair. In float32 the outcome depends on neither the batch
# nor the CPU (each problem has its own seed): of the first 64 problems, 7, 11, 28, 51 and 56 pair, and of the first
# eight 5 and 7 have a mix of right and wrong rollouts (5's explanation is wrong), so these six give the three pairs
# the tests need (two training steps of two pairs) and three problems dropped for the funnel (two without a mix, one
# explanation wrong). The first 32 problems, with the engine's start, took 55 s natively on an AMX Xeon and 118 s in
# the AVX2-only stand-in; the first eight with 11 and 28, 33 s natively on an AVX512-BF16 EPYC.
SESSION_PROBLEMS = (4, 5, 6, 7, 11, 28)


def session_problems() -> list:
    """The session's curated problems (SESSION_PROBLEMS of the arithmetic problems of seed 0), in that order."""
    from shared.arithmetic import make_arithmetic_problems

    problems = make_arithmetic_problems(max(SESSION_PROBLEMS) + 1, seed=0)
    return [problems[index] for index in SESSION_PROBLEMS]


CURATION_CONFIG = dict(k=4, seed=0, worked_example=True, rollout_max_tokens=192, explanation_max_tokens=256, topk=20)


@pytest.fixture(scope="session")
def curation_run(engine, tmp_path_factory):
    """The session's one real curation: (problems, store, funnel) of `curate()` on the session's vLLM engine."""
    from services.curator.curation import curate
    from shared.settings import CurationConfig
    from shared.storage import PairStore

    problems = session_problems()
    store = PairStore(tmp_path_factory.mktemp("curated"))
    funnel = curate(problems, engine, store, CurationConfig(**CURATION_CONFIG))
    return problems, store, funnel


@pytest.fixture(scope="session")
def curated_pairs(curation_run):
    """A curation output directory (`DIR/pairs/`, `DIR/dropped/`) written by `curate()` on the session's vLLM engine.

    Shared by the tests that tie the engine's numbers to the trainer's; at least a few pairs (checked here).
    """
    _, store, funnel = curation_run
    assert funnel.pairs >= 3, f"only {funnel.pairs} verified pairs from {len(SESSION_PROBLEMS)} arithmetic problems"
    return store.root


@pytest.fixture(scope="session", autouse=True)
def teacher_servers_started_early(request, tmp_path_factory):
    """Start the session's teacher services that its tests need before the first test, in the background and at the
    lowest priority: each takes about 15 s to start, mostly one core importing, and the tests before the first that
    needs one leave a core idle for much of their time (docs/BENCHMARKS.md, "an Intel Xeon with AVX512-BF16 and
    AMX"). Those no fixture claimed are stopped at the end."""
    from tests.teacher_server import start_early, stop_unclaimed

    for lora, fixture in ((False, "teacher_server"), (True, "lora_teacher_server")):
        if any(fixture in item.fixturenames for item in request.session.items):
            start_early(request.getfixturevalue("model_path"), tmp_path_factory, lora=lora)
    yield
    stop_unclaimed()


@pytest.fixture(scope="session")
def teacher_server(model_path, tmp_path_factory):
    """The real teacher service as its own process on loopback, started once per session (tests/teacher_server.py):
    a bearer key, a small admission bound, no LoRA support (`--no-lora`: on a CPU it generates twice as fast), for the
    tests that curate through it."""
    from tests.teacher_server import start_teacher_server

    yield from start_teacher_server(model_path, tmp_path_factory, lora=False)


@pytest.fixture(scope="session")
def lora_teacher_server(model_path, tmp_path_factory):
    """A second teacher process like `teacher_server`, built for LoRA adapters, its adapters directory holding the tiny
    adapter `tiny`: for the tests that serve adapters through the service."""
    from tests.teacher_server import start_teacher_server

    yield from start_teacher_server(model_path, tmp_path_factory, lora=True)


def pytest_collection_modifyitems(items):
    for item in items:
        if "engine" in item.fixturenames or "lora_engine" in item.fixturenames:
            item.add_marker(pytest.mark.engine)
    # A test that kills the session teacher's engine runs after every test that may still need the teacher. The main
    # job's test runs first: its commands leave a core idle much of the time, which the session's teacher services,
    # starting in the background (`teacher_servers_started_early`), use instead of competing with the session engine.
    items.sort(key=lambda item: (
        item.get_closest_marker("runs_first") is None, item.get_closest_marker("kills_teacher") is not None
    ))
