"""Conversions between the project's records and vLLM's: `SamplingSettings` to `SamplingParams`, and a vLLM completion
to a `Generation` with its top-k taken from vLLM's raw log-probabilities. Used by the teacher service's async engine."""

from __future__ import annotations

from services.teacher.engine import topk_from_vllm
from shared.schemas import Generation, SamplingSettings


def sampling_params(settings: SamplingSettings, *, final_only: bool = False):
    """vLLM's sampling parameters for one request. `final_only` makes the async engine return all `n` samples in one
    final output (its default streaming kind keeps only one of them in the last item)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra = {"output_kind": RequestOutputKind.FINAL_ONLY} if final_only else {}
    return SamplingParams(
        n=settings.n,
        temperature=settings.temperature,
        top_k=settings.top_k if settings.top_k > 0 else -1,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        seed=settings.seed,
        logprobs=settings.logprobs,
        **extra,
    )


def generation_from_completion(completion, k: int | None) -> Generation:
    """One vLLM `CompletionOutput` as a `Generation`; with `k`, the top-k ids and log-probabilities of every token."""
    topk_ids = topk_logprobs = None
    if k:
        pairs = [topk_from_vllm(position, k) for position in completion.logprobs]
        topk_ids = [ids for ids, _ in pairs]
        topk_logprobs = [lps for _, lps in pairs]
    return Generation(
        text=completion.text,
        token_ids=list(completion.token_ids),
        finish_reason=completion.finish_reason,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
    )
