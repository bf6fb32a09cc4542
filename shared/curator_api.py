"""The curator service's wire schemas: the options of `POST /v1/datasets` and the dataset status it reports, with
bounds and descriptions (they are the API reference at `/docs`).

The service (services/curator/) validates with these models and `ssb submit` reads them, so the two cannot disagree.
A dataset's problems each end in exactly one final state: `paired`, one of the drop reasons of curation
(`shared.schemas.DropReason`), `failed` (the problem kept failing; the reason is kept) or `cancelled` (the dataset was
cancelled before its job started). Until then a problem is `queued` or `running`; the counts always add up to the
number of problems.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from shared.models import needs_worked_example
from shared.schemas import DropReason
from shared.settings import CurationConfig
from shared.teacher_api import ADAPTER_NAME_PATTERN

FINAL_STATES: tuple[str, ...] = ("paired", *get_args(DropReason), "failed", "cancelled")
DatasetState = Literal["queued", "running", "done", "cancelled"]
DATASET_ID_PATTERN = r"^ds-[0-9a-f]{12}$"
DATASET_RUN_SUFFIX = "-train"  # a dataset's own training run is `<dataset id>-train`


def dataset_run_id(dataset_id: str) -> str:
    """The run a dataset asks the trainer for when its training request names none."""
    return f"{dataset_id}{DATASET_RUN_SUFFIX}"


def dataset_of_run_id(run_id: str | None) -> str | None:
    """The dataset whose own run this id names (`dataset_run_id`), or None for any other id."""
    if run_id is None or not run_id.endswith(DATASET_RUN_SUFFIX):
        return None
    dataset_id = run_id.removesuffix(DATASET_RUN_SUFFIX)
    return dataset_id if re.fullmatch(DATASET_ID_PATTERN, dataset_id) else None
DATASET_NAME_MAX_LENGTH = 200


class DatasetOptions(CurationConfig):
    """How to curate an uploaded dataset: every option of `ssb curate` (the paper's defaults), plus what only the
    service needs. Stored datasets and status replies are read with it (a dataset stored by an earlier version with a
    value this one refuses is reported unreadable); an upload's options with `NewDatasetOptions`."""

    batch_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Problems per job: a worker sends a job's rollouts to the teacher in one request, then its "
        "explanations in one. Several workers' jobs together keep the teacher's batches full.",
    )
    limit: int | None = Field(default=None, ge=1, description="Curate only the first N problems.")
    rollout_adapter: str | None = Field(
        default=None,
        pattern=ADAPTER_NAME_PATTERN,
        description="Roll out with this adapter (a name in the teacher's adapters directory, e.g. a finished run's "
        "id) instead of the base model: the student of one round rolls out the next.",
    )
    train: dict[str, Any] | None = Field(
        default=None,
        description="A training request to start when curation ends: the body of the trainer's `POST /v1/runs` "
        "without `dataset_id` (which is this dataset's); checked against the trainer's schema at upload.",
    )
    worked_example: bool | None = Field(
        default=None,
        description="Put one worked example turn before every question. Default: on when the teacher serves the small "
        "default model (which needs it to answer in the expected form), off for every other model (the paper's "
        "prompt).",
    )

    def curation_config(self, model: str) -> CurationConfig:
        """The options curation itself reads, for the teacher's `model` (which decides an unset `worked_example`)."""
        options = self.model_dump(include=set(CurationConfig.model_fields))
        if options["worked_example"] is None:
            options["worked_example"] = needs_worked_example(model)
        return CurationConfig(**options)


class NewDatasetOptions(DatasetOptions):
    """The options of an upload: one this version does not know is refused (a misspelt option would otherwise curate
    with its default). Datasets stored by another version with options this one does not know are still read
    (`DatasetOptions`)."""

    model_config = ConfigDict(extra="forbid")


class DatasetRows(BaseModel):
    """A dataset sent as JSON: rows as in a JSONL file (`question` or `problem`, `answer`, optional `id`)."""

    model_config = ConfigDict(extra="forbid")

    rows: list[Any] = Field(min_length=1, description="The problems, one object each.")
    name: str | None = Field(default=None, max_length=DATASET_NAME_MAX_LENGTH, description="A label for listings.")
    options: NewDatasetOptions = Field(default_factory=NewDatasetOptions)


class DatasetCreated(BaseModel):
    id: str = Field(description="The dataset's id: its pairs are at `DATA_DIR/datasets/<id>/`.")
    problems: int = Field(description="Problems queued.")
    jobs: int = Field(description="Jobs enqueued (problems in batches of `batch_size`).")


class Funnel(BaseModel):
    """Where each problem is: the counts add up to the dataset's problems. A final state this version does not know
    (a drop reason a newer worker recorded, during an upgrade) is kept under its own name and counted as finished, so
    that the dataset still ends."""

    model_config = ConfigDict(extra="allow")

    queued: int = 0
    running: int = 0
    paired: int = 0
    no_mix: int = Field(default=0, description="All rollouts right, or all wrong: no hint pair.")
    ungradeable: int = Field(default=0, description="No rollout had a final answer that could be graded.")
    explanation_wrong: int = Field(
        default=0, description="No hinted explanation passed, the first for reaching a wrong answer."
    )
    explanation_truncated: int = Field(
        default=0, description="No hinted explanation passed, the first for being cut at its token limit."
    )
    explanation_mentions_hints: int = Field(
        default=0,
        description="No hinted explanation passed, the first for speaking of the attempts it was shown (it must stand "
        "alone).",
    )
    failed: int = Field(default=0, description="Kept failing through every retry; see `failures`.")
    cancelled: int = 0

    @property
    def finished(self) -> int:
        unknown = (count for count in (self.model_extra or {}).values() if isinstance(count, int))
        return sum(getattr(self, state) for state in FINAL_STATES) + sum(unknown)


class Failure(BaseModel):
    problem_id: str
    reason: str


class DatasetStatus(BaseModel):
    id: str
    name: str | None = None
    state: DatasetState = Field(description="queued, running, done (every problem final) or cancelled (some problems were).")
    problems: int
    funnel: Funnel
    created_at: float = Field(description="Unix time of the upload.")
    started_at: float | None = Field(default=None, description="When the first job started.")
    finished_at: float | None = Field(default=None, description="When the last problem reached its final state.")
    tokens_per_second: float = Field(description="Tokens the teacher generated for this dataset per second since its first job started.")
    problems_per_minute: float = Field(description="Problems finished per minute since the first job started.")
    seconds_left: float | None = Field(description="At the current rate; None before any problem finished.")
    failures: list[Failure] = Field(
        default_factory=list,
        description="Failed problems and why, by id: every one up to 100; past that 100 of them (from a bounded read).",
    )
    training_run: str | None = Field(default=None, description="The run the training request started, if any.")
    training_error: str | None = Field(default=None, description="Why the training request could not be started.")
    options: DatasetOptions


class DatasetList(BaseModel):
    datasets: list[DatasetStatus]
