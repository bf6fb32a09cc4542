"""Typed records shared by every part of SSB: problems, generations, rollouts and teacher/student pairs.

One definition of each record; the curator writes them, the trainer and evaluation read them, and the
services send them over the wire. Pure pydantic: no torch, no vLLM.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PROBLEM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# The bounds of one generation's settings, shared by every configuration that builds them, so a bad value is refused
# where it is given (a CLI flag, an upload's options) rather than when the first engine call is made.
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]  # vLLM refuses more than 2
TopK = Annotated[int, Field(ge=-1, le=1_048_576)]
MaxTokens = Annotated[int, Field(ge=1, le=32768)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]  # vLLM reads -1 as "no seed"


class Problem(BaseModel):
    """One math problem: a question and its gold final answer."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=PROBLEM_ID_PATTERN, description="Stable id; pairs are keyed by it.")
    question: str = Field(min_length=1, description="The bare question, as the student sees it.")
    answer: str = Field(min_length=1, description="Gold final answer (GSM8K `#### n` already parsed to `n`).")
    source: str | None = Field(default=None, description="Where it came from, e.g. `gsm8k_train.jsonl:12`.")


class ChatMessage(BaseModel):
    """One chat turn, rendered with the model's own chat template."""

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(max_length=200_000, description="What is said.")


class SamplingSettings(BaseModel):
    """How one generation is sampled. `logprobs` asks for the top-k log-probabilities of every generated token."""

    n: int = Field(default=1, ge=1, le=64, description="Samples per prompt.")
    temperature: Temperature = Field(default=0.0, description="0 means greedy.")
    top_k: TopK = Field(default=-1, description="Sample among the k most likely; -1 (or 0) all.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling: the smallest set with this mass.")
    max_tokens: MaxTokens = Field(default=512, description="Most tokens to generate.")
    seed: Seed | None = Field(default=None, description="Per-request seed, for reproducible samples.")
    logprobs: int | None = Field(default=None, ge=1, le=256, description="Top-k log-probabilities per token.")


class RenderedPrompt(BaseModel):
    """A chat rendered with the model's chat template, exactly as the model reads it."""

    messages: list[ChatMessage]
    text: str
    token_ids: list[int]


# The finish reason of a completion cut at the token limit before it ended (vLLM's, and the teacher API's).
CUT_OFF = "length"


class Generation(BaseModel):
    """One sampled completion, with its token ids as generated (never re-tokenized)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    topk_ids: list[list[int]] | None = Field(
        default=None, description="(tokens, k) ids of the top-k tokens of the unmodified model distribution."
    )
    topk_logprobs: list[list[float]] | None = Field(default=None, description="(tokens, k) their log-probabilities.")

    @property
    def cut_off(self) -> bool:
        """Cut at the token limit before it ended."""
        return self.finish_reason == CUT_OFF


class Rollout(BaseModel):
    """One graded rollout of the base model on the bare question."""

    text: str
    num_tokens: int
    extracted: str | None = Field(description="Final answer pulled from the text; None when there is none.")
    correct: bool | None = Field(
        description="Equivalent to the gold answer; None when ungradeable or cut at the token limit."
    )
    truncated: bool = Field(
        default=False,
        description="Cut at the token limit before it ended: whatever number it last wrote is not a final answer, so "
        "its verdict is None and it is never shown as a hint.",
    )


DropReason = Literal[
    "no_mix", "explanation_wrong", "explanation_truncated", "explanation_mentions_hints", "ungradeable"
]


class DroppedProblem(BaseModel):
    """A problem that yielded no pair, and why."""

    problem_id: str
    reason: DropReason
    detail: str = ""
    question: str | None = Field(default=None, description="None in files written before it was recorded.")
    gold: str | None = Field(default=None, description="The gold answer; None in files written before it was recorded.")
    rollouts: list[Rollout] = Field(default_factory=list)
    explanation: str | None = Field(default=None, description="The first hinted explanation, when one was asked for.")
    explanation_attempts: int | None = Field(
        default=None,
        ge=0,
        description="Hinted explanations sampled (none passed); 0 when none was asked for (no mix), None in files "
        "written before attempts were recorded (one attempt).",
    )


class PairRecord(BaseModel):
    """Everything about one verified teacher/student pair except the per-token arrays.

    The arrays (explanation token ids, top-k ids and log-probabilities) travel beside it; see `shared.storage`.
    """

    problem_id: str
    question: str
    gold: str
    rollouts: list[Rollout]
    correct_hint_index: int = Field(description="Index in `rollouts` of the correct response shown as a hint.")
    incorrect_hint_index: int = Field(description="Index in `rollouts` of the wrong response shown as a hint.")
    prompt_version: str
    worked_example: bool = Field(
        default=False, description="The worked example turn came before the question in every prompt of this pair."
    )
    teacher_prompt: RenderedPrompt
    student_prompt: RenderedPrompt
    explanation: str
    explanation_extracted: str | None
    explanation_attempts: int = Field(default=1, ge=1, description="Hinted explanations sampled for this problem.")
    explanation_attempt: int = Field(
        default=0,
        ge=0,
        description="Which attempt is the pair (0-based, in sample order): the first that passed verification. vLLM "
        "seeds attempt i with `explanation_sampling.seed + i`.",
    )
    model: str
    rollout_sampling: SamplingSettings
    explanation_sampling: SamplingSettings
    topk: int


class Pair(BaseModel):
    """A pair with its teacher signal: `token_ids[t]` was generated; `topk_*[t]` is the teacher's top-k at step t."""

    record: PairRecord
    token_ids: list[int]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
