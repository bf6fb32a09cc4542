"""The trainer service's logic, without HTTP: create, list and read training runs and evaluations, and find their
files. The routes (services/trainer/app.py) only parse and call this; the train worker (services/trainer/jobs.py)
does the work the records here describe.

Where things live (DATA_DIR is the volume every service shares):

    DATA_DIR/datasets/<dataset id>/     a curated pair store (pairs/, dropped/, dataset.json), written by the curator
    DATA_DIR/runs/<run id>/             the run's metrics.jsonl, training_curve.png, checkpoints/, training_config.json
    ADAPTERS_DIR/<run id>/              the run's adapter (PEFT), which the teacher loads as a LoRA named by the run id
    DATA_DIR/evals/<eval id>/           uploaded problems (problems-<request fingerprint>.jsonl), report.json

Domain errors are `ServiceError`s carrying their HTTP status, so the app maps them to responses in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rq import Worker
from rq.job import JobStatus

from services.errors import ServiceError
from services.trainer import queues
from services.trainer.inputs import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CURVE_FILE,
    METRICS_FILE,
    TRAINING_CONFIG_FILE,
)
from services.trainer.records import FINAL, eval_records, run_records
from services.trainer.schemas import (
    BASE_MODEL,
    EvalOptions,
    EvalRequest,
    Evaluation,
    Run,
    RunRequest,
    unknown_benchmark_message,
)
from services.trainer.settings import TrainerSettings
from shared.datasets import BENCHMARKS, DatasetError, parse_problem_rows, write_problems_jsonl
from shared.workers import cancel_unstarted

ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, TRAINING_CONFIG_FILE)
REPORT_NAME = "report.json"
UPLOADED_PROBLEMS = "problems.jsonl"  # where evaluations recorded before `problems_file` was keep theirs


@dataclass
class TrainerOverview:
    runs: list[Run]
    evaluations_by_status: dict[str, int]
    queued_jobs: dict[str, int]
    workers: int


def not_found(what: str, record_id: str, param: str | None = None) -> ServiceError:
    return ServiceError(404, f"no {what} {record_id!r}", "not_found", param)


def no_adapter(run_id: str, status: str | None, param: str | None = None) -> ServiceError:
    """409: the run has published no adapter (not yet, or never: it failed or was cancelled)."""
    still = "" if status in FINAL else " yet"
    return ServiceError(409, f"run {run_id!r} has no adapter{still} (status {status})", "not_ready", param)


class TrainerService:
    """Runs and evaluations over Redis records and the shared data volume."""

    def __init__(self, settings: TrainerSettings, connection: redis.Redis):
        self.settings = settings
        self.redis = connection
        self.runs = run_records(connection, settings.key_prefix)
        self.evals = eval_records(connection, settings.key_prefix)

    def readiness_problem(self) -> str | None:
        """Why the service cannot serve now (Redis unreachable), or None."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            return f"Redis is unreachable: {type(exc).__name__}: {exc}"
        return None

    # --- Runs ------------------------------------------------------------------------------------------------------

    def create_run(self, request: RunRequest) -> tuple[Run, bool]:
        """Record a run and queue its training; returns the run and whether it is new.

        A request naming an existing `run_id` returns that run when the request is the same (a retried POST) and is
        refused with 409 when it differs. A new run whose `run_id` names an adapter already in the adapters directory
        is refused with 409: publishing its own would replace that one.
        """
        pairs_dir = self.resolve_pairs_dir(request)
        parent, round_ = self.lineage(request)
        config = request.train_config(checkpoint_every=self.settings.checkpoint_every)
        fingerprint = request_fingerprint(request)
        run_id = request.run_id or f"run-{uuid.uuid4().hex[:12]}"
        if self.runs.get(run_id) is None:
            self.check_adapter_name_free(run_id)
        fields = {
            "status": "queued",
            "dataset_id": request.dataset_id,
            "pairs_dir": str(pairs_dir),
            "model": self.settings.model,
            "round": round_,
            "parent_run": parent,
            "config": config.model_dump(mode="json"),
            "evaluation": request.evaluation.model_dump(mode="json") if request.evaluation else None,
            "request_fingerprint": fingerprint,
            "step": 0,
            "attempts": 0,
        }
        created = self.runs.create(run_id, fields)
        existing = fields if created else self.runs.get(run_id) or {}
        if existing.get("request_fingerprint") != fingerprint:
            raise ServiceError(409, f"run {run_id!r} exists with other settings; choose another run_id", "conflict",
                               "run_id")
        if existing.get("status") not in FINAL:  # a retried POST of a run that ended (or was cancelled) queues nothing
            queues.enqueue_training(self.settings, self.redis, run_id)
        return self.get_run(run_id), created

    def cancel_run(self, run_id: str) -> Run:
        """Cancel a run that has not ended: it ends `cancelled` at once; its job leaves the queue if it has not started,
        and an attempt under way stops before its next metrics line or checkpoint (the step under way may still write
        its own; each later write first checks the run's state, final now), keeping its checkpoints, and publishes no
        adapter (unless the cancel came while it was publishing its finished one: it then stays cancelled, its adapter
        published, and the evaluation it asked for does not run). Cancelling a cancelled run returns it (a retried
        DELETE); a run that succeeded or failed (RQ's verdict on its job included) is refused with 409."""
        run = self.get_run(run_id)  # reconciled: a run whose job RQ failed is failed, not cancelled
        if run.status not in FINAL:
            self.runs.advance(run_id, status="cancelled", finished_at=time.time(), time_left_seconds=None,
                              note="cancelled by request")
            run = self.get_run(run_id)
        if run.status != "cancelled":
            raise ServiceError(409, f"run {run_id!r} already {run.status}; only a queued or running run can be "
                               "cancelled", "conflict")
        job = queues.fetch_job(self.settings, self.redis, queues.TRAIN, run_id)
        if job is not None:
            cancel_unstarted(job)
        return run

    def check_adapter_name_free(self, run_id: str) -> None:
        """A new run publishes its adapter as ADAPTERS_DIR/<run id>: refuse a name that a folder there already has
        (an adapter placed by hand, or another deployment's run), which is not this run's."""
        taken = Path(self.settings.adapters_dir) / run_id
        if taken.exists():
            raise ServiceError(409, f"an adapter named {run_id!r} is already in the adapters directory ({taken}) and "
                               "did not come from this run; choose another run_id", "conflict", "run_id")

    def resolve_pairs_dir(self, request: RunRequest) -> Path:
        """The pair store a request names, which must lie inside DATA_DIR and hold at least one pair."""
        data_dir = self.settings.data_dir.resolve()
        if request.dataset_id is not None:
            directory, param = (self.settings.datasets_dir() / request.dataset_id).resolve(), "dataset_id"
            if not directory.is_dir():
                raise ServiceError(404, f"no dataset {request.dataset_id!r} in {self.settings.datasets_dir()}",
                                   "not_found", param)
        else:
            given, param = Path(request.pairs_dir), "pairs_dir"
            try:
                directory = (given if given.is_absolute() else data_dir / given).resolve()
                exists = directory.is_dir()
            except (ValueError, OSError) as exc:  # a NUL byte; a name longer than the filesystem allows
                raise ServiceError(422, f"pairs_dir is not a usable path: {exc}", "invalid_request", param) from exc
            if not directory.is_relative_to(data_dir):
                raise ServiceError(422, f"pairs_dir must lie inside the data directory {data_dir}", "invalid_request",
                                   param)
            if not exists:
                raise ServiceError(404, f"no directory {directory}", "not_found", param)
        pairs = directory / "pairs"
        if not pairs.is_dir() or not any(pairs.glob("*.safetensors")):
            raise ServiceError(422, f"{directory} holds no verified pairs (nothing in {pairs})", "invalid_request",
                               param)
        return directory

    def lineage(self, request: RunRequest) -> tuple[str | None, int]:
        """(parent, round): as given, else from the dataset's `rollout_adapter`; a run's child is one round later."""
        parent = request.parent_run
        if parent is None and request.dataset_id is not None:
            parent = rollout_adapter_of(self.settings.datasets_dir() / request.dataset_id)
        if request.round is not None:
            return parent, request.round
        if parent is None:
            return None, 1
        parent_run = self.runs.get(parent)
        return parent, (int(parent_run.get("round", 1)) + 1) if parent_run else 2

    def get_run(self, run_id: str) -> Run:
        record = self.runs.get(run_id)
        if record is None:
            raise not_found("run", run_id)
        if record.get("status") not in FINAL:
            record = self.reconcile(queues.TRAIN, run_id, record)
        return Run(**{name: value for name, value in record.items() if name in Run.model_fields})

    def reconcile(self, kind: str, record_id: str, record: dict[str, Any]) -> dict[str, Any]:
        """A run or evaluation not final, checked against its RQ job. One whose job RQ failed without the job recording
        it (its work horse killed with no retries left) is failed. One whose job RQ counts finished, with no worker on
        it, is queued again (a run resumes from its newest checkpoint): a superseded attempt's worker leaves the job to
        the later attempt (`shared.workers.JobProcessWorker`), but one of an earlier version, or one whose ending races
        RQ's handing the job on, can still end it as finished, and nothing would take it up again. One with no job at
        all (the service died, or Redis failed, between recording it and queueing it) is queued (the job id makes that
        happen once)."""
        records, enqueue, what = ((self.runs, queues.enqueue_training, "training") if kind == queues.TRAIN
                                  else (self.evals, queues.enqueue_evaluation, "evaluation"))
        job = queues.fetch_job(self.settings, self.redis, kind, record_id)
        if job is None:
            enqueue(self.settings, self.redis, record_id)
            return record
        status = JobStatus(job.get_status(refresh=False)).value  # its word (`failed`), not the enum's repr
        # Failed by RQ, unless a live worker runs it (a stalled worker's attempt of an earlier version may have failed
        # the job while the attempt that took it over goes on).
        if status in ("failed", "stopped", "canceled") and not self.job_held(kind, job.id):
            error = record.get("error") or f"the {what} job ended as {status}"
            records.advance(record_id, status="failed", error=error)
            return records.get(record_id) or record
        if status == "finished" and record.get("status") in ("queued", "running") and not self.job_held(kind, job.id):
            # Once per attempt: two readers at once (a client and a metrics scrape) must not both delete and queue
            # (the second would delete the job the first queued, perhaps already running, and queue another).
            guard = f"{records.key(record_id)}:requeued:{record.get('attempts', 0)}"
            if not self.redis.set(guard, 1, nx=True, ex=86_400):
                return record
            job.delete()
            enqueue(self.settings, self.redis, record_id)
            note = "its job had ended without finishing it (an attempt taken over by another); queued again"
            records.advance(record_id, status="queued", note=note)
            return records.get(record_id) or record
        return record

    def job_held(self, kind: str, job_id: str) -> bool:
        """Whether a live worker is running this job now."""
        queue = queues.open_queue(self.settings, kind, self.redis)
        workers = Worker.all(queue=queue, serializer=queue.serializer)
        return any(worker.get_current_job_id() == job_id for worker in workers)

    def list_runs(self, limit: int = 100) -> list[Run]:
        runs = []
        for run_id in self.runs.ids(limit):
            try:
                runs.append(self.get_run(run_id))
            except ServiceError:
                continue  # removed meanwhile
        return runs

    def overview(self, limit: int = 1000) -> TrainerOverview:
        """The newest `limit` runs, the evaluations by status, the jobs waiting per queue and the train workers (for
        `/metrics`)."""
        evaluations = Counter(
            record.get("status") for eval_id in self.evals.ids(limit) if (record := self.evals.get(eval_id))
        )
        train_queue = queues.open_queue(self.settings, queues.TRAIN, self.redis)
        return TrainerOverview(
            runs=self.list_runs(limit),
            evaluations_by_status=dict(evaluations),
            queued_jobs={kind: queues.open_queue(self.settings, kind, self.redis).count for kind in queues.KINDS},
            # Worker.all drops the workers whose key expired (they died); Worker.count would still count them.
            workers=len(Worker.all(queue=train_queue, serializer=train_queue.serializer)),
        )

    def run_dir(self, run_id: str) -> Path:
        self.get_run(run_id)
        return self.settings.runs_dir() / run_id

    def metrics_path(self, run_id: str) -> Path:
        path = self.run_dir(run_id) / METRICS_FILE
        if not path.exists():
            raise ServiceError(404, f"run {run_id!r} has logged no step yet", "not_found")
        return path

    def metrics_jsonl(self, run_id: str) -> bytes:
        """The run's metrics lines so far, read once (a file served as it grows would outrun the length its response
        declared), up to the last whole line (a step may be appending one)."""
        data = self.metrics_path(run_id).read_bytes()
        return data[: data.rfind(b"\n") + 1]

    def curve_png(self, run_id: str) -> bytes:
        """The run's training curve as PNG: the final one once it succeeded, else drawn now from the steps so far."""
        from services.trainer.plots import plot_training_curve, read_metrics

        run = self.get_run(run_id)
        directory = self.settings.runs_dir() / run_id
        final = directory / CURVE_FILE
        if run.status == "succeeded" and final.exists():
            return final.read_bytes()
        metrics = read_metrics(self.metrics_path(run_id))
        live = directory / f".curve-{uuid.uuid4().hex}.png"
        try:
            return plot_training_curve(metrics, live).read_bytes()
        finally:
            live.unlink(missing_ok=True)

    def adapter_dir(self, run_id: str) -> Path:
        run = self.get_run(run_id)
        directory = Path(self.settings.adapters_dir) / run_id
        if run.status != "succeeded" or not (directory / ADAPTER_CONFIG_FILE).exists():
            raise no_adapter(run_id, run.status)
        return directory

    def adapter_archive(self, run_id: str) -> Iterator[bytes]:
        """The run's adapter as a gzipped tar (`<run id>/adapter_config.json`, ...: `ADAPTER_FILES`, not the folder's
        note of the run that published it), streamed."""
        return stream_tar_gz(self.adapter_dir(run_id), run_id, ADAPTER_FILES)

    # --- Evaluations -------------------------------------------------------------------------------------------------

    def create_evaluation(self, request: EvalRequest, *, run_id: str | None = None,
                          eval_id: str | None = None) -> tuple[Evaluation, bool]:
        """Record an evaluation and queue it; returns it and whether it is new (an `eval_id` given twice is not)."""
        if request.benchmark is not None and request.benchmark not in BENCHMARKS:
            raise ServiceError(422, unknown_benchmark_message(request.benchmark), "invalid_request", "benchmark")
        if request.problems is not None and len(request.problems) > self.settings.max_eval_problems:
            raise ServiceError(422, f"{len(request.problems)} problems; at most {self.settings.max_eval_problems} "
                               "per evaluation", "invalid_request", "problems")
        for position, name in enumerate(request.models):
            if name != BASE_MODEL:
                self.check_adapter(name, f"models.{position}", publishing=name == run_id)
        eval_id = eval_id or request.eval_id or f"eval-{uuid.uuid4().hex[:12]}"
        fingerprint = request_fingerprint(request)
        existing = self.evals.get(eval_id)
        if existing is not None:
            # The same request again (a retry after a lost answer) is the same evaluation; another under its id is not.
            # Evaluations recorded before fingerprints were (none stored) are taken as the same.
            if existing.get("request_fingerprint", fingerprint) != fingerprint:
                raise ServiceError(409, f"evaluation {eval_id!r} exists with other settings; choose another eval_id",
                                   "conflict", "eval_id")
            return self.get_evaluation(eval_id, problems=False), False
        # Named by the request: two POSTs under one new eval_id at once write two files, and the one not recorded
        # goes (below), rather than the second overwriting the problems the first one's evaluation runs on.
        problems_path = self.settings.evals_dir() / eval_id / f"problems-{fingerprint}.jsonl"
        if request.problems is not None:
            write_uploaded_problems(request, problems_path)
        options = EvalOptions(**request.model_dump(include=set(EvalOptions.model_fields))).model_dump(mode="json")
        fields = {
            "status": "queued",
            "models": request.models,
            "benchmark": request.benchmark or "uploaded",
            "options": options,
            "progress": {},
            "run_id": run_id,
            "attempts": 0,
            "request_fingerprint": fingerprint,
            "problems_file": problems_path.name if request.problems is not None else None,
        }
        if not self.evals.create(eval_id, fields):  # another POST under this id recorded it first
            if (self.evals.get(eval_id) or {}).get("request_fingerprint") != fingerprint:
                problems_path.unlink(missing_ok=True)
                raise ServiceError(409, f"evaluation {eval_id!r} exists with other settings; choose another eval_id",
                                   "conflict", "eval_id")
            return self.get_evaluation(eval_id, problems=False), False
        queues.enqueue_evaluation(self.settings, self.redis, eval_id)
        return self.get_evaluation(eval_id, problems=False), True

    def check_adapter(self, name: str, param: str, *, publishing: bool = False) -> None:
        """A model to evaluate must be a finished run's adapter or an adapter in the adapters directory. `publishing`:
        the run's own job asks, after publishing the adapter and before marking the run succeeded."""
        run = self.runs.get(name)
        if run is not None and run.get("status") != "succeeded" and not publishing:
            raise no_adapter(name, run.get("status"), param)
        if not (Path(self.settings.adapters_dir) / name / ADAPTER_CONFIG_FILE).exists():
            raise ServiceError(404, f"no run or adapter {name!r} in {self.settings.adapters_dir}", "not_found", param)

    def get_evaluation(self, eval_id: str, *, problems: bool = True) -> Evaluation:
        record = self.evals.get(eval_id)
        if record is None:
            raise not_found("evaluation", eval_id)
        if record.get("status") not in FINAL:
            record = self.reconcile(queues.EVAL, eval_id, record)
        report_path = self.settings.evals_dir() / eval_id / REPORT_NAME
        if record.get("status") == "succeeded" and report_path.exists():
            report = json.loads(report_path.read_bytes())
            record["rows"] = report["rows"]
            if problems:
                record["problems"] = report["problems"]
        return Evaluation(**{name: value for name, value in record.items() if name in Evaluation.model_fields})


def request_fingerprint(request: RunRequest | EvalRequest) -> str:
    """What makes two run or evaluation requests the same request (for an idempotent retried POST)."""
    body = request.model_dump(mode="json", exclude_unset=True, exclude={"eval_id"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def rollout_adapter_of(directory: Path) -> str | None:
    """The adapter that rolled out a curated dataset: `options.rollout_adapter` in the curator's `dataset.json`
    beside its pairs (or a top-level `rollout_adapter`); None for the base model, or without a readable file."""
    try:
        data = json.loads((directory / "dataset.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    options = data.get("options") if isinstance(data.get("options"), dict) else {}
    adapter = data.get("rollout_adapter") or options.get("rollout_adapter")
    return adapter if isinstance(adapter, str) and adapter else None


def write_uploaded_problems(request: EvalRequest, path: Path) -> None:
    """Check uploaded problems by the one loader's rules (errors name `problems:row N`, from 0; a problem without an
    id is `p<N>`), then write them as a problem file: a refused upload writes nothing."""
    rows = [p.model_dump(exclude_none=True) for p in request.problems]
    for position, row in enumerate(rows):
        row.setdefault("id", f"p{position}")
    try:
        problems = parse_problem_rows(rows, where="problems")
    except DatasetError as exc:
        raise ServiceError(422, str(exc), "invalid_request", "problems") from exc
    write_problems_jsonl(problems, path)


def stream_tar_gz(directory: Path, arcname: str, names: tuple[str, ...], chunk_size: int = 1 << 16) -> Iterator[bytes]:
    """A gzipped tar of the files `names` in `directory` that exist (as `arcname/<name>`), produced in a thread into a
    pipe and yielded chunk by chunk, so a large adapter is never held in memory. Closing the iterator early (a client
    that went away) stops the thread."""
    read_fd, write_fd = os.pipe()

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink, tarfile.open(fileobj=sink, mode="w|gz") as tar:
                for name in names:
                    if (directory / name).is_file():
                        tar.add(directory / name, arcname=f"{arcname}/{name}")
        except (BrokenPipeError, OSError):
            pass  # the reader stopped

    producer = threading.Thread(target=produce, name=f"tar-{arcname}", daemon=True)
    producer.start()
    with os.fdopen(read_fd, "rb") as source:
        while chunk := source.read(chunk_size):
            yield chunk
    producer.join(timeout=10)
