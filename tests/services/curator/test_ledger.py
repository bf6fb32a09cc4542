"""The curator's ledger on a real Redis (database 9, a key prefix of its own, its keys and RQ's deleted afterwards):
final states are recorded once however often a job runs, the funnel always adds up, exactly one call finishes a
dataset, and a job's last failure is recorded however it failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from services.curator.ledger import DatasetLedger, DatasetMeta
from shared.curator_api import DatasetOptions, DatasetStatus
from tests.redis_server import delete_keys, redis_url

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def ledger():
    redis = Redis.from_url(redis_url(9))
    prefix = f"ssb-test-ledger-{uuid.uuid4().hex[:8]}"
    yield DatasetLedger(redis, prefix)
    delete_keys(redis, prefix)
    redis.close()


def new_dataset(ledger: DatasetLedger, problems: int) -> DatasetMeta:
    meta = DatasetMeta(id="ds-1", problems=problems, options=DatasetOptions(), created_at=1000.0)
    with ledger.redis.pipeline() as pipe:
        ledger.create(meta, ["job-0"], pipe)
        pipe.execute()
    return meta


def test_a_problem_is_counted_once_however_often_it_is_recorded(ledger):
    new_dataset(ledger, 3)
    assert ledger.status("ds-1").funnel.queued == 3
    ledger.mark_running("ds-1", ["a", "b"])
    status = ledger.status("ds-1")
    assert (status.state, status.funnel.running, status.funnel.queued) == ("running", 2, 1)
    assert ledger.record_final("ds-1", "a", "paired") is False
    ledger.record_final("ds-1", "a", "no_mix")  # a second run of the job: ignored
    ledger.mark_running("ds-1", ["a"])  # a retried job marking a finished problem again does not count it twice
    funnel = ledger.status("ds-1").funnel
    assert (funnel.paired, funnel.no_mix, funnel.running, funnel.queued) == (1, 0, 1, 1)
    assert ledger.record_final("ds-1", "b", "failed", "TeacherUnavailable: down") is False
    assert ledger.record_final("ds-1", "c", "explanation_wrong") is True  # the last one finishes the dataset
    assert ledger.record_final("ds-1", "c", "paired") is False  # ... once
    status = ledger.status("ds-1")
    assert status.state == "done" and status.funnel.finished == 3 and status.seconds_left == 0
    assert status.finished_at >= status.started_at  # stamped in the same step as the last final state
    assert [(f.problem_id, f.reason) for f in status.failures] == [("b", "TeacherUnavailable: down")]
    assert ledger.record_final("ds-2", "a", "paired") is False  # a dataset the ledger does not know never finishes


def test_a_pair_replaces_another_final_state_without_counting_twice(ledger):
    """As in the pair store, a pair wins: two runs of a problem at once that ended differently end it `paired`."""
    new_dataset(ledger, 2)
    ledger.mark_running("ds-1", ["a", "b"])
    assert ledger.record_final("ds-1", "a", "failed", "TeacherUnavailable: down") is False
    assert ledger.record_final("ds-1", "a", "paired") is False  # the other run's pair
    ledger.record_final("ds-1", "a", "no_mix")  # nothing replaces a pair
    status = ledger.status("ds-1")
    assert (status.funnel.paired, status.funnel.failed, status.funnel.no_mix, status.funnel.finished) == (1, 0, 0, 1)
    assert status.failures == [] and status.state == "running"
    assert ledger.record_final("ds-1", "b", "cancelled") is True  # the dataset finishes once, on its last problem
    assert ledger.record_final("ds-1", "b", "paired") is False
    status = ledger.status("ds-1")
    assert (status.funnel.paired, status.funnel.cancelled, status.funnel.finished) == (2, 0, 2)


def test_the_status_reads_kept_counts_and_recounts_what_an_earlier_version_recorded(ledger):
    """The status reads counts kept as problems end, not every problem's state; where they do not add up to the
    final states (problems recorded by a version that kept no counts, say a worker not yet upgraded), it counts the
    states one by one."""
    new_dataset(ledger, 5)
    ledger.record_final("ds-1", "a", "failed", "TeacherUnavailable: down")
    ledger.record_final("ds-1", "a", "paired")
    ledger.record_final("ds-1", "a", "paired")  # a pair over a pair moves nothing
    ledger.record_final("ds-1", "b", "no_mix")
    assert ledger.redis.hgetall(ledger.key("ds-1", "counts")) == {b"failed": b"0", b"paired": b"1", b"no_mix": b"1"}
    ledger.redis.hset(ledger.key("ds-1", "final"), "c", "failed")  # as an earlier version recorded it: no count
    ledger.record_final("ds-1", "c", "paired")  # its counts now say failed -1
    ledger.mark_running("ds-1", ["b", "d"])
    funnel = ledger.status("ds-1").funnel
    assert (funnel.paired, funnel.no_mix, funnel.failed, funnel.running, funnel.queued) == (2, 1, 0, 1, 1)


def test_a_status_lists_failures_from_a_bounded_read(ledger):
    """A status lists at most 100 failures: every one where there are no more, else 100 of them by id from one
    bounded read of the failures hash (a dataset of 100,000 problems may fail as many), while the funnel counts every
    one."""
    from services.curator.ledger import FAILURES_SCANNED, MAX_LISTED_FAILURES

    detail = "after 3 attempts: the teacher at http://teacher:8000 did not answer within 30 s"

    for failed in (MAX_LISTED_FAILURES, FAILURES_SCANNED * 20):
        ids = [f"p{i:05d}" for i in range(failed)]
        new_dataset(ledger, failed)
        with ledger.redis.pipeline() as pipe:  # as jobs record them, in bulk
            pipe.hset(ledger.key("ds-1", "final"), mapping=dict.fromkeys(ids, "failed"))
            pipe.hset(ledger.key("ds-1", "counts"), "failed", failed)
            # reasons past 64 bytes: Redis keeps even a small hash as a table then, which a scan reads by slots
            pipe.hset(ledger.key("ds-1", "failures"), mapping={i: f"TeacherUnavailable: {i} {detail}" for i in ids})
            pipe.execute()
        status = ledger.status("ds-1")
        listed = [f.problem_id for f in status.failures]
        assert status.funnel.failed == failed and len(listed) == MAX_LISTED_FAILURES
        assert listed == sorted(listed) and set(listed) <= set(ids)
        assert all(f.reason == f"TeacherUnavailable: {f.problem_id} {detail}" for f in status.failures)
        if failed == MAX_LISTED_FAILURES:
            assert listed == ids
        ledger.delete("ds-1")


def test_a_final_state_a_newer_worker_recorded_counts_as_finished(ledger):
    """During an upgrade a newer worker may end a problem in a drop reason this version does not know: the status
    counts it under its name, and the dataset still ends."""
    new_dataset(ledger, 2)
    ledger.record_final("ds-1", "a", "paired")
    with ledger.redis.pipeline() as pipe:  # as a newer worker records it
        pipe.hset(ledger.key("ds-1", "final"), "b", "explanation_of_a_newer_kind")
        pipe.hincrby(ledger.key("ds-1", "counts"), "explanation_of_a_newer_kind", 1)
        pipe.execute()
    status = ledger.status("ds-1")
    assert status.state == "done" and status.funnel.queued == 0 and status.funnel.finished == 2
    assert status.funnel.model_dump()["explanation_of_a_newer_kind"] == 1
    assert DatasetStatus.model_validate_json(status.model_dump_json()) == status  # as a client reads it


def test_unknown_states_and_datasets(ledger):
    new_dataset(ledger, 1)
    with pytest.raises(ValueError, match="unknown final state"):
        ledger.record_final("ds-1", "a", "done")
    assert ledger.status("ds-2") is None
    ledger.delete("ds-1")
    assert ledger.status("ds-1") is None and ledger.ids() == []


def test_the_last_failure_of_a_job_marks_its_unfinished_problems_failed(ledger, tmp_path, monkeypatch):
    """RQ's failure callback: a failure that will be retried records nothing; the last one marks each problem of the
    job that has no outcome in the store `failed` with the error, and records a stored outcome as it is."""
    from types import SimpleNamespace

    from services.curator.jobs import record_job_failure
    from shared.schemas import DroppedProblem
    from shared.storage import PairStore

    monkeypatch.setenv("SSB_KEY_PREFIX", ledger.prefix)
    monkeypatch.setenv("SSB_DATA_DIR", str(tmp_path))
    new_dataset(ledger, 3)
    PairStore(tmp_path / "datasets" / "ds-1").write_dropped(DroppedProblem(problem_id="a", reason="no_mix"))
    job = SimpleNamespace(should_retry=True, args=["ds-1", ["a", "b"]], worker_name=None, meta={"attempts": 4})
    record_job_failure(job, ledger.redis, TimeoutError, TimeoutError("the teacher did not answer"), None)
    assert ledger.final_states("ds-1") == {}
    job.should_retry = False
    record_job_failure(job, ledger.redis, TimeoutError, TimeoutError("the teacher did not answer"), None)
    assert ledger.final_states("ds-1") == {"a": "no_mix", "b": "failed"}
    (failure,) = ledger.status("ds-1").failures
    assert failure.problem_id == "b" and failure.reason.startswith("TimeoutError: the teacher did not answer (after 4")
    # The late failure of a run RQ has handed on to another worker (`shared.workers.started_elsewhere`) records nothing.
    job_key = f"{ledger.prefix}:rq-job"
    ledger.redis.hset(job_key, mapping={"status": "started", "worker_name": "worker-b"})
    late = SimpleNamespace(should_retry=False, args=["ds-1", ["c"]], key=job_key, worker_name="worker-a", meta={})
    record_job_failure(late, ledger.redis, TimeoutError, TimeoutError("the teacher did not answer"), None)
    assert ledger.final_states("ds-1") == {"a": "no_mix", "b": "failed"}


def test_a_job_whose_process_dies_on_its_last_attempt_marks_its_problems_failed(ledger, tmp_path):
    """RQ calls no failure callback when a job's process dies (the OOM killer, a signal): a real worker (`ssb worker
    curate`'s, in burst mode) whose job's process is killed on both attempts still finishes the dataset, each problem
    `failed` with how the process died, instead of leaving them `running` for ever."""
    from services.curator.service import CuratorService
    from services.curator.settings import CuratorSettings
    from shared.schemas import Problem

    url = redis_url(9)
    settings = CuratorSettings(redis_url=url, key_prefix=ledger.prefix, data_dir=tmp_path, job_retries=1)
    problems = [Problem(id="q1", question="2 + 2?", answer="4"), Problem(id="q2", question="3 + 3?", answer="6")]
    dataset = CuratorService(settings, ledger.redis).create_dataset(problems, DatasetOptions(), "killed").id
    worker = (
        "import os, signal\n"
        "import services.curator.jobs as jobs\n"
        "from services.curator.settings import CuratorSettings\n"
        "jobs.TeacherPool = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # dies mid-job\n"
        f"jobs.run_worker(CuratorSettings(), burst=True, name='{ledger.prefix}-worker')\n"
    )
    env = {
        **os.environ, "SSB_REDIS_URL": url, "SSB_KEY_PREFIX": ledger.prefix, "SSB_DATA_DIR": str(tmp_path),
        # Retries as the job was queued with (1), not as the worker is set (3): the failures say 2 attempts.
        "SSB_JOB_RETRIES": "3", "SSB_WORKER_HEARTBEAT_SECONDS": "1",
    }
    command = [sys.executable, "-c", worker]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (job_id,) = ledger.job_ids(dataset)
    job = Job.fetch(job_id, connection=ledger.redis, serializer=JSONSerializer)
    assert job.get_status() == "failed" and job.retries_left == 0  # both attempts ran, and died
    status = ledger.status(dataset)
    assert status.state == "done" and status.funnel.failed == 2 and status.finished_at, status
    assert {f.reason for f in status.failures} == {
        "JobProcessDied: the job's process was killed by signal 9 (after 2 attempts)"
    }


def test_cancelling_records_what_the_store_holds_and_starts_no_training(ledger, tmp_path, monkeypatch):
    """A problem whose result a previous run stored ends as stored, not `cancelled`, on both ways a cancel reaches
    it: `DELETE /v1/datasets/{id}` on a queued job, and a job that starts after it. A cancelled dataset sends no
    training request, whichever of them finishes it (the trainer's URL here would refuse the connection)."""
    from services.curator.jobs import curate_problems
    from services.curator.service import CuratorService
    from services.curator.settings import CuratorSettings
    from shared.schemas import DroppedProblem, Problem
    from shared.storage import PairStore

    url = redis_url(9)
    for name, value in {"SSB_REDIS_URL": url, "SSB_KEY_PREFIX": ledger.prefix, "SSB_DATA_DIR": str(tmp_path),
                        "SSB_TRAINER_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    service = CuratorService(CuratorSettings(), ledger.redis)
    problems = [Problem(id="q1", question="2 + 2?", answer="4"), Problem(id="q2", question="3 + 3?", answer="6")]
    options = DatasetOptions(train={"max_steps": 1})
    for cancel_before in (service.cancel, lambda dataset: ledger.cancel(dataset)):
        dataset = service.create_dataset(problems, options, "cancelled").id
        PairStore(tmp_path / "datasets" / dataset).write_dropped(DroppedProblem(problem_id="q1", reason="no_mix"))
        cancel_before(dataset)
        if cancel_before == service.cancel:  # its job cancelled, then deleted (RQ keeps a cancelled job for ever)
            assert Job.fetch_many(ledger.job_ids(dataset), connection=ledger.redis, serializer=JSONSerializer) == [None]
        curate_problems(dataset, ["q1", "q2"])  # a job that starts after the cancel (a no-op once all are final)
        status = ledger.status(dataset)
        assert ledger.final_states(dataset) == {"q1": "no_mix", "q2": "cancelled"}, cancel_before
        assert status.state == "cancelled" and status.finished_at, status
        assert status.training_run is None and status.training_error is None, status


def test_a_cancel_that_fails_midway_is_finished_by_the_next_one(ledger, tmp_path, monkeypatch):
    """Redis lost (or the API stopped) while a DELETE records a job's problems `cancelled`: the job stays cancelled
    in Redis, not deleted, so a DELETE sent again finds it and ends its problems (they stayed `queued` for ever, the
    dataset never finished)."""
    import redis

    from services.curator import service as service_module
    from services.curator.service import CuratorService
    from services.curator.settings import CuratorSettings
    from shared.schemas import Problem

    url = redis_url(9)
    for name, value in {"SSB_REDIS_URL": url, "SSB_KEY_PREFIX": ledger.prefix, "SSB_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    service = CuratorService(CuratorSettings(), ledger.redis)
    problems = [Problem(id="q1", question="2 + 2?", answer="4"), Problem(id="q2", question="3 + 3?", answer="6")]
    dataset = service.create_dataset(problems, DatasetOptions(batch_size=1), "cut short").id
    ended = service_module.end_problems

    def lost_on_the_second_job(settings, ledger_, meta, problem_ids, state, reason=None):
        if problem_ids == ["q2"]:
            raise redis.ConnectionError("Redis went away")
        ended(settings, ledger_, meta, problem_ids, state, reason)

    monkeypatch.setattr(service_module, "end_problems", lost_on_the_second_job)
    with pytest.raises(redis.ConnectionError):
        service.cancel(dataset)
    assert ledger.final_states(dataset) == {"q1": "cancelled"}
    monkeypatch.setattr(service_module, "end_problems", ended)
    status = service.cancel(dataset)  # the DELETE sent again
    assert ledger.final_states(dataset) == {"q1": "cancelled", "q2": "cancelled"}
    assert status.state == "cancelled" and status.finished_at and status.funnel.queued == 0, status
    assert Job.fetch_many(ledger.job_ids(dataset), connection=ledger.redis, serializer=JSONSerializer) == [None, None]


def test_a_job_failed_for_good_with_nothing_recorded_ends_its_problems_when_the_dataset_is_read(ledger, tmp_path,
                                                                                               monkeypatch):
    """RQ fails a job for good without its failure callback recording anything (the callback raised partway, or RQ
    failed a job whose worker died before starting it, which runs no callback): its problems stayed `queued` for
    ever. Reading the dataset ends them `failed` with the job's error, and the others stay as they are."""
    from rq import Queue, Worker

    from services.curator.service import CuratorService
    from services.curator.settings import CuratorSettings
    from shared.schemas import Problem

    for name, value in {"SSB_REDIS_URL": redis_url(9), "SSB_KEY_PREFIX": ledger.prefix,
                        "SSB_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    service = CuratorService(CuratorSettings(), ledger.redis)
    problems = [Problem(id="q1", question="2 + 2?", answer="4"), Problem(id="q2", question="3 + 3?", answer="6")]
    dataset = service.create_dataset(problems, DatasetOptions(batch_size=1), "failed quietly").id
    job, _ = Queue.dequeue_any([service.queue], timeout=None, connection=ledger.redis, serializer=JSONSerializer)
    job.retries_left = 0
    worker = Worker([service.queue], connection=ledger.redis, serializer=JSONSerializer,
                    name=f"{ledger.prefix}-quiet")
    worker.handle_job_failure(job, service.queue, exc_string="Traceback (most recent call last):\nOSError: stale")
    assert service.queue.failed_job_registry.get_job_ids() == [job.id]
    status = service.status(dataset)
    assert ledger.final_states(dataset) == {job.args[1][0]: "failed"}
    assert status.funnel.failed == 1 and status.funnel.queued == 1 and status.state != "done", status
    assert "OSError: stale" in " ".join(failure.reason for failure in status.failures), status
    assert service.status(dataset).funnel.failed == 1  # once


@pytest.mark.parametrize("status", [401, 403, 404, 409])
def test_a_refusal_of_the_deployment_fails_the_job_not_its_problems(tmp_path, status):
    """A teacher that refuses every request for what it is sent with, not what it holds (a key it no longer takes, an
    adapter it cannot find, no teacher behind a gateway mid-redeploy): the job raises, so RQ retries it with backoff,
    and no problem is failed for it (each was: the dataset finished early, all `failed`, and started its training).
    A refusal of what a request holds (400, 413, 422) still fails the problem alone."""
    from services.curator.jobs import curate_with_rejections
    from shared.schemas import Problem
    from shared.settings import CurationConfig
    from shared.storage import PairStore
    from shared.teacher_client import TeacherRejected

    class Refusing:
        model_name = "m"

        def __init__(self, status: int):
            self.status = status

        def rollouts_and_explanations(self, *args, **kwargs):
            raise TeacherRejected(self.status, "refused", None)

    problems = [Problem(id=f"q{i}", question=f"{i} + {i}?", answer=str(2 * i)) for i in range(3)]
    store = PairStore(tmp_path / "store")
    with pytest.raises(TeacherRejected):
        curate_with_rejections(problems, Refusing(status), store, CurationConfig())
    assert all(store.outcome(p.id) is None for p in problems)
    for content in (400, 413, 422):
        funnel, failures = curate_with_rejections(problems, Refusing(content), store, CurationConfig())
        assert sorted(failures) == ["q0", "q1", "q2"] and funnel.problems == 3


@contextmanager
def trainer_answering(*statuses: int):
    """A small HTTP server standing in for the trainer's `POST /v1/runs` (the real one answers the same request in
    tests/test_user_path.py): it answers each request with the next of `statuses` (the last one from then on),
    Retry-After 0 on a 429 or 503, and records what it is sent. Yields (its URL, what it received)."""
    received = []

    class Trainer(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["content-length"])))))
            status = statuses[min(len(received), len(statuses)) - 1]
            reply = json.dumps({"id": received[-1][1]["run_id"]} if status < 400 else {"error": "no"}).encode()
            self.send_response(status)
            if status in (429, 503):
                self.send_header("retry-after", "0")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trainer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        server.server_close()


def test_a_training_request_lost_with_its_job_is_sent_by_the_retried_job_once(ledger, tmp_path, monkeypatch):
    """The job that finished a dataset died before the trainer answered its training request: RQ runs the job again,
    which finds every problem final and sends the request, under the run id named after the dataset (the trainer
    starts one run for one id); once a run is recorded, further runs send nothing."""
    from services.curator.jobs import curate_problems
    from services.curator.service import CuratorService
    from services.curator.settings import CuratorSettings
    from shared.schemas import DroppedProblem, Problem
    from shared.storage import PairStore

    with trainer_answering(202) as (url, received):
        for name, value in {"SSB_REDIS_URL": redis_url(9), "SSB_KEY_PREFIX": ledger.prefix,
                            "SSB_DATA_DIR": str(tmp_path), "SSB_TRAINER_URL": url}.items():
            monkeypatch.setenv(name, value)
        service = CuratorService(CuratorSettings(), ledger.redis)
        problems = [Problem(id="q1", question="2 + 2?", answer="4"), Problem(id="q2", question="3 + 3?", answer="6")]
        dataset = service.create_dataset(problems, DatasetOptions(train={"max_steps": 1}), "lost request").id
        store = PairStore(tmp_path / "datasets" / dataset)
        for problem in problems:  # the first run of the job: both problems stored and recorded, then it died
            store.write_dropped(DroppedProblem(problem_id=problem.id, reason="no_mix"))
            ledger.record_final(dataset, problem.id, "no_mix")
        assert ledger.status(dataset).training_run is None and received == []
        curate_problems(dataset, ["q1", "q2"])  # RQ's retry of that job
        curate_problems(dataset, ["q1", "q2"])  # and another (a job handed back twice): nothing more is sent
    assert received == [("/v1/runs", {"max_steps": 1, "dataset_id": dataset, "run_id": f"{dataset}-train"})]
    assert ledger.status(dataset).training_run == f"{dataset}-train"


def test_a_training_request_the_trainer_cannot_take_yet_is_sent_again_and_a_refused_one_is_not(ledger, monkeypatch):
    """A trainer restarting (503), busy (429) or gone for a moment when a dataset finishes: the request goes again
    until it is taken, and the run is recorded. One it refuses (422) goes once, and the dataset records why, with
    what to do by hand. One it never takes is recorded after the last try."""
    from services.curator import jobs
    from services.curator.settings import CuratorSettings

    monkeypatch.setattr(jobs, "TRAINING_REQUEST_BACKOFF_SECONDS", 0.01)
    meta = new_dataset(ledger, 1).model_copy(update={"options": DatasetOptions(train={"max_steps": 1})})
    for statuses, tries in (((503, 429, 202), 3), ((422,), 1), ((503,), jobs.TRAINING_REQUEST_TRIES)):
        ledger.redis.hdel(ledger.key(meta.id, "stats"), "training_run", "training_error")
        with trainer_answering(*statuses) as (url, received):
            jobs.start_training(CuratorSettings(trainer_url=url, key_prefix=ledger.prefix), ledger, meta)
        assert len(received) == tries, statuses
        status = ledger.status(meta.id)
        if statuses[-1] == 202:
            assert status.training_run == "ds-1-train" and status.training_error is None, status
        else:
            assert status.training_run is None, status
            assert f"the trainer refused the request ({statuses[-1]})" in status.training_error, status
            assert "POST this training request to the trainer's /v1/runs with run_id 'ds-1-train'" in (
                status.training_error
            )
    closed = "http://127.0.0.1:9"  # nothing listens there: refused at once, every try
    jobs.start_training(CuratorSettings(trainer_url=closed, key_prefix=ledger.prefix), ledger, meta)
    error = ledger.status(meta.id).training_error
    assert error.startswith(f"the trainer at {closed} could not be reached ({jobs.TRAINING_REQUEST_TRIES} tries)")


def test_a_dataset_stored_with_options_this_version_refuses_is_left_out_not_a_500_for_all(ledger, tmp_path):
    """An earlier version stored options this one refuses (a rollout longer than the engine allows): the listing and
    `/metrics` go on with the other datasets; the dataset itself is reported unreadable, naming the value."""
    from services.curator.service import CuratorService
    from services.curator.settings import CuratorSettings
    from services.errors import ServiceError

    service = CuratorService(CuratorSettings(key_prefix=ledger.prefix, data_dir=tmp_path), ledger.redis)
    good = new_dataset(ledger, 2)
    old = DatasetMeta(id="ds-0123456789ab", problems=1, options=DatasetOptions(), created_at=999.0)
    stored = json.loads(old.model_dump_json())
    stored["options"]["rollout_max_tokens"] = 40_000
    ledger.redis.set(ledger.key(old.id), json.dumps(stored))
    ledger.redis.zadd(f"{ledger.prefix}:datasets", {old.id: old.created_at})
    assert [status.id for status in service.list_datasets().datasets] == [good.id]
    for call in (service.status, service.cancel):
        with pytest.raises(ServiceError) as refused:
            call(old.id)
        assert refused.value.status == 500 and refused.value.type == "unreadable_dataset"
        assert "options.rollout_max_tokens: Input should be less than or equal to 32768" in refused.value.message


def test_a_job_reads_only_its_own_problems_and_their_states(ledger, tmp_path, monkeypatch):
    """Each job's lines of the problems file are found by their byte span (text of any script, lines of any length),
    so a job's reads do not grow with the dataset; a job queued by an earlier version (no span) reads the whole
    file; a job asks the ledger for its own problems' states only."""
    from services.curator.jobs import dataset_problems
    from services.curator.service import CuratorService
    from services.curator.settings import CuratorSettings
    from shared.schemas import Problem

    for name, value in {"SSB_REDIS_URL": redis_url(9), "SSB_KEY_PREFIX": ledger.prefix,
                        "SSB_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    settings = CuratorSettings()
    service = CuratorService(settings, ledger.redis)
    questions = ["2 + 2?", "Combien font 3 × 3 ?", "2の3乗は?", "x" * 5000, "7 \u2028- 1?\r\nor 6?", "Σ of 1..4?", "1"]
    # Every problem of an upload has a source (`shared.datasets` names its file and line when the row does not).
    problems = [
        Problem(id=f"p{i}", question=q, answer=str(i), source=f"up.jsonl:{i + 1}") for i, q in enumerate(questions)
    ]
    dataset = service.create_dataset(problems, DatasetOptions(batch_size=3), "spans")
    jobs = Job.fetch_many(ledger.job_ids(dataset.id), connection=ledger.redis, serializer=JSONSerializer)
    batches = sorted((job.args for job in jobs), key=lambda args: args[2])
    assert [ids for _, ids, _ in batches] == [["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6"]]
    for _, ids, span in batches:
        assert dataset_problems(settings, dataset.id, ids, span) == [p for p in problems if p.id in ids]
        assert dataset_problems(settings, dataset.id, ids[::-1]) == [p for p in problems if p.id in ids][::-1]

    ledger.record_final(dataset.id, "p1", "no_mix")
    ledger.record_final(dataset.id, "p4", "failed", "the teacher refused the request")
    assert ledger.final_states(dataset.id, ["p0", "p1", "p2"]) == {"p1": "no_mix"}
    assert ledger.final_states(dataset.id, []) == {}
    assert ledger.final_states(dataset.id) == {"p1": "no_mix", "p4": "failed"}


def test_an_upload_whose_transaction_answer_was_lost_is_created_and_one_never_run_leaves_nothing(
    ledger, tmp_path, monkeypatch
):
    """The transaction that records a dataset and queues its jobs ran, but its answer never came back (the connection
    dropped): the dataset exists, queued once (the project's Redis clients send nothing again), its files stay, and
    the upload is answered as created. One that never ran removes the files it wrote, and the error goes on."""
    from redis import ConnectionError as RedisConnectionError
    from redis.client import Pipeline

    from services.curator.service import CuratorService
    from services.curator.settings import CuratorSettings
    from shared.schemas import Problem

    service = CuratorService(CuratorSettings(key_prefix=ledger.prefix, data_dir=tmp_path), ledger.redis)
    problems = [Problem(id="q1", question="2 + 2?", answer="4")]
    execute, transaction = Pipeline.execute, Pipeline._execute_transaction

    def ran_then_lost(pipe, *args, **kwargs):
        transaction(pipe, *args, **kwargs)
        raise RedisConnectionError("Connection reset by peer")

    monkeypatch.setattr(Pipeline, "_execute_transaction", ran_then_lost)
    created = service.create_dataset(problems, DatasetOptions(), "lost answer")
    monkeypatch.setattr(Pipeline, "_execute_transaction", transaction)
    assert (created.problems, created.jobs) == (1, 1)
    assert ledger.status(created.id).funnel.queued == 1 and len(ledger.job_ids(created.id)) == 1
    assert service.queue.get_job_ids() == ledger.job_ids(created.id)  # queued once
    assert (tmp_path / "datasets" / created.id / "problems.jsonl").is_file()

    def never_ran(pipe, *args, **kwargs):
        pipe.reset()
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(Pipeline, "execute", never_ran)
    with pytest.raises(RedisConnectionError):
        service.create_dataset(problems, DatasetOptions(), "never recorded")
    monkeypatch.setattr(Pipeline, "execute", execute)
    assert [path.name for path in (tmp_path / "datasets").iterdir()] == [created.id]
    assert [status.id for status in service.list_datasets().datasets] == [created.id]


def test_an_upload_sent_again_with_its_key_is_created_once_after_a_lost_answer_or_sent_twice_at_once(
    ledger, tmp_path, monkeypatch
):
    """An upload whose answer was lost while Redis could not say whether it was created (a 503), sent again with its
    Idempotency-Key, answers with the dataset the first made; two sent at once with one key make one dataset, the
    loser's files removed; the key with another upload is refused (422)."""
    from redis import ConnectionError as RedisConnectionError
    from redis.client import Pipeline

    from services.curator.service import CuratorService
    from services.curator.settings import CuratorSettings
    from services.errors import ServiceError
    from shared.schemas import Problem

    settings = CuratorSettings(key_prefix=ledger.prefix, data_dir=tmp_path)
    service = CuratorService(settings, ledger.redis)
    problems = [Problem(id="q1", question="2 + 2?", answer="4"), Problem(id="q2", question="3 + 3?", answer="6")]
    transaction = Pipeline._execute_transaction

    def ran_then_lost(pipe, *args, **kwargs):
        transaction(pipe, *args, **kwargs)
        raise RedisConnectionError("Connection reset by peer")

    monkeypatch.setattr(Pipeline, "_execute_transaction", ran_then_lost)
    monkeypatch.setattr(service, "recorded", lambda dataset_id: None)  # Redis cannot say: the route answers 503
    with pytest.raises(RedisConnectionError):
        service.create_dataset(problems, DatasetOptions(), "lost", idempotency_key="k-1")
    monkeypatch.undo()
    created = service.create_dataset(problems, DatasetOptions(), "lost", idempotency_key="k-1")
    assert [status.id for status in service.list_datasets().datasets] == [created.id]
    assert service.queue.get_job_ids() == ledger.job_ids(created.id) and (created.problems, created.jobs) == (2, 1)
    with pytest.raises(ServiceError, match="came with another upload") as refused:
        service.create_dataset(problems[:1], DatasetOptions(), "lost", idempotency_key="k-1")
    assert refused.value.status == 422

    # Sent twice at once: the other request records the key between this one's WATCH and its transaction.
    other = CuratorService(settings, ledger.redis)
    enqueue_many = service.queue.enqueue_many
    answered = []

    def the_other_request_first(job_data, pipeline):
        answered.append(other.create_dataset(problems, DatasetOptions(), "twice", idempotency_key="k-2"))
        return enqueue_many(job_data, pipeline=pipeline)

    monkeypatch.setattr(service.queue, "enqueue_many", the_other_request_first)
    assert service.create_dataset(problems, DatasetOptions(), "twice", idempotency_key="k-2") == answered[0]
    listed = [status.id for status in service.list_datasets().datasets]
    assert sorted(listed) == sorted([created.id, answered[0].id])
    assert sorted(path.name for path in (tmp_path / "datasets").iterdir()) == sorted(listed)
    assert sorted(service.queue.get_job_ids()) == sorted(ledger.job_ids(created.id) + ledger.job_ids(answered[0].id))
    monkeypatch.undo()

    # The answer lost while the key was watched: redis-py says so with a WatchError, which is no other request's.
    def ran_then_lost_while_watching(pipe, *args, **kwargs):
        transaction(pipe, *args, **kwargs)
        pipe.watching = True  # redis-py clears it only once EXEC's answer is read
        raise RedisConnectionError("Connection reset by peer")

    monkeypatch.setattr(Pipeline, "_execute_transaction", ran_then_lost_while_watching)
    lost = service.create_dataset(problems, DatasetOptions(), "watched", idempotency_key="k-3")
    monkeypatch.undo()
    assert (tmp_path / "datasets" / lost.id / "problems.jsonl").is_file()
    assert service.create_dataset(problems, DatasetOptions(), "watched", idempotency_key="k-3") == lost
    assert len(service.list_datasets().datasets) == 3 and ledger.status(lost.id).funnel.queued == 2


def test_a_result_an_overlapping_run_stored_replaces_failed_or_cancelled_and_a_late_failure_lists_nothing(ledger):
    """A job run on after its worker stalled (its job failed or cancelled meanwhile) stores a drop: the ledger says
    what the pair store holds, as it does for a pair. A failure recorded after a stored result changes nothing and is
    not listed among the failures."""
    new_dataset(ledger, 3)
    ledger.record_final("ds-1", "a", "failed", "the worker died")
    ledger.record_final("ds-1", "b", "cancelled")
    ledger.record_final("ds-1", "c", "paired")
    ledger.record_final("ds-1", "a", "no_mix")  # stored by the run that went on
    ledger.record_final("ds-1", "b", "explanation_wrong")
    ledger.record_final("ds-1", "c", "failed", "a late failure")
    ledger.record_final("ds-1", "a", "cancelled")  # nor does a stored drop give way
    assert ledger.final_states("ds-1") == {"a": "no_mix", "b": "explanation_wrong", "c": "paired"}
    status = ledger.status("ds-1")
    funnel = status.funnel
    assert (funnel.no_mix, funnel.explanation_wrong, funnel.paired, funnel.failed, funnel.cancelled) == (1, 1, 1, 0, 0)
    assert status.failures == [] and status.state == "done", status
