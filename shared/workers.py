"""What the curator's and the trainer's RQ workers share: a Redis client that cannot hang, and a job's process that
neither outlives its worker nor dies unreported, nor with a Redis briefly unreachable.

RQ runs a job in a forked process (its "work horse"). That process does not die with its worker: a worker killed
(SIGKILL, the OOM killer) leaves it running on its own, and once the worker's heartbeat lapses another worker takes
the job over while the first run still writes (two training attempts into one run directory, two curations of one
batch). And RQ calls the job's `on_failure` callback when the job raises, but not when that process dies (the OOM
killer, a signal, RQ's own kill past the job's timeout, a worker handing its job back): the job is retried or failed
with no callback, and whatever the callback records (a run queued again, a problem failed) would stay unsaid.

A worker that stalls (stopped, swapped out) past its heartbeat has its job taken over the same way, but then wakes
and ends its own run of the job: RQ would retry it (queueing it again beside the run that took over), fail it, or
mark it finished, and its failure callback would record an outcome, all on behalf of a job now run elsewhere.
The worker below knows such a late ending by its execution, no longer on RQ's started registry, and leaves the job
alone; the services' failure callbacks skip the failure of a run whose job another worker has started since
(`started_elsewhere`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from rq import Worker
from rq.callbacks import execute_failure_callback
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.utils import now
from rq.worker import WorkerStatus

from shared.processes import die_with_parent

T = TypeVar("T")
log = logging.getLogger("ssb.workers")

# Redis errors a service answers with 503 (try again later) rather than 500.
REDIS_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
# How long a job's own calls to Redis wait out a Redis that does not answer (a restart) before they give up: past the
# heartbeat TTL, when another worker may take the job over once Redis is back.
REDIS_PATIENCE_SECONDS = 60.0
# The states of a job that no worker has started: cancelling it there keeps it from ever running.
NOT_STARTED = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED)


def through_redis_restarts(call: Callable[[], T], what: str, *, seconds: float = REDIS_PATIENCE_SECONDS) -> T:
    """`call()`, tried again each second while Redis does not answer, for up to `seconds`; then its error. For a
    job's progress and its checks before it writes, which a Redis restarted under a long job would otherwise end (an
    attempt lost, and its work since its last checkpoint)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except REDIS_UNAVAILABLE as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s: Redis does not answer (%s); trying again", what, exc)
            time.sleep(1.0)


def cancel_unstarted(job: Job, then: Callable[[Job], object] | None = None) -> bool:
    """Take a job that no worker has started off its queue for good; True if this call ended it, False if it had
    started, or another call deleted it meanwhile (two calls at once may both end it: `then` must be safe to run
    twice). `then(job)`, given, runs once the job is off its queue and before it is deleted (recording what the job
    would have done): should it fail, the job stays cancelled in Redis, and a later call (a retried DELETE) runs
    `then` again and deletes it. The job is then deleted: RQ keeps a cancelled job, and its entry in the queue's
    cancelled registry, with no expiry (that registry is never cleaned), so every cancel would stay in Redis. A worker
    that took the job off the queue just before the cancel still runs it: the services' jobs check their record (a
    cancelled run, a cancelled dataset) before they do anything."""
    try:
        status = job.get_status()
        if status in NOT_STARTED:
            job.cancel()
        elif status != JobStatus.CANCELED:  # started or ended; a cancelled one is an interrupted call's, finished here
            return False
        if then is not None:
            then(job)
        job.delete(remove_from_queue=False)
    except InvalidJobOperation:  # gone meanwhile: RQ reads the status of a deleted job as an invalid operation
        return False
    return True


def connect_redis(redis_url: str) -> redis.Redis:
    """A Redis client with bounded waits: a lost Redis is an error, not a hang (an RQ worker raises the read timeout
    of its own connection above its blocking dequeue's)."""
    return redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30)


def redis_location(redis_url: str) -> str:
    """Where a Redis URL points, without what may be secret in it (a password before the host, whatever characters it
    holds, or in the query): `redis://:pw@redis:6379/0` is `redis://redis:6379/0`. For messages anyone may read."""
    scheme, _, rest = redis_url.partition("://")
    return f"{scheme}://{re.split(r'[?#]', rest.rpartition('@')[2])[0]}"


class JobProcessDied(RuntimeError):
    """The error a job's failure callback gets when the job's process died."""


def how_it_died(wait_status: int | None) -> str:
    """`os.waitpid`'s status of a job's process, in words; None when RQ killed it past the job's timeout."""
    if wait_status is None:
        return "was killed past the job's timeout"
    if os.WIFSIGNALED(wait_status):
        return f"was killed by signal {os.WTERMSIG(wait_status)}"
    return f"exited with status {os.waitstatus_to_exitcode(wait_status)}"


def started_elsewhere(job, connection: redis.Redis, worker_name: str | None) -> bool:
    """Whether another worker has started this job (and perhaps ended it) since `worker_name` ran it: its heartbeat
    lapsed while it stalled, and the job was handed on. The failure of `worker_name`'s run then says nothing of the
    job. False when the run's worker is unknown (`worker_name` None), and while the job waits to start again (no
    other run to defer to)."""
    if not worker_name:
        return False
    status, holder = connection.hmget(job.key, "status", "worker_name")
    waiting = status in (b"queued", b"scheduled", b"deferred")
    return not waiting and holder is not None and holder.decode() != worker_name


class JobProcessWorker(Worker):
    """RQ's forking worker whose job processes die with it, whose job's failure callback also runs when the job's
    process dies, whose late ending of a job handed on to another run leaves that job alone, and which, stopped while
    it works, hands its job back at once (`request_stop`)."""

    handing_back: bool = False  # set by `request_stop` while its job's work horse is being stopped

    def request_stop(self, signum, frame) -> None:
        """SIGTERM or Ctrl-C while a job runs: stop its work horse now and hand the job back to its queue, without
        spending a retry (a training run resumes from its last checkpoint, a curation job curates the problems it had
        not finished), where RQ's warm shutdown would wait for the job to end (a container's stop would kill it, and
        spend a retry, after its grace period). A second signal is RQ's cold shutdown; an idle worker just stops."""
        if self.get_state() != WorkerStatus.BUSY or not self.horse_pid:
            super().request_stop(signum, frame)
            return
        self.log.warning("Worker %s: stop requested; handing the running job back to its queue", self.name)
        self._shutdown_requested_date = now()
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        self._stop_requested = True  # the work loop ends after this job's failure is handled (retried: re-queued)
        self.handing_back = True
        self.kill_horse()

    def maintain_heartbeats(self, job, execution) -> None:
        """RQ's heartbeats while the job's process works, which a Redis briefly unreachable (a restart) no longer
        ends: RQ's error went out of the worker, its job's process died with it, and the job was retried from the
        start (a retry spent) or failed. The worker goes on waiting for its job and beats again at the next interval;
        should Redis stay away past the job's heartbeat TTL, another worker takes the job over once it is back, as
        from a stalled worker."""
        try:
            super().maintain_heartbeats(job, execution)
        except REDIS_UNAVAILABLE as exc:
            self.log.warning("Worker %s: no heartbeat for job %s (Redis unavailable: %s); the job goes on", self.name,
                             job.id, exc)

    def fork_work_horse(self, job, queue) -> None:
        self.worker_pid = os.getpid()  # read by the job's process, which the fork below starts
        super().fork_work_horse(job, queue)

    def main_work_horse(self, job, queue) -> None:
        die_with_parent(self.worker_pid)
        super().main_work_horse(job, queue)

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage) -> None:
        """The job's process died: its failure callback runs here (RQ's runs only for an exception in it). A job
        handed back by `request_stop` spends no retry (RQ's retry, which re-queues it, takes one): stopping workers,
        however often, never fails a job. A process that died on its own spends one, as any failure does."""
        if self.handing_back:
            job.retries_left = (job.retries_left or 0) + 1
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        job.worker_name = self.name  # this process's copy names the worker before this run (the horse set it there)
        died = JobProcessDied(f"the job's process {how_it_died(ret_val)}")
        try:
            execute_failure_callback(job, self.death_penalty_class, JobProcessDied, died, None)
        except Exception:  # RQ still has to retry or fail the job
            self.log.exception("Worker %s: the failure callback of job %s raised", self.name, job.id)

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None) -> None:
        if self.let_go(job, execution, "failed"):
            return
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def handle_job_success(self, job, queue, started_job_registry, execution) -> None:
        if self.let_go(job, execution, "finished"):
            return
        super().handle_job_success(job, queue, started_job_registry, execution)

    def let_go(self, job, execution, ending: str) -> bool:
        """True when this worker's run of the job was handed on: RQ's maintenance (another worker's) took its execution
        off the started registry once its heartbeat lapsed, and queued the job again. Its ending here then neither
        retries, fails nor finishes the job. An ending with no execution (RQ rescuing a job that never started), with
        this worker's execution still registered, or of a job still marked started by this worker is the job's own.
        (Should another worker's maintenance hand the job on between this check and the ending, RQ's own race, the
        job may be queued twice; every job is safe to run twice.)"""
        if execution is None:
            return False
        registry = StartedJobRegistry(job.origin, connection=self.connection, serializer=self.serializer)
        if self.connection.zscore(registry.key, execution.composite_key) is not None:
            return False
        # Gone from the registry but still started by this worker: removed as expired before this run marked the job
        # started (the worker froze in between), never handed on. Its ending is the job's own.
        status, holder = self.connection.hmget(job.key, "status", "worker_name")
        if status == b"started" and holder is not None and holder.decode() == self.name:
            return False
        if self._stopped_job_id == job.id:  # a stop asked for this run ends with it
            self._stopped_job_id = None
        self.log.warning("Worker %s: job %s %s here after it was handed on; left to its current run", self.name,
                         job.id, ending)
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.execute()
        return True
