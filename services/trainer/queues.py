"""The trainer's RQ glue, all of it: queue names, how jobs are enqueued, and the worker class.

    <prefix>:train    one job per training run: `services.trainer.jobs.train_run(run_id)`
    <prefix>:eval     one job per evaluation:   `services.trainer.jobs.evaluate_models(eval_id)`

Jobs carry ids, never objects, and travel as JSON (`JSONSerializer`: nothing is pickled). Each is enqueued with a
timeout and `Retry(max=job_retries)`: a job whose worker died comes back only when it has retries left. A worker that
dies stops heartbeating; its job counts as abandoned once its heartbeat is `HEARTBEATS_TO_ABANDON` heartbeats old,
and the next maintenance pass of any worker (every `maintenance_interval_seconds`) puts it back on its queue, where
another worker resumes it from its last checkpoint. RQ's default would be the monitoring interval + 60 s of heartbeat
and 10 minutes between maintenance passes; `TrainWorker` shortens both. Stopping a busy worker (SIGTERM, Ctrl-C)
hands its job back to the queue at once instead of waiting for the run to end.
"""

from __future__ import annotations

import os
import socket
import uuid

import redis
from rq import Callback, Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from services.trainer.settings import TrainerSettings
from shared.workers import JobProcessWorker

TRAIN = "train"
EVAL = "eval"
KINDS = (TRAIN, EVAL)

# A job whose heartbeat is this many heartbeat intervals old counts as abandoned (its worker died).
HEARTBEATS_TO_ABANDON = 3


def queue_name(settings: TrainerSettings, kind: str) -> str:
    return f"{settings.key_prefix}:{kind}"


def open_queue(settings: TrainerSettings, kind: str, connection: redis.Redis) -> Queue:
    return Queue(queue_name(settings, kind), connection=connection, serializer=JSONSerializer)


def job_id(settings: TrainerSettings, kind: str, record_id: str) -> str:
    """The one job of a record (RQ job keys are global, so the key prefix keeps deployments apart)."""
    return f"{settings.key_prefix}-{kind}-{record_id}"


def enqueue_training(settings: TrainerSettings, connection: redis.Redis, run_id: str) -> None:
    """Queue a run's training job once (a second call for the same run while it is known to RQ does nothing)."""
    enqueue(
        settings,
        connection,
        TRAIN,
        "services.trainer.jobs.train_run",
        run_id,
        timeout=settings.train_timeout_seconds,
        on_failure="services.trainer.jobs.on_train_failure",
    )


def enqueue_evaluation(settings: TrainerSettings, connection: redis.Redis, eval_id: str) -> None:
    """Queue an evaluation job once."""
    enqueue(
        settings,
        connection,
        EVAL,
        "services.trainer.jobs.evaluate_models",
        eval_id,
        timeout=settings.job_timeout_seconds,
        on_failure="services.trainer.jobs.on_eval_failure",
    )


def enqueue(
    settings: TrainerSettings, connection: redis.Redis, kind: str, function: str, record_id: str, *, timeout: int,
    on_failure: str,
) -> None:
    try:
        open_queue(settings, kind, connection).enqueue(
            function,
            record_id,
            job_id=job_id(settings, kind, record_id),
            unique=True,
            job_timeout=timeout,
            retry=Retry(max=settings.job_retries),
            on_failure=Callback(on_failure),
            result_ttl=7 * 86_400,
            failure_ttl=30 * 86_400,
            description=f"{kind} {record_id}",
        )
    except DuplicateJobError:
        pass  # queued (or run) already: the first enqueue stands


def fetch_job(settings: TrainerSettings, connection: redis.Redis, kind: str, record_id: str) -> Job | None:
    """The RQ job of a run or evaluation, or None when RQ no longer has it."""
    from rq.exceptions import NoSuchJobError

    try:
        return Job.fetch(job_id(settings, kind, record_id), connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


class TrainWorker(JobProcessWorker):
    """An RQ worker (one job at a time, each in a forked work horse) whose jobs count as abandoned after a few
    missed heartbeats instead of RQ's minute or more. When a work horse dies (handed back on SIGTERM, or killed), the
    job's failure callback still runs (`JobProcessWorker`): the run's record says that it is queued again, or failed
    without retries left, instead of still running. A killed worker's work horse dies with it, so the attempt that
    takes its job over never trains beside it into the same run directory."""

    heartbeat_seconds: int = 5

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return HEARTBEATS_TO_ABANDON * self.heartbeat_seconds


def make_worker(settings: TrainerSettings, kinds: tuple[str, ...], connection: redis.Redis) -> TrainWorker:
    """A worker on the given queues (in that order of priority) with the settings' heartbeat and maintenance."""
    worker = TrainWorker(
        [open_queue(settings, kind, connection) for kind in kinds],
        # Named after the deployment, so its keys in Redis say whose worker it is; the random part keeps a restarted
        # container (same hostname, PID 1 again) from clashing with its own previous life until that key expires.
        name=f"{settings.key_prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        connection=connection,
        serializer=JSONSerializer,
        job_monitoring_interval=settings.worker_heartbeat_seconds,
        maintenance_interval=settings.maintenance_interval_seconds,
        # An idle worker blocks on the queue for worker_ttl - 15 s between maintenance passes: keep that to the
        # maintenance interval, so abandoned jobs are found while every worker waits.
        worker_ttl=settings.maintenance_interval_seconds + 15,
    )
    worker.heartbeat_seconds = settings.worker_heartbeat_seconds
    return worker
