"""The train worker's jobs: `train_run(run_id)` and `evaluate_models(eval_id)`, run by `ssb worker train` from the
queues in services/trainer/queues.py. They take ids, read everything else from Redis and the data volume, and are safe
to run twice (RQ delivers at least once):

- `train_run` trains into DATA_DIR/runs/<run id>/ with checkpoints; an attempt that finds a checkpoint there (its
  predecessor's worker died) resumes from the newest and records `resumed_from_step`; one that finds a run already
  final does nothing. The adapter is published to ADAPTERS_DIR/<run id>/ by an atomic rename (never over a folder
  that another run or a person put there: the run fails instead), then the run is marked succeeded with the evaluation
  it asked for already queued (its id derived from the run's, so it is queued once), or with `evaluation_error` saying
  why it could not be. Each attempt writes the run's record only while it is the run's latest (`attempt=` in
  `Records.advance`): one whose worker lost its heartbeat while it went on stops at its next step.
- `evaluate_models` evaluates the base model and adapters through the teacher service (`TeacherClient` is an
  `Engine`; adapters are loaded there as LoRAs by name from the shared adapters directory) and writes the report to
  DATA_DIR/evals/<eval id>/report.json.

Errors that a retry cannot fix (bad pairs, a refused request) fail the record at once and end the job normally, so RQ
does not run it again; any other error propagates, RQ retries the job while it has retries, and `on_*_failure` records
the outcome (retrying, or failed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from services.trainer.records import FINAL, eval_records, run_records
from services.trainer.settings import TrainerSettings
from shared.workers import connect_redis, started_elsewhere, through_redis_restarts

log = logging.getLogger("ssb.trainer")

_settings: TrainerSettings | None = None


def configure(settings: TrainerSettings) -> None:
    """The settings the worker's jobs use (the worker sets them before it forks its work horses)."""
    global _settings
    _settings = settings


def current_settings() -> TrainerSettings:
    global _settings
    if _settings is None:
        _settings = TrainerSettings()
    return _settings


# --- Training ---------------------------------------------------------------------------------------------------------


def train_run(run_id: str) -> dict:
    """Train one run to its adapter, resuming from its newest checkpoint if an earlier attempt left one."""
    from services.trainer.config import TrainConfig, TrainingError
    from services.trainer.inputs import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, PairDataError, latest_checkpoint
    from services.trainer.training import train
    from shared.models import resolve_model
    from shared.storage import StorageError

    settings = current_settings()
    connection = connect_redis(settings.redis_url)
    runs = run_records(connection, settings.key_prefix)
    run = runs.get(run_id)
    if run is None:
        log.error("run %s: no record; nothing to do", run_id)
        return {"status": "missing"}
    if run["status"] in FINAL:
        return {"status": run["status"]}  # a second delivery of a finished job, or a cancelled run

    # The run is claimed before its directory is touched: an earlier attempt still going (its worker stalled past
    # its heartbeat) checks its claim before every write (`still_this_attempt`) and stops.
    attempt = runs.increment(run_id, "attempts")
    # Its worker named at once (RQ sets the id in the work horse): on_train_failure takes a failure of an attempt whose
    # worker the record does not name for one taken over, so a failure before the progress below must find it.
    if not runs.advance(run_id, attempt=attempt, worker=os.environ.get("RQ_WORKER_ID")):
        return {"status": "final"}
    run_dir = settings.runs_dir() / run_id
    checkpoint = latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    resumed_from = int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX)) if checkpoint is not None else None
    if checkpoint is None and run_dir.exists():
        shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint: start over
    started = time.time()
    progress = {
        "status": "running",
        "started_at": started,
        "error": None,
        "step": resumed_from or 0,
        "time_left_seconds": None,
        "seconds_per_step": None,
    }
    if resumed_from is not None:
        progress["resumed_from_step"] = resumed_from
        progress["note"] = f"attempt {attempt} resumed from the checkpoint at step {resumed_from} (an earlier attempt stopped)"
    elif attempt > 1:
        progress["note"] = f"attempt {attempt} started over: the earlier attempt stopped before its first checkpoint"
    if not runs.advance(run_id, attempt=attempt, **progress):
        return {"status": "final"}
    log.info("run %s: attempt %d%s", run_id, attempt, f", resuming at step {resumed_from}" if resumed_from else "")

    config = TrainConfig(**run["config"])
    first_logged: list[tuple[int, float]] = []  # (step, time) of this attempt's first logged step

    def on_step(metrics) -> None:
        # The pace from the first logged step on, so that loading the model does not count as training time.
        now = time.time()
        if not first_logged:
            first_logged.append((metrics.step, now))
            per_step = (now - started) / max(1, metrics.step - (resumed_from or 0))
        else:
            step0, time0 = first_logged[0]
            per_step = (now - time0) / max(1, metrics.step - step0)
        fields = {
            "step": metrics.step,
            "total_steps": metrics.total_steps,
            "metrics": metrics.model_dump(mode="json"),
            "seconds_per_step": per_step,
            "time_left_seconds": per_step * (metrics.total_steps - metrics.step),
        }
        # Saved before on_step is called, which only logged steps reach: the newest, though `log_every` may not
        # divide it.
        if config.checkpoint_every and metrics.step >= config.checkpoint_every:
            fields["checkpoint_step"] = metrics.step // config.checkpoint_every * config.checkpoint_every
        if not through_redis_restarts(lambda: runs.advance(run_id, attempt=attempt, **fields), f"run {run_id}"):
            raise AttemptSuperseded(f"run {run_id}: attempt {attempt} stops at step {metrics.step}")

    def still_this_attempt() -> None:
        if not through_redis_restarts(lambda: runs.advance(run_id, attempt=attempt), f"run {run_id}"):
            raise AttemptSuperseded(f"run {run_id}: attempt {attempt} stops before writing")

    try:
        result = train(
            run["pairs_dir"],
            run_dir,
            resolve_model(run.get("model", settings.model), settings),  # as recorded: every attempt, any worker
            config,
            resume=checkpoint is not None,
            on_step=on_step,
            before_write=still_this_attempt,
            hold_output_dir=False,  # the record keeps attempts apart: a stalled one runs on until its next write
        )
    except AttemptSuperseded as exc:
        log.warning("%s: a later attempt took the run over, or it ended", exc)
        return {"status": "superseded"}
    except (TrainingError, PairDataError, StorageError, FileNotFoundError) as exc:
        filename = getattr(exc, "filename", None)
        if filename is not None and Path(filename).is_relative_to(run_dir):
            # a checkpoint an earlier attempt, still saving, removed meanwhile: no reason to fail the run for good
            if runs.advance(run_id, attempt=attempt):
                raise  # RQ runs the job again, from the newest checkpoint
            return {"status": "superseded"}
        if runs.advance(run_id, attempt=attempt, status="failed", error=f"{type(exc).__name__}: {exc}",
                        finished_at=time.time()):
            log.error("run %s failed: %s", run_id, exc)
            return {"status": "failed"}
        return {"status": "superseded"}  # e.g. its directory deleted by the attempt that took the run over
    except Exception:
        if not runs.advance(run_id, attempt=attempt):  # its failure callback would fail or re-queue the later attempt
            log.exception("run %s: attempt %d failed after a later attempt took the run over", run_id, attempt)
            return {"status": "superseded"}
        raise

    if not runs.advance(run_id, attempt=attempt):  # nothing to write: is this still the run's attempt?
        return {"status": "superseded"}
    try:
        publisher = {"run_id": run_id, "key_prefix": settings.key_prefix, "created_at": run.get("created_at")}
        publish_adapter(run_dir, Path(settings.adapters_dir), run_id, publisher)
    except AdapterNameTaken as exc:  # a retry cannot free the name: fail the run, its adapter stays in its run dir
        runs.advance(run_id, attempt=attempt, status="failed", error=str(exc), finished_at=time.time())
        log.error("run %s failed: %s", run_id, exc)
        return {"status": "failed"}
    if not runs.advance(run_id, attempt=attempt):  # cancelled (or taken over) while publishing: no evaluation
        return {"status": "superseded"}
    # The evaluation is queued before the run is marked succeeded, so that a succeeded run that asked for one always
    # names it (and a retried job that died in between queues the same one: its id comes from the run's).
    evaluation = run.get("evaluation")
    evaluation_id = queue_evaluation_after(settings, connection, run_id, evaluation) if evaluation else None
    succeeded = runs.advance(
        run_id,
        attempt=attempt,
        status="succeeded",
        evaluation_id=evaluation_id,
        step=result.steps,
        total_steps=result.steps,
        time_left_seconds=0.0,
        final_loss=result.final_loss,
        num_pairs=result.num_pairs,
        adapter=run_id,
        finished_at=time.time(),
    )
    if not succeeded:
        return drop_evaluation_of_ended_run(settings, connection, run_id, evaluation_id)
    log.info("run %s succeeded: %d steps, final loss %s", run_id, result.steps, result.final_loss)
    return {"status": "succeeded", "steps": result.steps}


def drop_evaluation_of_ended_run(settings: TrainerSettings, connection, run_id: str, evaluation_id: str | None) -> dict:
    """The run ended otherwise (cancelled, or failed) between its last check and being marked succeeded: the
    evaluation just queued for it does not run (its job does nothing for an ended record). A run taken over by a
    later attempt keeps it: that attempt queues the same one."""
    status = (run_records(connection, settings.key_prefix).get(run_id) or {}).get("status")
    if evaluation_id is not None and status in FINAL and status != "succeeded":
        eval_records(connection, settings.key_prefix).advance(
            evaluation_id, status="failed", error=f"run {run_id} was {status} before its evaluation started",
            finished_at=time.time(),
        )
    return {"status": "superseded"}


class AttemptSuperseded(Exception):
    """A later attempt of the run started (its worker's heartbeat lapsed while this one went on), or the run ended:
    this attempt stops writing."""


class EvaluationSuperseded(Exception):
    """A later attempt of the evaluation started, or it ended: this attempt stops writing."""


class AdapterNameTaken(Exception):
    """ADAPTERS_DIR/<run id> holds a folder that this run did not publish (placed by hand, or another deployment's)."""


PUBLISHED_BY = "published_by.json"  # in a published adapter's folder: the run that published it


def publish_adapter(run_dir: Path, adapters_dir: Path, run_id: str, publisher: dict) -> Path:
    """Copy the adapter (and its training config) to ADAPTERS_DIR/<run id>/ by an atomic rename: the teacher never
    sees half an adapter. The folder also says which run published it (`publisher`: the run's id, deployment and
    creation time), so that any attempt of the same run, on any worker, replaces it, and nothing else does: a folder
    of that name that another run or a person put there raises `AdapterNameTaken`."""
    from services.trainer.service import ADAPTER_FILES

    adapters_dir.mkdir(parents=True, exist_ok=True)
    final = adapters_dir / run_id
    if final.exists() and published_by(final) != publisher:
        raise AdapterNameTaken(
            f"{final} holds an adapter that run {run_id!r} did not publish (no {PUBLISHED_BY} of this run in it); it "
            f"was left as it is, and the run's adapter stays in {run_dir}"
        )
    for leftover in [*adapters_dir.glob(f".{run_id}.*.tmp"), *adapters_dir.glob(f".{run_id}.*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)  # an earlier attempt of this run killed while publishing
    tmp = adapters_dir / f".{run_id}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.mkdir()
        for name in ADAPTER_FILES:
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, tmp / name)
        (tmp / PUBLISHED_BY).write_text(json.dumps(publisher) + "\n")
        if final.exists():  # an earlier attempt published the same adapter, then died before marking the run:
            # moved aside whole, not emptied in place, so a teacher loading it meanwhile never reads half of it
            old = adapters_dir / f".{run_id}.{uuid.uuid4().hex}.old"
            os.rename(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.rename(old, final)  # the earlier copy stays published
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when something above failed
    return final


def published_by(adapter_dir: Path) -> dict | None:
    """The run that published an adapter folder, or None for one placed by hand."""
    try:
        return json.loads((adapter_dir / PUBLISHED_BY).read_bytes())
    except (OSError, ValueError):
        return None


def queue_evaluation_after(settings: TrainerSettings, connection, run_id: str, options: dict) -> str | None:
    """Queue the evaluation a run asked for (id `<run id>-eval`, so queued once); its id, or None when refused, with
    the reason recorded on the run as `evaluation_error` (the run itself still succeeds: its adapter is published)."""
    from services.trainer.schemas import BASE_MODEL, EvalAfterRun, EvalRequest, run_eval_id
    from services.trainer.service import ServiceError, TrainerService

    try:
        after = EvalAfterRun(**options)
        models = [BASE_MODEL, run_id] if after.include_base else [run_id]
        fields = after.model_dump(exclude={"include_base"})
        evaluation, _ = TrainerService(settings, connection).create_evaluation(
            EvalRequest(models=models, **fields), run_id=run_id, eval_id=run_eval_id(run_id)
        )
    except (ServiceError, ValueError) as exc:  # ValueError: pydantic's ValidationError among others
        error = f"the evaluation it asked for could not be queued: {refusal_reason(exc)}"
        run_records(connection, settings.key_prefix).advance(run_id, evaluation_error=error)
        log.error("run %s: %s", run_id, error)
        return None
    return evaluation.id


def refusal_reason(exc: Exception) -> str:
    """One line saying why a request was refused: a ServiceError's message, or each invalid field of a pydantic
    ValidationError with what is wrong with it."""
    from pydantic import ValidationError

    from services.trainer.service import ServiceError

    if isinstance(exc, ServiceError):
        return exc.message
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'evaluation'}: {e['msg']}" for e in exc.errors())
    return str(exc)


def on_train_failure(job, connection, exc_type, exc_value, traceback) -> None:
    """RQ's failure callback (also called for a job abandoned by a dead worker): retrying, or failed for good. The
    failure of an attempt that a later one, on another worker, took over says nothing of the run: not recorded."""
    settings = current_settings()
    run_id = job.args[0]
    runs = run_records(connection, settings.key_prefix)
    latest = (runs.get(run_id) or {}).get("worker")
    if latest and job.worker_name and latest != job.worker_name:
        log.warning("run %s: an attempt on %s failed after %s took the run over", run_id, job.worker_name, latest)
        return
    error = f"{exc_type.__name__}: {exc_value}" if exc_type else "the job failed"
    if job.retries_left:
        runs.advance(run_id, status="queued", error=error, note=f"the attempt stopped ({error}); queued again")
    else:
        runs.advance(run_id, status="failed", error=error, finished_at=time.time())


# --- Evaluation -------------------------------------------------------------------------------------------------------


def evaluate_models(eval_id: str) -> dict:
    """Evaluate the models of one evaluation through the teacher service and write its report."""
    from services.evaluation.evaluation import EvalConfig, evaluate, render_table
    from services.trainer.schemas import BASE_MODEL
    from services.trainer.service import REPORT_NAME, UPLOADED_PROBLEMS
    from shared.datasets import DatasetError, load_problems
    from shared.models import needs_worked_example
    from shared.storage import replace_atomically
    from shared.teacher_client import TeacherClient, TeacherRejected

    settings = current_settings()
    connection = connect_redis(settings.redis_url)
    evals = eval_records(connection, settings.key_prefix)
    record = evals.get(eval_id)
    if record is None:
        log.error("evaluation %s: no record; nothing to do", eval_id)
        return {"status": "missing"}
    if record["status"] in FINAL:
        return {"status": record["status"]}
    attempt = evals.increment(eval_id, "attempts")
    # A retry starts over: the previous attempt's progress goes. Every later write names this attempt, so one taken
    # over by a later attempt (its worker stalled past its heartbeat) writes nothing more.
    if not evals.advance(eval_id, attempt=attempt, status="running", started_at=time.time(), error=None, progress={}):
        return {"status": "superseded"}
    run = run_records(connection, settings.key_prefix).get(record["run_id"]) if record.get("run_id") else None
    if run is not None and run.get("status") in ("failed", "cancelled"):  # queued as it ended (a kill between the two)
        error = f"its run {record['run_id']} {run['status']}: there is no adapter of it to evaluate"
        evals.advance(eval_id, attempt=attempt, status="failed", error=error, finished_at=time.time())
        return {"status": "failed"}

    eval_dir = settings.evals_dir() / eval_id
    options = record["options"]
    try:
        uploaded = eval_dir / (record.get("problems_file") or UPLOADED_PROBLEMS)
        source = uploaded if record["benchmark"] == "uploaded" else record["benchmark"]
        problems = load_problems(source, limit=options.get("limit"), case_blind_ids=source != uploaded)
    except (DatasetError, FileNotFoundError) as exc:
        evals.advance(eval_id, attempt=attempt, status="failed", error=f"problems: {exc}", finished_at=time.time())
        return {"status": "failed"}
    worked_example = options.get("worked_example")  # None: the teacher's model decides, once it answers
    config = EvalConfig(
        samples=options["samples"],
        temperature=options["temperature"],
        max_tokens=options["max_tokens"],
        seed=options["seed"],
        worked_example=bool(worked_example),
    )
    adapters = [None if name == BASE_MODEL else name for name in record["models"]]
    teacher_url = settings.teacher_urls[sum(eval_id.encode()) % len(settings.teacher_urls)]
    progress: dict[str, str] = {}

    def on_progress(model: str, done: int, total: int) -> None:
        progress[model] = f"{done}/{total}"
        if not evals.advance(eval_id, attempt=attempt, progress=progress):
            raise EvaluationSuperseded(f"evaluation {eval_id}: attempt {attempt} stops")

    try:
        with TeacherClient(teacher_url, api_key=settings.teacher_key()) as teacher:
            teacher.wait_ready(timeout_seconds=300)
            held_before = {card.name for card in teacher.models().adapters}  # someone's: left loaded after
            loaded = []
            try:
                for adapter in dict.fromkeys(a for a in adapters if a is not None):
                    # as published now: a copy the teacher loaded earlier under that name may be an older one (a
                    # run's attempt that published, then died before it succeeded)
                    teacher.load_adapter(adapter, replace=True)
                    if adapter not in held_before:
                        loaded.append(adapter)
                if worked_example is None:
                    config = config.model_copy(update={"worked_example": needs_worked_example(teacher.model_name)})
                report = evaluate(problems, teacher, config, adapters=adapters, benchmark=record["benchmark"],
                                  on_progress=on_progress)
            finally:
                unload_quietly(teacher_url, settings.teacher_key(), loaded)
    except TeacherRejected as exc:
        if passing_refusal(exc):
            raise RuntimeError(f"the teacher: {exc.message}") from exc  # RQ runs the evaluation again
        evals.advance(eval_id, attempt=attempt, status="failed", error=str(exc), finished_at=time.time())
        return {"status": "failed"}
    except EvaluationSuperseded as exc:
        log.warning("%s: a later attempt took the evaluation over, or it ended", exc)
        return {"status": "superseded"}
    if not evals.advance(eval_id, attempt=attempt):
        return {"status": "superseded"}
    # Rows keep the names asked for (`base`, run ids), which the table and per-problem answers are keyed by. The
    # report is on disk before the record says so.
    replace_atomically(eval_dir / REPORT_NAME, report.model_dump_json())
    table = plain_table(render_table(report))
    if not evals.advance(eval_id, attempt=attempt, status="succeeded", table=table, finished_at=time.time()):
        return {"status": "superseded"}
    return {"status": "succeeded"}


def passing_refusal(exc) -> bool:
    """A refusal another attempt gets past: an adapter being published again as the teacher copied it (409 on
    `path`), or unloaded by another evaluation between this one's reload and its request (404 on `adapter`)."""
    return (exc.status, exc.param) in ((409, "path"), (404, "adapter"))


def unload_quietly(teacher_url: str, api_key: str | None, names: list[str]) -> None:
    """Unload the adapters an evaluation loaded (not those loaded before it): each is a copy of its files in the
    teacher, which would otherwise stay until the teacher stops, one more for every run evaluated. Another client
    still rolling out with one (a curation, another evaluation) loads it again at its next request
    (`TeacherClient.post_generations`); its requests under way keep their copy until they end. Tried once each (a
    teacher gone would hold a failed evaluation's record up through every retry)."""
    from shared.teacher_client import TeacherClient, TeacherError

    if not names:
        return
    with TeacherClient(teacher_url, api_key=api_key, retries=0, timeout=10.0) as teacher:
        for name in names:
            try:
                teacher.unload_adapter(name)
            except TeacherError as exc:  # unloaded meanwhile by another, or the teacher gone: nothing to free here
                log.warning("adapter %s: not unloaded after the evaluation: %s", name, exc)


def plain_table(table) -> str:
    """A rich table as plain text."""
    import io

    from rich.console import Console

    console = Console(width=120, no_color=True, file=io.StringIO())
    console.print(table)
    return console.file.getvalue()


def on_eval_failure(job, connection, exc_type, exc_value, traceback) -> None:
    if started_elsewhere(job, connection, job.worker_name):  # a stalled run's late failure: the job is another's now
        return
    settings = current_settings()
    eval_id = job.args[0]
    evals = eval_records(connection, settings.key_prefix)
    error = f"{exc_type.__name__}: {exc_value}" if exc_type else "the job failed"
    if job.retries_left:
        evals.advance(eval_id, status="queued", error=error)
    else:
        evals.advance(eval_id, status="failed", error=error, finished_at=time.time())
