"""What curation and evaluation need from a teacher: rollouts on bare questions and hinted explanations, each with the
prompt exactly as the model read it.

The protocol speaks of questions and hints, not of rendered prompts, because a remote teacher renders with its own
tokenizer: `services/teacher/engine.py` implements it in-process (through `PromptingEngine`, from its `render` and
`generate`), and `shared/teacher_client.py` implements it over HTTP against the teacher service, so the curator never
imports the teacher. Prompts are built by `shared/prompts.py` in both places.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from pydantic import BaseModel, Field

from shared.prompts import build_hinted_messages, build_student_messages
from shared.schemas import ChatMessage, Generation, RenderedPrompt, SamplingSettings


class HintedQuestion(BaseModel):
    """A question with one correct and one incorrect earlier response: the input of a hinted explanation."""

    question: str
    correct_response: str
    incorrect_response: str


class PromptedGenerations(BaseModel):
    """One rendered prompt and the `n` generations sampled from it."""

    prompt: RenderedPrompt = Field(description="The chat as the model read it.")
    generations: list[Generation]


class Engine(Protocol):
    """A teacher that answers bare questions (rollouts) and writes hinted explanations; one sampling per input."""

    @property
    def model_name(self) -> str: ...

    @property
    def dtype(self) -> str | None:
        """The dtype the model computes in (float32, bfloat16, float16), which evaluation reports record; None where
        unknown (a teacher of an earlier version does not say)."""
        ...

    def rollouts(
        self,
        questions: Sequence[str],
        sampling: Sequence[SamplingSettings],
        *,
        worked_example: bool = False,
        adapter: str | None = None,
    ) -> list[PromptedGenerations]: ...

    def explanations(
        self,
        items: Sequence[HintedQuestion],
        sampling: Sequence[SamplingSettings],
        *,
        worked_example: bool = False,
    ) -> list[PromptedGenerations]: ...

    def rollouts_and_explanations(
        self,
        questions: Sequence[str],
        rollout_sampling: Sequence[SamplingSettings],
        items: Sequence[HintedQuestion],
        explanation_sampling: Sequence[SamplingSettings],
        *,
        worked_example: bool = False,
    ) -> tuple[list[PromptedGenerations], list[PromptedGenerations]]:
        """`rollouts` and `explanations` batched together (either list may be empty), as pipelined curation sends
        them: the engine fills the tail of one batch's rollouts with the explanations of the batch before."""
        ...


def rollout_messages(questions: Sequence[str], *, worked_example: bool) -> list[list[ChatMessage]]:
    """The chats of rollouts: one student prompt per question (the in-process engine and the service both use this)."""
    return [build_student_messages(q, worked_example=worked_example) for q in questions]


def explanation_messages(items: Sequence[HintedQuestion], *, worked_example: bool) -> list[list[ChatMessage]]:
    """The chats of hinted explanations: one teacher prompt per item."""
    return [
        build_hinted_messages(i.question, i.correct_response, i.incorrect_response, worked_example=worked_example)
        for i in items
    ]


def check_lengths(what: str, inputs: Sequence, sampling: Sequence[SamplingSettings]) -> None:
    if len(inputs) != len(sampling):
        raise ValueError(f"{len(inputs)} {what} but {len(sampling)} sampling settings")


class ConcurrentCalls:
    """`rollouts_and_explanations` as two concurrent calls, for engines whose calls may overlap (a teacher service
    batches the requests of all its clients together), made inside `sharing_the_bound` (an engine that bounds what
    it admits at once sizes each call's requests to its share of the bound)."""

    def sharing_the_bound(self, calls: int = 2) -> AbstractContextManager:
        """While `calls` calls run at once; nothing to share by default."""
        return nullcontext()

    def rollouts_and_explanations(
        self,
        questions: Sequence[str],
        rollout_sampling: Sequence[SamplingSettings],
        items: Sequence[HintedQuestion],
        explanation_sampling: Sequence[SamplingSettings],
        *,
        worked_example: bool = False,
    ) -> tuple[list[PromptedGenerations], list[PromptedGenerations]]:
        check_lengths("questions", questions, rollout_sampling)
        check_lengths("items", items, explanation_sampling)
        if not items:
            return self.rollouts(questions, rollout_sampling, worked_example=worked_example), []
        # The explanations in a daemon thread: should Ctrl-C or SIGTERM end the command during the rollouts, its exit
        # does not wait for the other call to the teacher (up to its read timeout). Other errors wait for it, so that
        # a caller that retries (the curator, problem by problem) does not compete with a call nobody reads.
        explained: dict = {}

        def explain() -> None:
            try:
                explained["result"] = self.explanations(items, explanation_sampling, worked_example=worked_example)
            except BaseException as exc:  # raised in the caller's thread, below
                explained["error"] = exc

        with self.sharing_the_bound(2 if questions else 1):
            thread = threading.Thread(target=explain, name="ssb-explanations", daemon=True)
            thread.start()
            try:
                answered = (
                    self.rollouts(questions, rollout_sampling, worked_example=worked_example) if questions else []
                )
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:
                thread.join()
                raise
            thread.join()
        if "error" in explained:
            raise explained["error"]
        return answered, explained["result"]


class PromptingEngine:
    """The `Engine` protocol on top of `render(messages)` and `generate(prompts, sampling, adapter=)`: builds each
    prompt with `shared.prompts`, renders it, and generates for all of them in one batch."""

    dtype: str | None = None  # an engine that knows its dtype says it

    def render(self, messages: Sequence[ChatMessage]) -> RenderedPrompt:
        raise NotImplementedError

    def generate(
        self,
        prompts: Sequence[RenderedPrompt],
        sampling: SamplingSettings | Sequence[SamplingSettings],
        *,
        adapter: str | None = None,
    ) -> list[list[Generation]]:
        raise NotImplementedError

    def rollouts(
        self,
        questions: Sequence[str],
        sampling: Sequence[SamplingSettings],
        *,
        worked_example: bool = False,
        adapter: str | None = None,
    ) -> list[PromptedGenerations]:
        check_lengths("questions", questions, sampling)
        prompts = [self.render(m) for m in rollout_messages(questions, worked_example=worked_example)]
        outputs = self.generate(prompts, list(sampling), adapter=adapter)
        return [PromptedGenerations(prompt=p, generations=g) for p, g in zip(prompts, outputs, strict=True)]

    def explanations(
        self,
        items: Sequence[HintedQuestion],
        sampling: Sequence[SamplingSettings],
        *,
        worked_example: bool = False,
    ) -> list[PromptedGenerations]:
        check_lengths("items", items, sampling)
        prompts = [self.render(m) for m in explanation_messages(items, worked_example=worked_example)]
        outputs = self.generate(prompts, list(sampling))
        return [PromptedGenerations(prompt=p, generations=g) for p, g in zip(prompts, outputs, strict=True)]

    def rollouts_and_explanations(
        self,
        questions: Sequence[str],
        rollout_sampling: Sequence[SamplingSettings],
        items: Sequence[HintedQuestion],
        explanation_sampling: Sequence[SamplingSettings],
        *,
        worked_example: bool = False,
    ) -> tuple[list[PromptedGenerations], list[PromptedGenerations]]:
        """Both in one engine call: one batch of rollout and explanation prompts."""
        check_lengths("questions", questions, rollout_sampling)
        check_lengths("items", items, explanation_sampling)
        messages = rollout_messages(questions, worked_example=worked_example) + explanation_messages(
            items, worked_example=worked_example
        )
        prompts = [self.render(m) for m in messages]
        outputs = self.generate(prompts, [*rollout_sampling, *explanation_sampling]) if prompts else []
        results = [PromptedGenerations(prompt=p, generations=g) for p, g in zip(prompts, outputs, strict=True)]
        return results[: len(questions)], results[len(questions) :]
