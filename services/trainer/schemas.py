"""The trainer service's wire schemas: what `/v1/runs` and `/v1/evals` take and return, with bounds and descriptions
(they are the API reference at `/docs`).

A run request is a `TrainConfig` (services/trainer/config.py, every training knob documented once) plus where the
pairs come from (`dataset_id` or `pairs_dir`), an optional name, its round and parent, and an optional evaluation to
run when it succeeds. The curator service sends `{"dataset_id": ..., <training settings>}` when a dataset that asked
for training finishes curating. Errors have the teacher's one envelope (`shared.teacher_api.ErrorResponse`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.trainer.config import TrainConfig
from shared.curator_api import dataset_of_run_id
from shared.datasets import BENCHMARKS
from shared.schemas import PROBLEM_ID_PATTERN, MaxTokens, Temperature

# Run ids name the run's adapter in the adapters directory (and so the teacher's LoRA) and its RQ job: no dots.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# Dataset ids are the curator's: a directory name under DATA_DIR/datasets/.
DATASET_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# A model to evaluate: `base`, a run id, or an adapter's name in the adapters directory.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
BASE_MODEL = "base"
RUN_EVAL_SUFFIX = "-eval"  # the evaluation a run queues after itself is `<run id>-eval` (`run_eval_id`)

RunStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
EvalStatusName = Literal["queued", "running", "succeeded", "failed"]

ModelName = Annotated[
    str,
    Field(
        pattern=MODEL_NAME_PATTERN,
        description="`base` (the base model), a run id (its adapter), or an adapter's name in the adapters directory.",
    ),
]


class EvalOptions(BaseModel):
    """How to evaluate: the benchmark or problems are given beside these; the defaults are `ssb eval`'s."""

    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N problems.")
    samples: int = Field(default=1, ge=1, le=64, description="Samples per problem for mean@n; 1: greedy pass@1 only.")
    temperature: Temperature = Field(default=0.6, gt=0.0, description="Sampling temperature of the n samples.")
    max_tokens: MaxTokens = Field(default=2048, description="Longest response, in tokens.")
    seed: int = Field(default=0, ge=0, description="Per-problem sampling seeds are drawn from it.")
    worked_example: bool | None = Field(
        default=None,
        description="Put the worked example turn before each question; default: as curation does for the teacher's "
        "model (on for the small default model, off for others).",
    )


class EvalAfterRun(EvalOptions):
    """An evaluation to queue when the run succeeds: the base model (unless `include_base` is false) and the run's
    adapter, on a packaged benchmark."""

    benchmark: str = Field(
        default="gsm8k", min_length=1, description="A packaged benchmark: gsm8k, gsm8k_train, math500, aime24."
    )
    include_base: bool = Field(default=True, description="Evaluate the base model too, as the table's first row.")

    @field_validator("benchmark")
    @classmethod
    def known_benchmark(cls, benchmark: str) -> str:
        # Checked when the run is asked for: found unknown only when the run ends, hours of training are wasted.
        if benchmark not in BENCHMARKS:
            raise ValueError(unknown_benchmark_message(benchmark))
        return benchmark


def unknown_benchmark_message(benchmark: str) -> str:
    """The refusal of a benchmark that is not packaged (`shared.datasets.BENCHMARKS`), naming those that are."""
    return f"unknown benchmark {benchmark!r}; one of {', '.join(sorted(BENCHMARKS))}"


class RunRequest(TrainConfig):
    """Train a LoRA adapter on a curated dataset: the source of the pairs plus any `TrainConfig` field."""

    dataset_id: str | None = Field(
        default=None,
        pattern=DATASET_ID_PATTERN,
        description="A dataset curated by the curator service (DATA_DIR/datasets/<id>/). Give this or `pairs_dir`.",
    )
    pairs_dir: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="A pair store directory (with pairs/ in it) inside DATA_DIR, absolute or relative to DATA_DIR.",
    )
    run_id: str | None = Field(
        default=None,
        pattern=RUN_ID_PATTERN,
        description="Name of the run and of its adapter; default: a new `run-<hex>`. Posting an existing id with the "
        "same request returns that run (a retried POST starts nothing twice); with another request it is a 409, as is "
        "a new id that an adapter in the adapters directory already has. Not `base` (the base model's name).",
    )
    round: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Bootstrapping round; default: 1, or the parent run's round + 1 when the dataset was rolled out "
        "by a run's adapter.",
    )
    parent_run: str | None = Field(
        default=None,
        pattern=MODEL_NAME_PATTERN,
        description="The run (or adapter) whose model rolled out the dataset; default: the dataset's "
        "`options.rollout_adapter` (DATA_DIR/datasets/<id>/dataset.json, written by the curator), if any.",
    )
    evaluation: EvalAfterRun | None = Field(
        default=None, description="Queue an evaluation of the base model and the adapter when the run succeeds."
    )

    @field_validator("run_id")
    @classmethod
    def not_the_base_model(cls, run_id: str | None) -> str | None:
        # An evaluation names the base model `base`: an adapter of that name could never be evaluated as itself.
        if run_id == BASE_MODEL:
            raise ValueError(f"{BASE_MODEL!r} is the name evaluations give the base model; choose another run_id")
        return run_id

    @model_validator(mode="after")
    def one_source(self) -> RunRequest:
        if (self.dataset_id is None) == (self.pairs_dir is None):
            raise ValueError("give exactly one of dataset_id and pairs_dir")
        owner = dataset_of_run_id(self.run_id)
        if owner is not None and self.dataset_id != owner:  # else another request could take the name first
            raise ValueError(
                f"run_id {self.run_id!r} is the name dataset {owner} gives its own run; only a request on that "
                "dataset may use it: choose another run_id"
            )
        return self

    def train_config(self, **defaults: Any) -> TrainConfig:
        """The training settings alone; `defaults` fill fields the request did not set."""
        names = set(TrainConfig.model_fields)
        chosen = {name: getattr(self, name) for name in names if name in self.model_fields_set}
        return TrainConfig(**{**{k: v for k, v in defaults.items() if k in names}, **chosen})


class RunCreated(BaseModel):
    id: str = Field(description="The run's id: its adapter's name in the adapters directory.")
    status: RunStatusName
    url: str = Field(description="Where to follow it.")


class Run(BaseModel):
    """A training run as it stands."""

    id: str
    status: RunStatusName = Field(description="queued, running, succeeded, failed or cancelled.")
    dataset_id: str | None = Field(default=None, description="The curated dataset trained on, if given by id.")
    pairs_dir: str = Field(description="The pair store trained on.")
    model: str = Field(
        description="The base model: the trainer API's SSB_MODEL when the run was created; every attempt trains on it, "
        "whatever the worker's own SSB_MODEL."
    )
    round: int = Field(description="Bootstrapping round: 1 for a dataset rolled out by the base model.")
    parent_run: str | None = Field(default=None, description="The run or adapter that rolled out the dataset.")
    config: dict[str, Any] = Field(description="The TrainConfig, resolved (teacher, checkpoint_every).")
    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps the run takes; known once it starts.")
    metrics: dict[str, Any] | None = Field(default=None, description="The latest logged step's metrics.")
    seconds_per_step: float | None = Field(default=None, description="Mean wall time per step of this attempt.")
    time_left_seconds: float | None = Field(default=None, description="Estimated time to the last step.")
    checkpoint_step: int | None = Field(default=None, description="Step of the newest resumable checkpoint.")
    attempts: int = Field(default=0, description="Times a worker started this run (more than 1 after a retry).")
    worker: str | None = Field(default=None, description="The RQ worker of the latest attempt.")
    resumed_from_step: int | None = Field(
        default=None, description="Set when an attempt continued from a checkpoint (its step) instead of step 0."
    )
    note: str | None = Field(default=None, description="What happened, e.g. a resume after a worker died.")
    error: str | None = Field(default=None, description="Why it failed (or why the last attempt did).")
    adapter: str | None = Field(default=None, description="The adapter's name in the adapters directory, when done.")
    final_loss: float | None = None
    num_pairs: int | None = None
    evaluation_id: str | None = Field(default=None, description="The evaluation queued after the run, if asked.")
    evaluation_error: str | None = Field(
        default=None, description="Why the evaluation the run asked for could not be queued (the run still succeeds)."
    )
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


class RunList(BaseModel):
    runs: list[Run] = Field(description="Newest first.")


class ProblemIn(BaseModel):
    """One uploaded problem (a line of a problem file)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, pattern=PROBLEM_ID_PATTERN, description="Stable id; default: its position.")
    question: str = Field(min_length=1, max_length=200_000, description="The bare question.")
    answer: str = Field(min_length=1, max_length=10_000, description="The gold answer (GSM8K `#### n` is parsed).")
    source: str | None = Field(default=None, max_length=1000, description="Where it came from (kept as given).")


class EvalRequest(EvalOptions):
    """Evaluate models side by side on a benchmark or on uploaded problems, through the teacher service."""

    models: list[ModelName] = Field(
        default_factory=lambda: [BASE_MODEL],
        min_length=1,
        max_length=16,
        description="Rows of the table, in order: `base`, run ids, adapter names.",
    )
    benchmark: str | None = Field(
        default=None,
        min_length=1,
        description="A packaged benchmark: gsm8k, gsm8k_train, math500, aime24. Give this or `problems`.",
    )
    problems: list[ProblemIn] | None = Field(
        default=None, min_length=1, description="Uploaded problems (a problem file's rows). Give this or `benchmark`."
    )
    eval_id: str | None = Field(
        default=None,
        pattern=RUN_ID_PATTERN,
        description="Names the evaluation (default: a new id): the same request sent again under it queues nothing "
        "twice; other settings under it are refused (409). Ids ending in `-eval` are refused (422): `<run id>-eval` "
        "is the evaluation a run queues after itself.",
    )

    @field_validator("eval_id")
    @classmethod
    def not_a_runs_own(cls, eval_id: str | None) -> str | None:
        # Else a client could take the name first: the run's evaluation would be refused, or be the client's.
        if eval_id is not None and eval_id.endswith(RUN_EVAL_SUFFIX):
            raise ValueError(f"ids ending in {RUN_EVAL_SUFFIX!r} name the evaluation a run queues after itself "
                             "(`<run id>-eval`); choose another eval_id")
        return eval_id

    @model_validator(mode="after")
    def one_source(self) -> EvalRequest:
        if (self.benchmark is None) == (self.problems is None):
            raise ValueError("give exactly one of benchmark and problems")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models must not repeat")
        return self


def run_eval_id(run_id: str) -> str:
    """The evaluation a run queues after itself when its request asked for one; no client's request may take it."""
    return f"{run_id}{RUN_EVAL_SUFFIX}"


class EvalCreated(BaseModel):
    id: str
    status: EvalStatusName
    url: str


class Evaluation(BaseModel):
    """An evaluation as it stands; `rows` (the accuracy table) and `problems` (every answer) once it succeeded."""

    id: str
    status: EvalStatusName
    models: list[str]
    benchmark: str = Field(description="The benchmark's name, or `uploaded` for uploaded problems.")
    options: dict[str, Any] = Field(description="limit, samples, temperature, max_tokens, seed, worked_example.")
    progress: dict[str, str] = Field(default_factory=dict, description="Per model: problems done of total.")
    rows: list[dict[str, Any]] | None = Field(
        default=None, description="One row per model: pass@1, mean@n and pass@n, counts, truncated, seconds."
    )
    table: str | None = Field(default=None, description="The rows as a plain-text table.")
    problems: list[dict[str, Any]] | None = Field(
        default=None, description="Per problem: question, gold answer and each model's answer and verdict."
    )
    run_id: str | None = Field(default=None, description="The run that queued it, when it followed a run.")
    error: str | None = None
    note: str | None = Field(default=None, description="What happened, e.g. queued again after its job ended early.")
    attempts: int = 0
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
