"""What curation and evaluation need from a model engine: render a chat, generate in batches with log-probabilities.

`services/teacher/engine.py` implements it on vLLM in-process; an HTTP client of the teacher service can implement it
too, so the curator never imports the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shared.schemas import ChatMessage, Generation, RenderedPrompt, SamplingSettings


class Engine(Protocol):
    """A model that renders chats with its own template and generates `n` completions per prompt."""

    @property
    def model_name(self) -> str: ...

    def render(self, messages: Sequence[ChatMessage]) -> RenderedPrompt: ...

    def generate(
        self,
        prompts: Sequence[RenderedPrompt],
        sampling: SamplingSettings | Sequence[SamplingSettings],
        *,
        adapter: str | None = None,
    ) -> list[list[Generation]]: ...
