"""Curation, steps 1-5 of SSB: rollouts, grading, filtering, hint selection, hinted explanation, verification, signal.

`curate` runs a list of problems through any `shared.engine.Engine` (in-process, or the teacher service's client) in
batches, pipelined: one engine call holds the rollouts of a batch and the hinted explanations of the batch before it
(`explanation_attempts` samples per problem, of which the first verified one, in sample order, becomes the pair). It
writes each outcome to a `PairStore` once: a verified pair, or the reason the problem was dropped. Problems already in
the store are skipped, so a rerun or a retried job writes nothing new. The one-process CLI and the curator's workers
both call it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shared.engine import Engine, HintedQuestion, PromptedGenerations
from shared.grading import GradedAnswer, grade_model_response, grade_response
from shared.models import model_name
from shared.prompts import PROMPT_VERSION, attempt_mention
from shared.schemas import (
    DroppedProblem,
    Generation,
    Pair,
    PairRecord,
    Problem,
    RenderedPrompt,
    Rollout,
    SamplingSettings,
)
from shared.selection import seeded_rng, select_hints
from shared.settings import CurationConfig
from shared.storage import PairStore, decode_pair_record


@dataclass
class Funnel:
    """How many problems reached each stage, and how fast the engine generated."""

    problems: int = 0
    skipped: int = 0
    with_mix: int = 0
    explained: int = 0
    explanation_attempts: int = 0
    pairs: int = 0
    pairs_from_later_attempts: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rollout_tokens: int = 0
    explanation_tokens: int = 0
    engine_seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.pairs + sum(self.dropped.values())

    @property
    def generated_tokens(self) -> int:
        return self.rollout_tokens + self.explanation_tokens

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.engine_seconds if self.engine_seconds else 0.0

    def count_drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass(frozen=True)
class Hinted:
    """A problem with a mix of right and wrong rollouts, the two chosen as hints, and how its rollouts were made."""

    problem: Problem
    rollouts: list[Rollout]
    correct: int
    incorrect: int
    student_prompt: RenderedPrompt
    rollout_sampling: SamplingSettings

    def hint(self) -> HintedQuestion:
        """The input of its hinted explanation."""
        return HintedQuestion(
            question=self.problem.question,
            correct_response=self.rollouts[self.correct].text,
            incorrect_response=self.rollouts[self.incorrect].text,
        )


def seeded_sampling(sampling: SamplingSettings, seed: int, problem: Problem) -> SamplingSettings:
    """The settings with a per-problem seed: reproducible, and independent of batch composition and order."""
    return sampling.model_copy(update={"seed": seeded_rng(seed, problem.id).randrange(2**31)})


def grade_rollouts(problem: Problem, generations: Sequence[Generation], config: CurationConfig) -> list[Rollout]:
    """Grade each rollout against the gold answer; one cut at the token limit gets no verdict
    (`grade_model_response`)."""
    rollouts = []
    for generation in generations:
        cut_off = generation.cut_off
        graded = grade_model_response(problem.answer, generation.text, cut_off=cut_off, order=config.extraction_order)
        rollouts.append(
            Rollout(
                text=generation.text,
                num_tokens=len(generation.token_ids),
                extracted=graded.extracted,
                correct=graded.correct,
                truncated=cut_off,
            )
        )
    return rollouts


def explanation_rejection(
    problem: Problem, explanation: Generation, verdict: GradedAnswer
) -> tuple[str, str] | None:
    """Why a graded hinted explanation cannot be a verified pair, as (drop reason, detail); None when it can: it ended
    by itself (one cut at the token limit may end in any number), its final answer is the gold one, and it does not
    speak of the attempts it was shown (`attempt_mention`)."""
    if explanation.cut_off:
        return "explanation_truncated", f"the explanation was cut at {len(explanation.token_ids)} tokens before it ended"
    if verdict.correct is not True:
        return "explanation_wrong", f"explanation answered {verdict.extracted!r}, gold {problem.answer!r}"
    if (phrase := attempt_mention(explanation.text, problem.question)) is not None:
        return "explanation_mentions_hints", f"the explanation speaks of the attempts it was shown ({phrase!r})"
    return None


@dataclass(frozen=True)
class ExplanationChoice:
    """The hinted explanations of one problem, graded in sample order up to the first that can be a verified pair.

    `kept` is that attempt's index (None when none passed) and `verdict` its grade; `rejections` holds (drop reason,
    detail) of every attempt before it (of all of them when none passed).
    """

    kept: int | None
    verdict: GradedAnswer | None
    rejections: list[tuple[str, str]]

    @property
    def drop_reason(self) -> str:
        """When none passed: the first attempt's reason (what a single attempt would have been dropped for)."""
        return self.rejections[0][0]

    @property
    def drop_detail(self) -> str:
        if len(self.rejections) == 1:
            return self.rejections[0][1]
        return f"{len(self.rejections)} attempts: " + "; ".join(
            f"{index}: {detail}" for index, (_, detail) in enumerate(self.rejections)
        )


def choose_explanation(
    problem: Problem, attempts: Sequence[Generation], extraction_order: Sequence[str]
) -> ExplanationChoice:
    """Keep the first attempt, in sample order, that `explanation_rejection` lets through (deterministic: the same
    samples give the same choice); the attempts after it are not graded."""
    if not attempts:
        raise ValueError(f"{problem.id}: no hinted explanation to choose from")
    rejections = []
    for index, attempt in enumerate(attempts):
        verdict = grade_response(problem.answer, attempt.text, order=extraction_order)
        rejection = explanation_rejection(problem, attempt, verdict)
        if rejection is None:
            return ExplanationChoice(kept=index, verdict=verdict, rejections=rejections)
        rejections.append(rejection)
    return ExplanationChoice(kept=None, verdict=None, rejections=rejections)


def drop_reason(rollouts: Sequence[Rollout]) -> str:
    """Why a problem without a usable mix is dropped."""
    return "ungradeable" if all(r.correct is None for r in rollouts) else "no_mix"


def how_made(
    model: str,
    prompt_version: str,
    worked_example: bool,
    topk: int,
    rollout_sampling: SamplingSettings,
    explanation_sampling: SamplingSettings,
) -> dict:
    """How pairs are made, flat: the model (by its name: one model is at different paths on different machines, or a
    Hugging Face id here and a directory there), the prompt, the top-k and the sampling of rollouts and explanations,
    but the seeds (each problem draws its own from the run's seed)."""
    made = {
        "model": model_name(model),
        "prompt_version": prompt_version,
        "worked_example": worked_example,
        "topk": topk,
    }
    for name, sampling in (("rollout", rollout_sampling), ("explanation", explanation_sampling)):
        made |= {f"{name}_sampling.{key}": value for key, value in sampling.model_dump(exclude={"seed"}).items()}
    return made


def rerun_conflict(store: PairStore, config: CurationConfig, model: str) -> str | None:
    """Why curating into `store` with `config` on `model` would mix two kinds of pairs in it (a rerun keeps what is
    there and adds the rest, and training would learn from both), or None. Compared with its first pair."""
    pair_ids = store.pair_ids()
    if not pair_ids:
        return None
    record = decode_pair_record(store.pair_path(pair_ids[0]))
    there = how_made(
        record.model, record.prompt_version, record.worked_example, record.topk, record.rollout_sampling,
        record.explanation_sampling,
    )
    now = how_made(
        model, PROMPT_VERSION, config.worked_example, config.topk, config.rollout_sampling(),
        config.explanation_sampling(),
    )
    changed = [f"{name} {there[name]!r} there, {now[name]!r} now" for name in now if there[name] != now[name]]
    if not changed:
        return None
    return (
        f"{store.root} holds pairs made otherwise ({'; '.join(changed)}); a rerun would add pairs of another kind: "
        "curate into a new directory, or with the settings it was made with"
    )


def changed_problems(store: PairStore, problems: Sequence[Problem]) -> str | None:
    """Why curating `problems` into `store` would keep another problem's result under one of their ids (a rerun skips
    an id already done: a file without ids names its problems by line, so another file, or a line inserted, gives
    the same ids to other questions), or None. Compared by question and gold answer."""
    changed = []
    for problem in problems:
        stored = store.stored_problem(problem.id)
        if stored is not None and stored != (problem.question, problem.answer):
            what = "question" if stored[0] != problem.question else "gold answer"
            changed.append(f"{problem.id} ({problem.source or 'this problem'}: another {what})")
    if not changed:
        return None
    return (
        f"{store.root} holds results for {len(changed)} of these problem ids made from other problems, e.g. "
        f"{', '.join(changed[:3])}; a rerun would keep them: curate into a new directory"
    )


def curate(
    problems: Sequence[Problem],
    engine: Engine,
    store: PairStore,
    config: CurationConfig,
    *,
    on_progress: Callable[[Funnel], None] | None = None,
) -> Funnel:
    """Run steps 1-5 on every problem not yet in `store`; return the funnel. Old temporary files of writers that
    died mid-write are removed first.

    Pipelined: each engine call carries the rollouts of one batch together with the hinted explanations of the
    previous batch's problems, so the engine's batches stay full instead of draining to a handful of explanations
    after every batch. Every request has its own seed, so only the engine's batch-dependent rounding can tell
    (docs/BENCHMARKS.md, "Curation pipelined").
    """
    store.remove_orphaned_temporaries()
    funnel = Funnel(problems=len(problems))
    todo = [p for p in problems if not store.is_done(p.id)]
    funnel.skipped = len(problems) - len(todo)
    batches = [todo[start : start + config.batch_size] for start in range(0, len(todo), config.batch_size)]
    waiting: list[Hinted] = []
    for batch in [*batches, []]:
        if not batch and not waiting:
            break
        waiting = curate_step(batch, waiting, engine, store, config, funnel)
        if on_progress is not None:
            on_progress(funnel)
    return funnel


def curate_step(
    batch: Sequence[Problem],
    waiting: Sequence[Hinted],
    engine: Engine,
    store: PairStore,
    config: CurationConfig,
    funnel: Funnel,
) -> list[Hinted]:
    """One engine call: the rollouts of `batch` and the explanations of `waiting`. Writes the outcome of every waiting
    problem and of each problem of `batch` without a usable mix; returns the rest of `batch`, which waits for the next
    call's explanations."""
    rollout_settings = [seeded_sampling(config.rollout_sampling(), config.seed, p) for p in batch]
    explanation_settings = [seeded_sampling(config.explanation_sampling(), config.seed + 1, h.problem) for h in waiting]
    started = time.perf_counter()
    answered, explained = engine.rollouts_and_explanations(
        [p.question for p in batch],
        rollout_settings,
        [h.hint() for h in waiting],
        explanation_settings,
        worked_example=config.worked_example,
    )
    funnel.engine_seconds += time.perf_counter() - started
    funnel.rollout_tokens += sum(len(g.token_ids) for a in answered for g in a.generations)
    funnel.explanation_tokens += sum(len(g.token_ids) for e in explained for g in e.generations)
    funnel.explained += len(explained)
    funnel.explanation_attempts += sum(len(e.generations) for e in explained)
    for hinted, explanation, sampling in zip(waiting, explained, explanation_settings, strict=True):
        write_explained(hinted, explanation, sampling, engine.model_name, store, config, funnel)

    ready = []
    for problem, answer, sampling in zip(batch, answered, rollout_settings, strict=True):
        rollouts = grade_rollouts(problem, answer.generations, config)
        choice = select_hints(rollouts, seed=config.seed, key=problem.id)
        if choice is None:
            reason = drop_reason(rollouts)
            dropped = DroppedProblem(
                problem_id=problem.id, question=problem.question, gold=problem.answer, reason=reason,
                rollouts=rollouts, explanation_attempts=0,
            )
            record_dropped(dropped, store, funnel)
            continue
        funnel.with_mix += 1
        ready.append(Hinted(problem, rollouts, choice.correct_index, choice.incorrect_index, answer.prompt, sampling))
    return ready


def write_explained(
    hinted: Hinted,
    explained: PromptedGenerations,
    sampling: SamplingSettings,
    model: str,
    store: PairStore,
    config: CurationConfig,
    funnel: Funnel,
) -> None:
    """Steps 4-5 for one problem: keep its first verified explanation as a pair, or write why it is dropped."""
    problem, rollouts, attempts = hinted.problem, hinted.rollouts, explained.generations
    choice = choose_explanation(problem, attempts, config.extraction_order)
    if choice.kept is None:
        dropped = DroppedProblem(
            problem_id=problem.id,
            question=problem.question,
            gold=problem.answer,
            reason=choice.drop_reason,
            detail=choice.drop_detail,
            rollouts=rollouts,
            explanation=attempts[0].text,
            explanation_attempts=len(attempts),
        )
        record_dropped(dropped, store, funnel)
        return
    explanation, verdict = attempts[choice.kept], choice.verdict
    record = PairRecord(
        problem_id=problem.id,
        question=problem.question,
        gold=problem.answer,
        rollouts=rollouts,
        correct_hint_index=hinted.correct,
        incorrect_hint_index=hinted.incorrect,
        prompt_version=PROMPT_VERSION,
        worked_example=config.worked_example,
        teacher_prompt=explained.prompt,
        student_prompt=hinted.student_prompt,
        explanation=explanation.text,
        explanation_extracted=verdict.extracted,
        explanation_attempts=len(attempts),
        explanation_attempt=choice.kept,
        model=model,
        rollout_sampling=hinted.rollout_sampling,
        explanation_sampling=sampling,
        topk=config.topk,
    )
    pair = Pair(
        record=record,
        token_ids=explanation.token_ids,
        topk_ids=explanation.topk_ids or [],
        topk_logprobs=explanation.topk_logprobs or [],
    )
    if store.write_pair(pair):
        funnel.pairs += 1
        funnel.pairs_from_later_attempts += choice.kept > 0
    else:
        funnel.skipped += 1


def record_dropped(dropped: DroppedProblem, store: PairStore, funnel: Funnel) -> None:
    """Record a dropped problem once and count it; one that another run recorded meanwhile counts as skipped, as a
    pair does."""
    if store.write_dropped(dropped):
        funnel.count_drop(dropped.reason)
    else:
        funnel.skipped += 1
