"""The teacher service's wire schemas: every request and response of `/v1/rollouts`, `/v1/explanations`,
`/v1/logprobs`, `/v1/models` and `/v1/adapters`, with bounds and descriptions (they are the API reference at `/docs`).

The service (services/teacher/) validates requests with these models and the client (shared/teacher_client.py) builds
them, so the two cannot disagree. Per-token top-k arrays travel as JSON lists or, much smaller, as base64 of
little-endian int32 ids and float32 log-probabilities (`encode_topk` / `decode_topk`, pure functions); the request's
`topk_encoding` chooses. float32 is what the pair files store, so the compact form loses nothing that is kept.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.schemas import ChatMessage, Generation, RenderedPrompt, SamplingSettings

MAX_BATCH = 256
MAX_TEXT_CHARS = 200_000
MAX_TOKEN_IDS = 131_072
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

TopKEncoding = Literal["json", "base64"]
AdapterName = Annotated[
    str, Field(pattern=ADAPTER_NAME_PATTERN, description="Name of an adapter loaded with `POST /v1/adapters`.")
]
QuestionText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


def paper_rollout_sampling() -> SamplingSettings:
    """The paper's rollout sampling: 4 samples at temperature 0.8, top-k 50."""
    return SamplingSettings(n=4, temperature=0.8, top_k=50, max_tokens=512)


def paper_explanation_sampling() -> SamplingSettings:
    """The paper's hinted explanation: one sample at temperature 0.4, with the top-20 log-probabilities per token."""
    return SamplingSettings(n=1, temperature=0.4, max_tokens=768, logprobs=20)


class TopKJson(BaseModel):
    """Per-token top-k as JSON lists: `ids[t][j]` is the j-th most likely token at step t, `logprobs[t][j]` its
    log-probability under the unmodified model distribution."""

    encoding: Literal["json"] = "json"
    ids: list[list[int]] = Field(description="(tokens, k) token ids, most likely first.")
    logprobs: list[list[float]] = Field(description="(tokens, k) their log-probabilities.")


class TopKBase64(BaseModel):
    """Per-token top-k as base64 of row-major little-endian arrays: int32 ids and float32 log-probabilities."""

    encoding: Literal["base64"] = "base64"
    shape: tuple[int, int] = Field(description="(tokens, k).")
    ids: str = Field(description="base64 of tokens*k little-endian int32 token ids, row-major.")
    logprobs: str = Field(description="base64 of tokens*k little-endian float32 log-probabilities, row-major.")


TopK = Annotated[TopKJson | TopKBase64, Field(discriminator="encoding")]


def encode_topk(ids: list[list[int]], logprobs: list[list[float]], encoding: TopKEncoding = "base64") -> TopK:
    """Pack (tokens, k) ids and log-probabilities; every row must have the same k."""
    if encoding == "json":
        return TopKJson(ids=ids, logprobs=logprobs)
    try:
        ids_array = np.asarray(ids, dtype="<i4").reshape(len(ids), -1) if ids else np.zeros((0, 0), "<i4")
        logprobs_array = np.asarray(logprobs, dtype="<f4").reshape(len(logprobs), -1) if ids else np.zeros((0, 0))
    except ValueError as exc:
        raise ValueError(f"top-k arrays must be (tokens, k) with the same k in every row: {exc}") from exc
    if ids_array.ndim != 2 or ids_array.shape != logprobs_array.shape:
        shapes = f"{ids_array.shape} and {logprobs_array.shape}"
        raise ValueError(f"top-k arrays must be (tokens, k) and alike, got {shapes}")
    return TopKBase64(
        shape=ids_array.shape,
        ids=base64.b64encode(ids_array.astype("<i4").tobytes()).decode("ascii"),
        logprobs=base64.b64encode(logprobs_array.astype("<f4").tobytes()).decode("ascii"),
    )


def decode_topk(topk: TopK) -> tuple[list[list[int]], list[list[float]]]:
    """Unpack either encoding to (tokens, k) lists of ids and log-probabilities."""
    if isinstance(topk, TopKJson):
        return topk.ids, topk.logprobs
    tokens, k = topk.shape
    ids = np.frombuffer(base64.b64decode(topk.ids), dtype="<i4")
    logprobs = np.frombuffer(base64.b64decode(topk.logprobs), dtype="<f4")
    if ids.size != tokens * k or logprobs.size != tokens * k:
        raise ValueError(
            f"top-k payload holds {ids.size} ids and {logprobs.size} log-probabilities, shape says {tokens}x{k}"
        )
    return ids.reshape(tokens, k).tolist(), logprobs.reshape(tokens, k).tolist()


class Sample(BaseModel):
    """One generated completion: its text, its token ids as generated (never re-tokenized), and optionally its top-k."""

    text: str = Field(description="The completion, detokenized.")
    token_ids: list[int] = Field(description="The generated token ids, the end-of-turn token included when it stopped.")
    finish_reason: str | None = Field(description="`stop` (end of turn) or `length` (cut at max_tokens).")
    topk: TopK | None = Field(default=None, description="Per generated token, the top-k of the unmodified model.")

    def to_generation(self) -> Generation:
        topk_ids = topk_logprobs = None
        if self.topk is not None:
            topk_ids, topk_logprobs = decode_topk(self.topk)
        return Generation(
            text=self.text,
            token_ids=self.token_ids,
            finish_reason=self.finish_reason,
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
        )


def sample_from_generation(generation: Generation, encoding: TopKEncoding) -> Sample:
    topk = None
    if generation.topk_ids is not None:
        topk = encode_topk(generation.topk_ids, generation.topk_logprobs or [], encoding)
    return Sample(
        text=generation.text, token_ids=generation.token_ids, finish_reason=generation.finish_reason, topk=topk
    )


class PromptedSamples(BaseModel):
    """One prompt as the model read it, and the samples generated from it."""

    prompt: RenderedPrompt = Field(description="The chat as rendered by the model's template: messages, text, ids.")
    samples: list[Sample] = Field(description="`n` samples, in order.")


class RolloutQuestion(BaseModel):
    """One bare question; the student prompt (system prompt, optional worked example, question) is built from it."""

    model_config = ConfigDict(extra="forbid")

    question: QuestionText = Field(description="The bare question.")
    sampling: SamplingSettings | None = Field(
        default=None, description="Overrides the request's `sampling` for this question (e.g. its own seed)."
    )


class RolloutsRequest(BaseModel):
    """Sample answers to bare questions with the student prompt (step 1 of SSB; also evaluation)."""

    model_config = ConfigDict(extra="forbid")

    questions: list[RolloutQuestion] = Field(
        min_length=1, max_length=MAX_BATCH, description=f"1 to {MAX_BATCH} questions, answered in one engine batch."
    )
    sampling: SamplingSettings = Field(
        default_factory=paper_rollout_sampling,
        description="Sampling of every question without its own (default: the paper's n=4, T=0.8, top-k 50). "
        "`logprobs` asks for the top-k log-probabilities of every generated token.",
    )
    worked_example: bool = Field(default=False, description="Put the worked example turn before each question.")
    adapter: AdapterName | None = Field(default=None, description="Answer with this loaded LoRA adapter.")
    topk_encoding: TopKEncoding = Field(default="base64", description="How per-token top-k arrays are returned.")


class HintedItem(BaseModel):
    """A question with one correct and one incorrect earlier response, shown to the teacher as hints."""

    model_config = ConfigDict(extra="forbid")

    question: QuestionText = Field(description="The bare question.")
    correct_response: QuestionText = Field(description="A response that reached the gold answer.")
    incorrect_response: QuestionText = Field(description="A response that reached a wrong answer.")
    sampling: SamplingSettings | None = Field(default=None, description="Overrides the request's `sampling` here.")


class ExplanationsRequest(BaseModel):
    """The hinted explanation (step 4) with the teacher's per-token top-k in the same pass (step 5)."""

    model_config = ConfigDict(extra="forbid")

    items: list[HintedItem] = Field(min_length=1, max_length=MAX_BATCH, description=f"1 to {MAX_BATCH} items.")
    sampling: SamplingSettings = Field(
        default_factory=paper_explanation_sampling,
        description="Sampling of every item without its own (default: the paper's T=0.4; top-20 log-probabilities). "
        "`logprobs` is k, at most the engine's `max_logprobs` (refused above it, never truncated).",
    )
    worked_example: bool = Field(default=False, description="Put the worked example turn before the hinted prompt.")
    adapter: AdapterName | None = Field(default=None, description="Explain with this loaded LoRA adapter.")
    topk_encoding: TopKEncoding = Field(default="base64", description="How per-token top-k arrays are returned.")


class GenerationsResponse(BaseModel):
    """Per question or item, in request order: the prompt as rendered and its samples."""

    model: str = Field(description="The base model served.")
    adapter: str | None = Field(description="The adapter used, if any.")
    prompt_version: str = Field(description="Version of the prompt wording (shared/prompts.py).")
    results: list[PromptedSamples]


class LogprobsRequest(BaseModel):
    """Score a reply under a prompt: per reply token its log-probability and the top-k, in one forward pass."""

    model_config = ConfigDict(extra="forbid")

    prompt_token_ids: list[int] | None = Field(
        default=None, min_length=1, max_length=MAX_TOKEN_IDS, description="The rendered prompt's token ids."
    )
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, max_length=64, description="Or a chat, rendered with the model's chat template."
    )
    reply_token_ids: list[int] | None = Field(
        default=None, min_length=1, max_length=MAX_TOKEN_IDS, description="The reply's token ids."
    )
    reply_text: str | None = Field(
        default=None, min_length=1, max_length=MAX_TEXT_CHARS, description="Or the reply as text (tokenized here)."
    )
    k: int = Field(default=20, ge=1, le=256, description="Top-k per position, at most the engine's `max_logprobs`.")
    adapter: AdapterName | None = Field(default=None, description="Score with this loaded LoRA adapter.")
    topk_encoding: TopKEncoding = Field(default="base64", description="How the top-k arrays are returned.")

    @model_validator(mode="after")
    def one_prompt_and_one_reply(self) -> LogprobsRequest:
        if (self.prompt_token_ids is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt_token_ids and messages")
        if (self.reply_token_ids is None) == (self.reply_text is None):
            raise ValueError("give exactly one of reply_token_ids and reply_text")
        return self


class LogprobsResponse(BaseModel):
    """The reply's tokens under the prompt, scored by the unmodified model distribution."""

    model: str
    adapter: str | None
    prompt_token_ids: list[int] = Field(description="The prompt as scored.")
    reply_token_ids: list[int] = Field(description="The reply as scored.")
    logprobs: list[float] = Field(description="Per reply token, its own log-probability.")
    topk: TopK = Field(description="Per reply token, the top-k ids and log-probabilities at that position.")


class AdapterCard(BaseModel):
    name: str = Field(description="The name to pass as `adapter` (and as `model` in the OpenAI routes).")
    path: str = Field(description="Where it was loaded from, relative to the adapters directory.")


class ModelCard(BaseModel):
    """One servable model, in the OpenAI `/v1/models` shape."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "ssb"
    parent: str | None = Field(default=None, description="The base model, for an adapter.")


class ModelsResponse(BaseModel):
    """The base model, its limits, and the adapters loaded; `data` is OpenAI's model list."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(description="The base model first, then every adapter (OpenAI-compatible list).")
    model: str = Field(
        description="The base model as pairs record it (the path it was loaded from); `data[0].id` is its served name."
    )
    max_model_len: int = Field(description="Context length: prompt plus completion, in tokens.")
    vocab_size: int = Field(description="Vocabulary size.")
    max_logprobs: int = Field(description="Largest k of top-k log-probabilities the engine returns.")
    dtype: str | None = Field(
        default=None, description="The dtype the engine computes in (float32, bfloat16, float16); None from a teacher "
        "of an earlier version."
    )
    adapters: list[AdapterCard] = Field(description="LoRA adapters loaded, in load order.")
    max_pending_requests: int | None = Field(
        default=None,
        description="Engine requests the teacher admits at once (`SSB_MAX_PENDING_REQUESTS`): a request of more "
        "prompts is refused, so a client sends at most this many (and at most 256) in one.",
    )


class AdapterLoadRequest(BaseModel):
    """Load a PEFT LoRA adapter from the service's adapters directory."""

    model_config = ConfigDict(extra="forbid")

    name: AdapterName = Field(description="Name to serve it under.")
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Directory relative to the adapters directory (default: the name). No `..`, no absolute path.",
    )
    replace: bool = Field(
        default=False,
        description="Replace an adapter already loaded under this name. Without it a loaded name is refused (409), "
        "so that no client swaps the weights another one is using by accident.",
    )


# The error type of a `/readyz` 503 that will not pass (a teacher whose engine failed to build): no Retry-After, and
# clients (`ssb up`, the teacher client's wait) stop rather than wait for it.
START_FAILED = "start_failed"


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong, naming the field.")
    type: str = Field(description="Error class, e.g. `invalid_request`, `not_found`, `overloaded`, `not_ready`.")
    param: str | None = Field(default=None, description="The offending field's path, e.g. `questions.0.sampling.n`.")
    code: int = Field(description="The HTTP status.")


class ErrorResponse(BaseModel):
    """Every error has this one shape (the same as the OpenAI routes')."""

    error: ErrorDetail
