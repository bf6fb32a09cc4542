"""A stalled worker's late ending of a job handed on to another run (shared/workers.py), through RQ's own bookkeeping
on a real Redis: the job is neither queued twice, failed, nor finished on the stale run's behalf, and its failure
callback records nothing; the run RQ counts as current still ends the job as RQ would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from redis import ConnectionError as RedisConnectionError
from redis import Redis
from rq import Callback, Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.workers import JobProcessWorker, cancel_unstarted, redis_location, started_elsewhere, through_redis_restarts
from tests.processes import kill_leftovers
from tests.redis_server import delete_keys, redis_url, run_redis_server, stop_session_redis

REDIS_URL = redis_url(12)


@pytest.fixture
def queue():
    connection = Redis.from_url(REDIS_URL)
    prefix = f"ssb-test-workers-{uuid.uuid4().hex[:8]}"
    yield Queue(prefix, connection=connection, serializer=JSONSerializer)
    delete_keys(connection, prefix)
    connection.close()


def worker(queue: Queue, name: str) -> JobProcessWorker:
    name = f"{queue.name}-{name}"
    return JobProcessWorker([queue], connection=queue.connection, serializer=JSONSerializer, name=name)


def start(worker: JobProcessWorker, queue: Queue):
    """What RQ does when a worker takes a job: off the queue, an execution registered, the job marked as its."""
    job, _ = Queue.dequeue_any([queue], timeout=None, connection=queue.connection, serializer=JSONSerializer)
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    return job, execution


def abandon(queue: Queue) -> None:
    """What any worker's maintenance does once a run's heartbeat has lapsed: the job goes back on its queue."""
    queue.started_job_registry.cleanup(timestamp=2**40)


def stored(job: Job) -> Job:
    return Job.fetch(job.id, connection=job.connection, serializer=JSONSerializer)


def test_a_late_ending_of_a_job_handed_on_leaves_it_to_its_current_run(queue):
    queue.enqueue("builtins.len", [1], job_id=f"{queue.name}-job", retry=Retry(max=3))
    stalled, other = worker(queue, "stalled"), worker(queue, "other")
    late_job, late_execution = start(stalled, queue)

    abandon(queue)  # the stalled worker's heartbeat lapsed: queued again, one retry spent
    assert queue.count == 1 and stored(late_job).retries_left == 2
    assert not started_elsewhere(late_job, queue.connection, stalled.name)  # no other run yet
    stalled.handle_job_failure(late_job, queue, exc_string="late", execution=late_execution)
    assert queue.count == 1 and stored(late_job).retries_left == 2  # not queued a second time

    job, execution = start(other, queue)  # taken over
    assert started_elsewhere(late_job, queue.connection, stalled.name)
    assert not started_elsewhere(job, queue.connection, other.name)
    stalled._stopped_job_id = late_job.id  # a stop asked for the late run (`rq job stop`) ends with it
    stalled.handle_job_failure(late_job, queue, exc_string="late", execution=late_execution)
    assert stalled._stopped_job_id is None
    stalled.handle_job_success(late_job, queue, queue.started_job_registry, late_execution)
    now = stored(job)
    assert (now.get_status(), now.worker_name, now.retries_left, queue.count) == ("started", other.name, 2, 0)
    assert [e.id for e in now.get_executions()] == [execution.id]

    other.handle_job_failure(job, queue, exc_string="the current run failed", execution=execution)
    assert queue.count == 1 and stored(job).retries_left == 1  # RQ's own retry, as ever


def test_rqs_own_rescues_of_a_job_that_never_started_still_retry_it(queue):
    """A job left in the queue's intermediate list (its worker died between taking it and starting it), which RQ's
    maintenance fails with no execution; and a job whose process died before marking it started, failed by its
    worker with its execution still registered: both retried as RQ would."""
    queue.enqueue("builtins.len", [1], job_id=f"{queue.name}-job", retry=Retry(max=3))
    rescuer = worker(queue, "rescuer")
    stuck, _ = Queue.dequeue_any([queue], timeout=None, connection=queue.connection, serializer=JSONSerializer)
    rescuer.handle_job_failure(stuck, queue, exc_string="Job was stuck in intermediate queue.")
    assert queue.count == 1 and stored(stuck).retries_left == 2

    taker = worker(queue, "taker")
    job, _ = Queue.dequeue_any([queue], timeout=None, connection=queue.connection, serializer=JSONSerializer)
    execution = taker.prepare_execution(job)  # then its process died before `prepare_job_execution`
    assert stored(job).get_status() == "queued"
    taker.handle_job_failure(job, queue, exc_string="Work-horse terminated unexpectedly", execution=execution)
    assert queue.count == 1 and stored(job).retries_left == 1


def test_a_run_whose_registry_entry_expired_before_it_started_the_job_still_ends_it(queue):
    """The worker froze between registering its run and marking the job started, long enough for another worker's
    maintenance to drop the expired entry (RQ leaves a job not yet started where it is): the job was never handed
    on, and this run's ending is the job's own."""
    queue.enqueue("builtins.len", [1], job_id=f"{queue.name}-job", retry=Retry(max=3))
    frozen = worker(queue, "frozen")
    job, _ = Queue.dequeue_any([queue], timeout=None, connection=queue.connection, serializer=JSONSerializer)
    execution = frozen.prepare_execution(job)
    abandon(queue)
    assert queue.count == 0 and queue.started_job_registry.get_job_ids() == []
    frozen.prepare_job_execution(job)  # it wakes, and its run goes on
    frozen.handle_job_failure(job, queue, exc_string="the run failed", execution=execution)
    assert queue.count == 1 and stored(job).retries_left == 2


def remember_failure(job, connection, exc_type, exc_value, traceback) -> None:
    """A job's failure callback: which worker's run of it failed."""
    connection.rpush(f"{job.origin}:failures", job.worker_name or "")


def test_the_failure_callback_of_a_dead_job_process_names_the_worker_that_ran_it(queue):
    """The worker's copy of the job was read before this run began (it names the previous run's worker); the
    callback, which may compare it with the job's current worker (`started_elsewhere`), sees this run's."""
    queue.enqueue("builtins.len", [1], job_id=f"{queue.name}-job", retry=Retry(max=3),
                  on_failure=Callback(remember_failure))
    job, _ = start(worker(queue, "first"), queue)
    abandon(queue)  # RQ runs the callback of an abandoned job itself, with the job as stored
    second = worker(queue, "second")
    job, _ = start(second, queue)
    job.worker_name = worker(queue, "first").name  # as the worker process read it, before its work horse started
    second.handle_work_horse_killed(job, 1, signal.SIGKILL, None)  # the wait status of a process killed by SIGKILL
    names = [name.decode() for name in queue.connection.lrange(f"{queue.name}:failures", 0, -1)]
    assert names == [f"{queue.name}-first", f"{queue.name}-second"]


def test_a_job_cancelled_before_it_starts_leaves_nothing_in_redis_and_two_cancels_at_once_agree(queue):
    """`cancel_unstarted`: the job leaves its queue and is deleted, registry entry and all (RQ would keep a cancelled
    job for ever); a second cancel holding the same job, fetched before the first deleted it, says False, and a job a
    worker has started is not cancelled."""
    connection = queue.connection
    job = queue.enqueue("builtins.print", "never printed", job_id=f"{queue.name}-a")
    same = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    assert cancel_unstarted(job) is True
    assert cancel_unstarted(same) is False
    assert queue.get_job_ids() == [] and queue.canceled_job_registry.get_job_ids() == []
    assert not connection.exists(job.key)

    queue.enqueue("builtins.print", "started", job_id=f"{queue.name}-b")
    started, _ = start(worker(queue, "w"), queue)
    assert cancel_unstarted(started) is False and started.get_status() == "started"


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://redis:6379/0"),
        ("rediss://user:s3cret@10.0.0.5:6380/2?password=s3cret", "rediss://10.0.0.5:6380/2"),
        ("redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379/1"),
        ("unix:///run/redis.sock?db=3&password=s3cret", "unix:///run/redis.sock"),
        ("redis://:pa/ss?w#rd@redis:6379/0", "redis://redis:6379/0"),
    ],
)
def test_a_redis_location_holds_no_password(url, location):
    assert redis_location(url) == location


WORKER = """
import sys
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer
from shared.workers import JobProcessWorker
connection = Redis.from_url(sys.argv[1])
queue = Queue("restart", connection=connection, serializer=JSONSerializer)
worker = JobProcessWorker([queue], connection=connection, serializer=JSONSerializer, job_monitoring_interval=1)
worker.work(burst=True)
"""


def test_a_busy_workers_job_goes_on_through_a_redis_restart(tmp_path):
    """Redis stops for a few seconds (a restart) while a worker's job runs: the worker's heartbeats fail
    meanwhile, and it still waits for its job, which ends finished with no retry spent (RQ's heartbeat raised out of
    the worker, whose job process died with it: the job failed, or was retried from the start)."""
    from cli.supervisor import free_port

    port = free_port()
    server = run_redis_server(port, str(tmp_path), appendonly=True)
    if server is None:
        pytest.skip("no redis-server")
    worker_process = None
    try:
        connection = Redis.from_url(server.url)
        queue = Queue("restart", connection=connection, serializer=JSONSerializer)
        job = queue.enqueue("time.sleep", 8, job_id="restart-job", retry=Retry(max=2))
        worker_process = subprocess.Popen([sys.executable, "-c", WORKER, server.url],
                                          cwd=Path(__file__).resolve().parents[2], env={**os.environ})
        deadline = time.monotonic() + 60
        while stored(job).get_status() != "started":
            assert time.monotonic() < deadline and worker_process.poll() is None, "the worker never started the job"
            time.sleep(0.1)
        stop_session_redis(server, keep_files=True)
        time.sleep(3)  # three heartbeats missed
        server = run_redis_server(port, str(tmp_path), appendonly=True)
        assert server is not None, "redis-server did not start again"
        assert worker_process.wait(timeout=60) == 0
        ended = stored(job)
        assert ended.get_status() == "finished" and ended.retries_left == 2
    finally:
        if worker_process is not None and worker_process.poll() is None:  # failed: the worker and its job's process
            worker = psutil.Process(worker_process.pid)
            kill_leftovers([worker, *worker.children(recursive=True)], timeout=0)
            worker_process.wait()
        stop_session_redis(server)


def test_a_jobs_call_to_redis_waits_out_a_restart_and_gives_up_after_its_patience(tmp_path):
    """A training attempt's progress and its checks before writing go through a Redis restart (they ended the
    attempt, losing its steps since the last checkpoint); a Redis that stays away is still an error, once the
    patience given is spent. The call waits in a thread; Redis restarts from this one (a server started from a thread
    that ends would end with it: it dies with its parent)."""
    from cli.supervisor import free_port

    port = free_port()
    server = run_redis_server(port, str(tmp_path), appendonly=True)
    if server is None:
        pytest.skip("no redis-server")
    connection = Redis.from_url(server.url, socket_connect_timeout=1)
    try:
        connection.set("kept", "1")
        stop_session_redis(server, keep_files=True)
        answered = []

        def wait_for_redis() -> None:
            answered.append(through_redis_restarts(lambda: connection.get("kept"), "a test", seconds=60))

        waiting = threading.Thread(target=wait_for_redis, daemon=True)
        waiting.start()
        time.sleep(3)
        assert waiting.is_alive() and not answered
        server = run_redis_server(port, str(tmp_path), appendonly=True)
        assert server is not None, f"redis-server did not start again on port {port}"
        waiting.join(timeout=60)
        assert answered == [b"1"]
        stop_session_redis(server, keep_files=True)
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            through_redis_restarts(lambda: connection.get("kept"), "a test", seconds=2)
        assert time.monotonic() - started < 30
    finally:
        connection.close()
        stop_session_redis(server)
