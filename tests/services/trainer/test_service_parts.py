"""The trainer service's parts without processes, in milliseconds: records in real Redis (a throwaway database and key
prefix, deleted after), a run request's training settings, the curator's dataset metadata, the streamed adapter
archive, and the worker's heartbeat and maintenance timing."""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import pytest
import redis

from services.trainer.records import run_records
from services.trainer.schemas import EvalRequest, RunRequest, run_eval_id
from services.trainer.service import rollout_adapter_of, stream_tar_gz
from shared.workers import connect_redis
from tests.redis_server import redis_url

REDIS_URL = redis_url(13)


@pytest.fixture
def runs():
    connection = connect_redis(REDIS_URL)
    records = run_records(connection, f"test-parts-{uuid.uuid4().hex[:8]}")
    try:
        connection.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    yield records
    records.delete_all()
    connection.close()


def test_a_record_is_created_once_and_a_final_state_stays(runs):
    assert runs.create("r1", {"status": "queued", "step": 0})
    assert not runs.create("r1", {"status": "running", "step": 9})  # a second creation writes nothing
    assert runs.get("r1")["status"] == "queued" and runs.get("r1")["step"] == 0
    assert runs.increment("r1", "attempts") == 1 and runs.increment("r1", "attempts") == 2
    assert runs.advance("r1", status="running", step=3)
    runs.update("r1", status="succeeded")
    assert not runs.advance("r1", status="running", step=1)  # a late or repeated write cannot undo the end
    record = runs.get("r1")
    assert record["status"] == "succeeded" and record["step"] == 3 and record["attempts"] == 2
    assert runs.ids() == ["r1"] and runs.get("r2") is None


def test_an_id_this_service_never_gives_names_no_record(runs):
    """A client's id reaches Redis only as a record's id: one naming another kind of key under the prefix (a run's
    requeue guard, a string) is no record, not a WRONGTYPE error (a 500)."""
    assert runs.create("r1", {"status": "queued"})
    runs.redis.set(f"{runs.key('r1')}:requeued:1", 1)
    for record_id in ("r1:requeued:1", "r1:", ":r1", "r1\n", "-r1", "x" * 129):
        assert runs.get(record_id) is None, record_id
    assert runs.get("r1")["status"] == "queued" and runs.get(f"{'x' * 64}-eval") is None
    runs.redis.delete(f"{runs.key('r1')}:requeued:1")


def test_an_attempt_writes_the_record_only_while_it_is_the_latest(runs):
    assert runs.create("r1", {"status": "queued", "step": 0, "attempts": 0})
    first = runs.increment("r1", "attempts")
    assert runs.advance("r1", attempt=first, status="running", step=1)
    second = runs.increment("r1", "attempts")  # a worker lost its heartbeat; another took the job over
    assert not runs.advance("r1", attempt=first, step=7)  # the first attempt, still going, writes nothing now
    assert not runs.advance("r1", attempt=first)  # which it can also ask without writing
    assert runs.advance("r1", attempt=second, step=2) and runs.advance("r1", step=3)  # no attempt: any writer
    assert runs.get("r1")["step"] == 3


def test_a_run_request_holds_training_settings_and_defaults_fill_only_unset_ones():
    request = RunRequest(dataset_id="d", lr=1e-4, checkpoint_every=5, temperature=1.0)
    config = request.train_config(checkpoint_every=50, keep_checkpoints=3)
    assert config.lr == 1e-4 and config.checkpoint_every == 5 and config.keep_checkpoints == 3
    assert config.teacher == "stored"  # auto resolved at T = 1
    assert RunRequest(pairs_dir="p").train_config(checkpoint_every=50).checkpoint_every == 50
    for bad in ({}, {"dataset_id": "d", "pairs_dir": "p"}, {"dataset_id": "d", "rank": 0}, {"dataset_id": "../x"}):
        with pytest.raises(ValueError):
            RunRequest(**bad)


def test_a_datasets_own_run_id_is_only_for_a_request_on_that_dataset():
    """`<dataset id>-train` is the run a curator's dataset starts when it finishes: another request taking the name
    first would make that dataset's training fail and put its own weights under the dataset's name."""
    own = "ds-0123456789ab-train"
    assert RunRequest(dataset_id="ds-0123456789ab", run_id=own).run_id == own
    for other in ({"dataset_id": "ds-ba9876543210"}, {"pairs_dir": "datasets/ds-0123456789ab"}):
        with pytest.raises(ValueError, match="the name dataset ds-0123456789ab gives its own run"):
            RunRequest(**other, run_id=own)
    assert RunRequest(pairs_dir="p", run_id="ds-0123-train").run_id == "ds-0123-train"  # not a curator's dataset id


def test_an_evaluation_id_a_run_gives_its_own_is_refused_to_clients():
    """`<run id>-eval` is the evaluation a run queues after itself: a client taking it first would have the run's
    evaluation refused (other settings) or answered by the client's own."""
    with pytest.raises(ValueError, match="name the evaluation a run queues after itself"):
        EvalRequest(benchmark="gsm8k", eval_id=run_eval_id("r1"))
    assert EvalRequest(benchmark="gsm8k", eval_id="r1-evaluation").eval_id == "r1-evaluation"


def test_the_rollout_adapter_comes_from_the_curators_dataset_metadata(tmp_path):
    assert rollout_adapter_of(tmp_path) is None
    (tmp_path / "dataset.json").write_text(json.dumps({"id": "d", "options": {"rollout_adapter": "run-1"}}))
    assert rollout_adapter_of(tmp_path) == "run-1"
    (tmp_path / "dataset.json").write_text(json.dumps({"options": {"rollout_adapter": None}}))
    assert rollout_adapter_of(tmp_path) is None
    (tmp_path / "dataset.json").write_text("not json")
    assert rollout_adapter_of(tmp_path) is None


def test_the_adapter_archive_streams_the_adapters_files_and_nothing_else(tmp_path):
    from services.trainer.jobs import PUBLISHED_BY
    from services.trainer.service import ADAPTER_FILES

    adapter = tmp_path / "run-1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, several chunks
    (adapter / PUBLISHED_BY).write_text('{"key_prefix": "deployment"}')  # the service's own note: not archived
    chunks = list(stream_tar_gz(adapter, "run-1", ADAPTER_FILES, chunk_size=4096))
    assert len(chunks) > 1
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["run-1/adapter_config.json", "run-1/adapter_model.safetensors"]
        assert tar.extractfile("run-1/adapter_model.safetensors").read() == bytes(range(256)) * 4096
    stream = stream_tar_gz(adapter, "run-1", ADAPTER_FILES, chunk_size=16)
    next(stream)
    stream.close()  # a client that goes away: the producer thread stops on the closed pipe


def test_a_worker_counts_a_job_abandoned_after_three_heartbeats_and_looks_every_maintenance_interval():
    from rq.job import Job

    from services.trainer.queues import make_worker
    from services.trainer.settings import TrainerSettings

    settings = TrainerSettings(
        redis_url=REDIS_URL, key_prefix=f"test-parts-{uuid.uuid4().hex[:8]}", worker_heartbeat_seconds=2,
        maintenance_interval_seconds=7,
    )
    connection = connect_redis(REDIS_URL)
    worker = make_worker(settings, ("train", "eval"), connection)
    job = Job.create("services.trainer.jobs.train_run", args=("r",), connection=connection, timeout=86_400)
    assert worker.get_heartbeat_ttl(job) == 6  # RQ's own: min(timeout left, monitoring interval) + 60
    assert worker.job_monitoring_interval == 2 and worker.maintenance_interval == 7
    assert worker.dequeue_timeout == 7  # an idle worker runs maintenance between waits this long
    assert worker.queue_names() == [f"{settings.key_prefix}:train", f"{settings.key_prefix}:eval"]
    connection.close()


def nap(seconds: float) -> None:
    """A job that only takes time (the busy worker's job below)."""
    import time

    time.sleep(seconds)


@pytest.fixture(params=["train", "curate"])
def busy_worker(request):
    """A real worker process, the trainer's or the curator's (both `JobProcessWorker`s), whose job (a 120 s nap, on
    its last attempt: `Retry(max=1)` with none left) has started: yields (worker, its work horse's process and its
    own, the job, the queue); stops and cleans up."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil
    from rq import Retry

    from services.trainer.queues import open_queue
    from services.trainer.settings import TrainerSettings
    from tests.redis_server import delete_keys

    key_prefix = f"test-parts-{uuid.uuid4().hex[:8]}"
    settings = TrainerSettings(redis_url=REDIS_URL, key_prefix=key_prefix)
    connection = connect_redis(REDIS_URL)
    env = {**os.environ, "SSB_REDIS_URL": REDIS_URL, "SSB_KEY_PREFIX": key_prefix, "SSB_WORKER_HEARTBEAT_SECONDS": "1"}
    if request.param == "train":
        code = (
            "from services.trainer.queues import make_worker; from shared.workers import connect_redis; "
            "from services.trainer.settings import TrainerSettings; s = TrainerSettings(); "
            "make_worker(s, ('train',), connect_redis(s.redis_url)).work()"
        )
    else:
        code = "from services.curator.jobs import run_worker; from services.curator.settings import CuratorSettings; " \
               "run_worker(CuratorSettings())"
    family = []
    try:
        if request.param == "train":
            queue = open_queue(settings, "train", connection)
        else:
            from services.curator.jobs import curation_queue
            from services.curator.settings import CuratorSettings

            queue = curation_queue(CuratorSettings(redis_url=REDIS_URL, key_prefix=key_prefix), connection)
        # The job id carries the prefix, so `delete_keys` removes the job's own keys too.
        job = queue.enqueue(f"{__name__}.nap", 120, retry=Retry(max=1), job_timeout=300, job_id=f"{key_prefix}-nap")
        job.retries_left = 0  # its last attempt
        job.save()
        worker = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[3],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        family = [psutil.Process(worker.pid)]
        deadline = time.monotonic() + 60
        while job.get_status() != "started":
            assert time.monotonic() < deadline and worker.poll() is None, "the job never started"
            time.sleep(0.1)
        family += psutil.Process(worker.pid).children(recursive=True)
        assert len(family) == (2 if request.param == "train" else 3), family  # the worker, its work horse (and the
        # curator's scheduler process: its worker runs RQ's scheduler for the retries' delays)
        yield worker, family, job, queue
    finally:
        for process in family:
            if process.is_running():
                process.kill()
        delete_keys(connection, key_prefix)
        connection.close()


def test_stopping_a_busy_worker_hands_its_job_back_at_once(busy_worker):
    """SIGTERM to a worker whose job runs: its work horse stops now and the job is queued again, where RQ's warm
    shutdown would wait for the job (a training run) to end. Handing back spends no retry: a job on its last one is
    handed back, not failed."""
    import signal
    import time

    import psutil
    from rq.job import Job

    worker, family, job, queue = busy_worker
    stopped_at = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=20)
    assert time.monotonic() - stopped_at < 10
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, alive
    job = Job.fetch(job.id, connection=queue.connection, serializer=queue.serializer)
    assert job.get_status() == "queued" and job.retries_left == 0 and job.id in queue.get_job_ids()


# The trainer's worker only: the curator's also runs RQ's scheduler in a process of its own, which outlives a killed
# worker (RQ gives it no parent-death signal; a container's end takes it along).
@pytest.mark.parametrize("busy_worker", ["train"], indirect=True)
def test_a_killed_workers_job_process_dies_with_it(busy_worker):
    """SIGKILL to a worker whose job runs (the OOM killer, a lost container): its work horse dies too, instead of
    running on beside the worker that takes the job over once the heartbeat lapses."""
    import signal

    import psutil

    worker, family, _, _ = busy_worker
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    _, alive = psutil.wait_procs(family[1:], timeout=10)
    assert not alive, f"the job's process outlived its worker: {alive}"


def test_the_failure_of_an_attempt_taken_over_by_another_worker_is_not_recorded(runs, monkeypatch):
    """RQ's failure callback for an attempt whose worker lost the run to another (its heartbeat lapsed): the run,
    now the other worker's, is left as it is; the failure of the latest attempt is recorded as always."""
    from types import SimpleNamespace

    from services.trainer import jobs
    from services.trainer.settings import TrainerSettings

    monkeypatch.setattr(jobs, "_settings", TrainerSettings(redis_url=REDIS_URL, key_prefix=runs.prefix))
    runs.create("r1", {"status": "running", "step": 4, "attempts": 2, "worker": "worker-b"})
    stale = SimpleNamespace(args=("r1",), worker_name="worker-a", retries_left=0)
    jobs.on_train_failure(stale, runs.redis, RuntimeError, RuntimeError("out of memory"), None)
    assert runs.get("r1")["status"] == "running" and runs.get("r1").get("error") is None
    latest = SimpleNamespace(args=("r1",), worker_name="worker-b", retries_left=0)
    jobs.on_train_failure(latest, runs.redis, RuntimeError, RuntimeError("out of memory"), None)
    assert runs.get("r1")["status"] == "failed" and "out of memory" in runs.get("r1")["error"]


def test_the_late_failure_of_an_evaluation_another_worker_took_up_is_not_recorded(runs, monkeypatch):
    """An evaluation's job that another worker has started since the failing run began (RQ handed it on when the
    failing run's heartbeat lapsed): its record is the current run's (`shared.workers.started_elsewhere`)."""
    from types import SimpleNamespace

    from services.trainer import jobs
    from services.trainer.records import eval_records
    from services.trainer.settings import TrainerSettings

    monkeypatch.setattr(jobs, "_settings", TrainerSettings(redis_url=REDIS_URL, key_prefix=runs.prefix))
    evals = eval_records(runs.redis, runs.prefix)
    evals.create("e1", {"status": "running", "attempts": 2})
    job_key = f"{runs.prefix}:rq-job"
    runs.redis.hset(job_key, mapping={"status": "started", "worker_name": "worker-b"})
    try:
        late = SimpleNamespace(args=("e1",), key=job_key, worker_name="worker-a", retries_left=0)
        jobs.on_eval_failure(late, runs.redis, RuntimeError, RuntimeError("teacher gone"), None)
        assert evals.get("e1")["status"] == "running" and evals.get("e1").get("error") is None
        current = SimpleNamespace(args=("e1",), key=job_key, worker_name="worker-b", retries_left=0)
        jobs.on_eval_failure(current, runs.redis, RuntimeError, RuntimeError("teacher gone"), None)
        assert evals.get("e1")["status"] == "failed" and "teacher gone" in evals.get("e1")["error"]
    finally:
        evals.delete_all()
        runs.redis.delete(job_key)


def test_the_evaluation_of_a_run_that_failed_fails_saying_so(runs, monkeypatch):
    """A run's evaluation is queued just before the run is marked succeeded: a worker killed between the two leaves it
    queued for a run that then fails. It fails at once, naming the run, instead of evaluating an adapter the run never
    finished (no teacher is asked)."""
    from services.trainer import jobs
    from services.trainer.records import eval_records
    from services.trainer.settings import TrainerSettings

    monkeypatch.setattr(jobs, "_settings", TrainerSettings(redis_url=REDIS_URL, key_prefix=runs.prefix,
                                                            teacher_urls=["http://127.0.0.1:9"]))
    evals = eval_records(runs.redis, runs.prefix)
    runs.create("r1", {"status": "failed"})
    evals.create("r1-eval", {"status": "queued", "attempts": 0, "run_id": "r1", "models": ["base", "r1"]})
    try:
        assert jobs.evaluate_models("r1-eval") == {"status": "failed"}
        assert evals.get("r1-eval")["error"] == "its run r1 failed: there is no adapter of it to evaluate"
    finally:
        evals.delete_all()


def test_an_evaluation_runs_again_on_the_refusals_another_attempt_gets_past():
    """An adapter being published again while the teacher copied it (409 on `path`), or unloaded by another
    evaluation between this one's reload and its request (404 on `adapter`: evaluations unload what they loaded),
    is RQ's to retry; any other refusal fails the evaluation at once."""
    from services.trainer.jobs import passing_refusal
    from shared.teacher_client import TeacherRejected

    assert passing_refusal(TeacherRejected(409, "files changed", "path"))
    assert passing_refusal(TeacherRejected(404, "no adapter", "adapter"))
    assert not passing_refusal(TeacherRejected(404, "no adapter", "name"))  # not in the adapters directory
    assert not passing_refusal(TeacherRejected(400, "too long", "questions.0.question"))
