"""Shared fixtures: the real small model and one real vLLM engine for the whole test session.

The engine starts once (about half a minute on the CPU) the first time a test asks for it; tests that need it carry the
`engine` marker. The default model is pulled by `make model` (a dependency of `make test`) or here on first use.
"""

from __future__ import annotations

import pytest



@pytest.fixture(scope="session")
def settings():
    from shared.settings import Settings

    return Settings()


@pytest.fixture(scope="session")
def model_path(settings) -> str:
    from cli.runtime import ensure_model

    return ensure_model(None, settings)


@pytest.fixture(scope="session")
def engine(model_path):
    from services.teacher.engine import EngineOptions, TeacherEngine

    with TeacherEngine(EngineOptions(model=model_path, kv_cache_gib=2, max_logprobs=64)) as engine:
        yield engine


def pytest_collection_modifyitems(items):
    for item in items:
        if "engine" in item.fixturenames:
            item.add_marker(pytest.mark.engine)
