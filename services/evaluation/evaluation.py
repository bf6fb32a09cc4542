"""Evaluation: pass@1 (greedy) and mean accuracy over n samples, for the base model and any LoRA adapters, side by side.

`evaluate(problems, engine, config, adapters=[None, "runs/adapter"])` asks each model (None is the base model; a path is
a PEFT adapter, loaded by the engine as a LoRA beside the base weights, never merged) every question with the same
bare-question prompt as curation and training (`shared.prompts.build_student_messages`), grades each response with the
project's one grader (`shared.grading.grade_model_response`), and returns an `EvalReport`: one row per model, in the
order given, and every problem's responses and verdicts. The report is a pydantic model, so it is written and read as
JSON.

- pass@1 is the greedy response (temperature 0, one sample) graded against the gold answer, averaged over problems.
- mean@n (only when `samples` > 1) is the mean accuracy over n samples per problem at the sampling temperature, which is
  the unbiased pass@1 estimate from n samples; pass@n (any of the n samples correct) is reported beside it.
- A response cut at the token limit gets no verdict, as in curation (the last number of an unfinished response is no
  final answer), and neither does an ungradeable one (no final answer found); both count as wrong, and rows say how
  many there were of each.

For each model and batch of problems, the greedy and the sampled requests go to the engine in one call. Sampling seeds
are drawn per problem from the run seed, so results do not depend on batch size or order, and the base model and every
adapter see the same seeds. `render_table` draws reports as the paper's Table 1: models as rows, pass@1 and mean@n of
each benchmark as columns. `ssb eval` (cli/eval_command.py) is the command-line shell over this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from rich.table import Table

from shared.engine import Engine
from shared.grading import DEFAULT_EXTRACTION_ORDER, grade_model_response
from shared.metrics import count_correct, count_ungradeable, mean_accuracy, mean_pass_at_k
from shared.schemas import CUT_OFF, Generation, MaxTokens, Problem, SamplingSettings, Temperature, TopK
from shared.selection import seeded_rng
from shared.settings import ExtractionOrder

BASE_NAME = "base"


class EvalConfig(BaseModel):
    """How one evaluation run asks and grades. Greedy decoding gives pass@1; sampling settings apply to mean@n."""

    samples: int = Field(
        default=1, ge=1, le=64, description="Samples per problem for mean@n; 1 means greedy pass@1 only."
    )
    temperature: Temperature = Field(default=0.6, gt=0.0, description="Sampling temperature of the n samples.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling of the n samples.")
    top_k: TopK = Field(default=-1, description="Top-k sampling of the n samples (-1: the whole vocabulary).")
    max_tokens: MaxTokens = Field(default=2048, description="Longest response, in tokens, greedy and sampled.")
    worked_example: bool = Field(
        default=False, description="Put the worked example turn before each question, exactly as in curation."
    )
    seed: int = Field(default=0, description="Per-problem sampling seeds are drawn from it.")
    extraction_order: ExtractionOrder = Field(
        default=DEFAULT_EXTRACTION_ORDER, description="How final answers are pulled from responses, first match wins."
    )
    batch_size: int = Field(
        default=256, ge=1, description="Problems per engine call; smaller batches report progress more often."
    )

    def greedy_sampling(self) -> SamplingSettings:
        return SamplingSettings(n=1, temperature=0.0, max_tokens=self.max_tokens)

    def sampled_sampling(self, problem: Problem) -> SamplingSettings:
        """The n-sample settings for one problem, with a seed that depends only on the run seed and the problem id."""
        return SamplingSettings(
            n=self.samples,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            seed=seeded_rng(self.seed, problem.id).randrange(2**31),
        )


class ModelAnswer(BaseModel):
    """One model's answers to one problem: the greedy response with its grade, and the verdicts of its n samples."""

    response: str = Field(description="The greedy response.")
    extracted: str | None = Field(description="Final answer pulled from the greedy response; None when there is none.")
    correct: bool | None = Field(
        description="Greedy answer equals the gold; None when ungradeable or cut off at max_tokens (counted wrong)."
    )
    num_tokens: int = Field(description="Tokens in the greedy response.")
    finish_reason: str | None = Field(default=None, description="`stop`, or `length` when cut at max_tokens.")
    sampled_extracted: list[str | None] = Field(default_factory=list, description="Each sample's extracted answer.")
    sampled_correct: list[bool | None] = Field(
        default_factory=list, description="Each sample's verdict (None as for the greedy answer)."
    )

    @property
    def cut_off(self) -> bool:
        """The greedy response was cut at max_tokens."""
        return self.finish_reason == CUT_OFF


class ProblemResult(BaseModel):
    """One problem and every model's answers to it, keyed by the model's row name."""

    id: str
    question: str
    gold: str
    answers: dict[str, ModelAnswer]


class ModelRow(BaseModel):
    """One model's scores on one benchmark."""

    name: str = Field(description="`base`, or the adapter directory's name.")
    adapter: str | None = Field(description="Adapter path; None for the base model.")
    served: Literal["lora", "merged"] | None = Field(
        default=None,
        description="How the adapter was served: `lora` (beside the base weights) or `merged` (into a copy of them); "
        "None for the base model (and in reports written before this field existed).",
    )
    dtype: str | None = Field(
        default=None,
        description="The dtype the engine computed in (float32, bfloat16, float16): two evaluations of one model in "
        "different dtypes may differ. None where unknown (reports written before this field existed; a teacher of an "
        "earlier version).",
    )
    pass_at_1: float = Field(description="Share of problems whose greedy answer is correct (ungradeable is wrong).")
    mean_at_n: float | None = Field(description="Mean accuracy over the n samples; None when samples is 1.")
    pass_at_n: float | None = Field(description="Share of problems with at least one correct sample; None when n is 1.")
    problems: int = Field(description="Problems evaluated.")
    correct: int = Field(description="Problems whose greedy answer is correct.")
    ungradeable: int = Field(description="Greedy responses that ended with no gradeable final answer (counted wrong).")
    truncated: int = Field(description="Greedy responses cut off at max_tokens (no verdict: counted wrong).")
    mean_response_tokens: float = Field(description="Mean length of the greedy responses, in tokens.")
    seconds: float = Field(description="Wall time of this model's generation and grading.")


class EvalReport(BaseModel):
    """One benchmark's evaluation: the settings, a row per model (in the order evaluated) and per-problem results."""

    benchmark: str = Field(description="Benchmark name or problem file.")
    model: str = Field(description="The base model the engine serves.")
    config: EvalConfig
    rows: list[ModelRow]
    problems: list[ProblemResult]

    def row(self, name: str) -> ModelRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)


ProgressCallback = Callable[[str, int, int], None]


def model_names(adapters: Sequence[str | None]) -> list[str]:
    """Row names: `base` for None, the adapter directory's name otherwise, made unique with `-2`, `-3`..."""
    names: list[str] = []
    for adapter in adapters:
        stem = BASE_NAME if adapter is None else (Path(adapter).name or str(adapter))
        name, suffix = stem, 2
        while name in names:
            name, suffix = f"{stem}-{suffix}", suffix + 1
        names.append(name)
    return names


def grade_model_answer(
    problem: Problem, greedy: Generation, samples: Sequence[Generation], config: EvalConfig
) -> ModelAnswer:
    """Grade one model's greedy response and samples for one problem (one cut off gets no verdict)."""
    order = config.extraction_order
    graded = grade_model_response(problem.answer, greedy.text, cut_off=greedy.cut_off, order=order)
    sampled = [grade_model_response(problem.answer, s.text, cut_off=s.cut_off, order=order) for s in samples]
    return ModelAnswer(
        response=greedy.text,
        extracted=graded.extracted,
        correct=graded.correct,
        num_tokens=len(greedy.token_ids),
        finish_reason=greedy.finish_reason,
        sampled_extracted=[s.extracted for s in sampled],
        sampled_correct=[s.correct for s in sampled],
    )


def answer_problems(
    problems: Sequence[Problem],
    engine: Engine,
    config: EvalConfig,
    adapter: str | None,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> list[ModelAnswer]:
    """One model's graded answers to every problem, in order. Greedy and sampled requests share one engine call."""
    answers: list[ModelAnswer] = []
    sampled = config.samples > 1
    for start in range(0, len(problems), config.batch_size):
        batch = problems[start : start + config.batch_size]
        questions = [p.question for p in batch]
        settings = [config.greedy_sampling()] * len(batch)
        if sampled:
            questions = questions + questions
            settings = settings + [config.sampled_sampling(p) for p in batch]
        answered = engine.rollouts(questions, settings, worked_example=config.worked_example, adapter=adapter)
        outputs = [a.generations for a in answered]
        for i, problem in enumerate(batch):
            samples = outputs[len(batch) + i] if sampled else []
            answers.append(grade_model_answer(problem, outputs[i][0], samples, config))
        if on_batch is not None:
            on_batch(len(answers))
    return answers


def summarize_model(
    name: str,
    adapter: str | None,
    answers: Sequence[ModelAnswer],
    samples: int,
    seconds: float,
    dtype: str | None = None,
) -> ModelRow:
    """A model's row from its answers: pass@1 from the greedy verdicts; mean@n and pass@n from the samples."""
    greedy = [a.correct for a in answers]
    sampled = [a.sampled_correct for a in answers]
    return ModelRow(
        name=name,
        adapter=adapter,
        served=None if adapter is None else "lora",
        dtype=dtype,
        pass_at_1=mean_accuracy(greedy),
        mean_at_n=mean_pass_at_k(sampled, 1) if samples > 1 else None,
        pass_at_n=mean_pass_at_k(sampled, samples) if samples > 1 else None,
        problems=len(answers),
        correct=count_correct(greedy),
        ungradeable=count_ungradeable([a.correct for a in answers if not a.cut_off]),
        truncated=sum(a.cut_off for a in answers),
        mean_response_tokens=sum(a.num_tokens for a in answers) / len(answers),
        seconds=seconds,
    )


def evaluate(
    problems: Sequence[Problem],
    engine: Engine,
    config: EvalConfig | None = None,
    *,
    adapters: Sequence[str | None] = (None,),
    benchmark: str = "problems",
    on_progress: ProgressCallback | None = None,
) -> EvalReport:
    """Evaluate the base model (None) and each adapter path on `problems`, in the order given; one row each.

    `on_progress(model_name, problems_done, problems_total)` is called after every engine call.
    """
    config = config or EvalConfig()
    if not problems:
        raise ValueError("no problems to evaluate")
    if not adapters:
        raise ValueError("no models to evaluate: pass None for the base model and/or adapter paths")
    names = model_names(adapters)
    dtype = engine.dtype  # read first: an engine without it fails before the work, not after
    rows: list[ModelRow] = []
    answers_by_model: dict[str, list[ModelAnswer]] = {}
    for name, adapter in zip(names, adapters, strict=True):
        adapter_path = None if adapter is None else str(adapter)
        started = time.perf_counter()

        def report_batch(done: int, name: str = name) -> None:
            if on_progress is not None:
                on_progress(name, done, len(problems))

        answers = answer_problems(problems, engine, config, adapter_path, on_batch=report_batch)
        seconds = time.perf_counter() - started
        rows.append(summarize_model(name, adapter_path, answers, config.samples, seconds, dtype))
        answers_by_model[name] = answers
    results = [
        ProblemResult(
            id=problem.id,
            question=problem.question,
            gold=problem.answer,
            answers={name: answers_by_model[name][i] for name in names},
        )
        for i, problem in enumerate(problems)
    ]
    return EvalReport(benchmark=benchmark, model=engine.model_name, config=config, rows=rows, problems=results)


def as_merged_adapter(report: EvalReport, adapter: str) -> EvalReport:
    """The base-model report of an engine serving `adapter` merged into its weights, labelled as that adapter."""
    (row,) = report.rows
    name = model_names([adapter])[0]
    return report.model_copy(
        update={
            "rows": [row.model_copy(update={"name": name, "adapter": adapter, "served": "merged"})],
            "problems": [p.model_copy(update={"answers": {name: p.answers[row.name]}}) for p in report.problems],
        }
    )


def combine_reports(reports: Sequence[EvalReport]) -> EvalReport:
    """One report from several evaluations of the same problems with the same settings (the base model on one engine,
    each merged adapter on its own): rows in order, made unique by name, and every problem's answers together."""
    first = reports[0]
    for report in reports[1:]:
        if [p.id for p in report.problems] != [p.id for p in first.problems] or report.config != first.config:
            raise ValueError("reports to combine must cover the same problems with the same settings")
    rows = [row for report in reports for row in report.rows]
    names = model_names([row.adapter for row in rows])
    renamed = [row.model_copy(update={"name": name}) for row, name in zip(rows, names, strict=True)]
    problems = []
    for i, problem in enumerate(first.problems):
        answers, position = {}, 0
        for report in reports:
            for row in report.rows:
                answers[names[position]] = report.problems[i].answers[row.name]
                position += 1
        problems.append(problem.model_copy(update={"answers": answers}))
    return first.model_copy(update={"rows": renamed, "problems": problems})


def dtype_note(rows: Sequence[ModelRow]) -> str:
    """The caption's note on the engines' dtypes: one for all (`computed in float32`), or each model's where they
    differ (a model twice if two reports computed it in two dtypes); empty without rows."""
    if not rows:
        return ""
    dtypes = {row.dtype or "an unknown dtype" for row in rows}
    if len(dtypes) == 1:
        return f"computed in {dtypes.pop()}"
    seen = dict.fromkeys((row.name, row.dtype or "unknown") for row in rows)
    return "computed in " + ", ".join(f"{dtype} ({name})" for name, dtype in seen)


def render_table(reports: EvalReport | Sequence[EvalReport], *, title: str = "Evaluation") -> Table:
    """The paper's Table 1: one row per model (in first-seen order, base first when evaluated first), and for each
    benchmark a pass@1 column, plus a mean@n column when it was sampled. A model missing from a benchmark shows `-`."""
    reports = [reports] if isinstance(reports, EvalReport) else list(reports)
    table = Table(title=title, show_header=True)
    table.add_column("model")
    columns: list[tuple[EvalReport, str]] = []
    for report in reports:
        label = f"{report.benchmark} ({report.rows[0].problems if report.rows else 0})"
        table.add_column(f"{label}\npass@1", justify="right")
        columns.append((report, "pass_at_1"))
        if report.config.samples > 1:
            table.add_column(f"{label}\nmean@{report.config.samples}", justify="right")
            columns.append((report, "mean_at_n"))
    names: list[str] = []
    for report in reports:
        names += [row.name for row in report.rows if row.name not in names]
    for name in names:
        cells = []
        for report, field in columns:
            row = next((r for r in report.rows if r.name == name), None)
            value = None if row is None else getattr(row, field)
            cells.append("-" if value is None else f"{100 * value:.1f}%")
        table.add_row(name, *cells)
    sampled = {(r.config.samples, r.config.temperature) for r in reports if r.config.samples > 1}
    notes = ["pass@1: greedy"]
    notes += [f"mean@{n}: mean accuracy over {n} samples at T={t:g}" for n, t in sorted(sampled)]
    notes.append("a cut-off or ungradeable answer counts as wrong")
    if note := dtype_note([row for report in reports for row in report.rows]):
        notes.append(note)
    table.caption = "; ".join(notes)
    return table
