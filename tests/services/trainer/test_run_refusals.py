"""What the trainer must refuse when a run is asked for, not hours later when it ends, and what publishing must never
replace: `ssb serve trainer` as a process on loopback with real Redis (a throwaway database and a key prefix of the
test's own, deleted at the end), no worker, and a stand-in pair store (the API only checks that pairs are there).

- A run whose `evaluation` names an unknown benchmark, or whose `run_id` is `base` (the name evaluations give the base
  model), is a 422 at once; a run whose `run_id` names an adapter already in the adapters directory is a 409.
- A request body over `SSB_MAX_REQUEST_BYTES` (4 KiB here) is a 413, whether its length is declared or not.
- `publish_adapter` replaces only a folder this same run published; `queue_evaluation_after` records on the run why
  the evaluation it asked for could not be queued, and leaves the run to succeed.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from services.trainer.jobs import AdapterNameTaken, publish_adapter, queue_evaluation_after
from services.trainer.settings import TrainerSettings
from shared.workers import connect_redis
from tests.redis_server import delete_keys, redis_url
from tests.services.trainer.test_service import start_api, stop, wait_ready

REDIS_URL = redis_url(13)
DATASET = "stand-in"
MAX_REQUEST_BYTES = 4096


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """The trainer API on a free port, and settings that reach its Redis records and directories."""
    connection = connect_redis(REDIS_URL)
    try:
        connection.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    root = tmp_path_factory.mktemp("trainer-refusals")
    settings = TrainerSettings(redis_url=REDIS_URL, key_prefix=f"test-refusals-{uuid.uuid4().hex[:8]}",
                               data_dir=root / "data", adapters_dir=root / "adapters")
    pairs = settings.datasets_dir() / DATASET / "pairs"
    pairs.mkdir(parents=True)
    (pairs / "p1.safetensors").write_bytes(b"never read: no worker trains here")
    env = {**os.environ, "SSB_REDIS_URL": REDIS_URL, "SSB_KEY_PREFIX": settings.key_prefix,
           "SSB_DATA_DIR": str(settings.data_dir), "SSB_ADAPTERS_DIR": str(settings.adapters_dir),
           "SSB_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}
    env.pop("SSB_TRAINER_API_KEY", None)
    url, api, log_path = start_api(env, root / "api.log")
    try:
        wait_ready(url, api, log_path)
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http, settings, connection
    finally:
        stop(api)
        delete_keys(connection, settings.key_prefix)
        connection.close()


def place_adapter(directory: Path, training_config: dict | None = None, exist_ok: bool = False) -> Path:
    """An adapter folder as a person (no training_config.json) or a run (with one) leaves it."""
    directory.mkdir(parents=True, exist_ok=exist_ok)
    (directory / "adapter_config.json").write_text('{"r": 8}')
    (directory / "adapter_model.safetensors").write_bytes(b"weights of " + directory.name.encode())
    if training_config is not None:
        (directory / "training_config.json").write_text(json.dumps(training_config))
    return directory


def test_an_unknown_benchmark_to_evaluate_after_the_run_is_refused_at_once(trainer):
    http, _, _ = trainer
    request = {"dataset_id": DATASET, "run_id": "r-bench", "evaluation": {"benchmark": "gsm9k"}}
    response = http.post("/v1/runs", json=request)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "evaluation.benchmark"
    assert "gsm9k" in error["message"] and "gsm8k" in error["message"] and "math500" in error["message"]
    assert http.get("/v1/runs/r-bench").status_code == 404  # nothing recorded, nothing queued


def test_a_run_cannot_take_the_name_evaluations_give_the_base_model(trainer):
    http, _, _ = trainer
    response = http.post("/v1/runs", json={"dataset_id": DATASET, "run_id": "base"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "run_id" and "'base'" in error["message"] and "base model" in error["message"]
    assert http.get("/v1/runs/base").status_code == 404


def test_a_run_cannot_take_the_name_of_an_adapter_already_there(trainer):
    http, settings, _ = trainer
    hand_placed = place_adapter(settings.adapters_dir / "gsm8k-v1")
    response = http.post("/v1/runs", json={"dataset_id": DATASET, "run_id": "gsm8k-v1"})
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["param"] == "run_id" and str(hand_placed) in error["message"]
    assert http.get("/v1/runs/gsm8k-v1").status_code == 404
    assert (hand_placed / "adapter_model.safetensors").read_bytes() == b"weights of gsm8k-v1"

    # The run's own adapter is no conflict: a retried POST after the run published still answers with the run.
    request = {"dataset_id": DATASET, "run_id": "r-own"}
    assert http.post("/v1/runs", json=request).status_code == 202
    place_adapter(settings.adapters_dir / "r-own", {"model": "m"})
    again = http.post("/v1/runs", json=request)
    assert again.status_code == 202 and again.json()["id"] == "r-own", again.text


def test_publishing_replaces_only_the_runs_own_adapter(tmp_path, monkeypatch):
    adapters = tmp_path / "adapters"
    run_dir = place_adapter(tmp_path / "runs" / "r1", {"model": "/home/a/model", "num_processes": 1})
    publisher = {"run_id": "r1", "key_prefix": "ssb", "created_at": 1000.0}

    published = publish_adapter(run_dir, adapters, "r1", publisher)
    # A later attempt of the same run, on a worker with another model path and more processes: its own, replaced.
    place_adapter(run_dir, {"model": "/home/b/model", "num_processes": 2}, exist_ok=True)
    (run_dir / "adapter_model.safetensors").write_bytes(b"weights of a second attempt")
    assert publish_adapter(run_dir, adapters, "r1", publisher) == published
    assert (published / "adapter_model.safetensors").read_bytes() == b"weights of a second attempt"
    # A replacement that fails at its last step leaves the earlier copy published, and nothing hidden behind.
    (run_dir / "adapter_model.safetensors").write_bytes(b"weights of a third attempt")
    def disk_full(*args):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr("services.trainer.jobs.os.replace", disk_full)
        with pytest.raises(OSError, match="disk full"):
            publish_adapter(run_dir, adapters, "r1", publisher)
    assert (published / "adapter_model.safetensors").read_bytes() == b"weights of a second attempt"
    assert not list(adapters.glob(".*"))

    hand_placed = place_adapter(adapters / "hand")
    another_runs = publish_adapter(run_dir, adapters, "other", {**publisher, "run_id": "other", "created_at": 5.0})
    for taken in (hand_placed, another_runs):
        before = {path.name: path.read_bytes() for path in taken.iterdir()}
        with pytest.raises(AdapterNameTaken, match=str(taken)):
            publish_adapter(run_dir, adapters, taken.name, {**publisher, "run_id": taken.name})
        assert {path.name: path.read_bytes() for path in taken.iterdir()} == before
    # A copy that fails midway (here a weights "file" that is a folder) publishes nothing and leaves nothing.
    broken = place_adapter(tmp_path / "runs" / "r2", {"model": "m"})
    (broken / "adapter_model.safetensors").unlink()
    (broken / "adapter_model.safetensors").mkdir()
    with pytest.raises(OSError):
        publish_adapter(broken, adapters, "r2", {**publisher, "run_id": "r2"})
    assert not (adapters / "r2").exists()
    assert not list(adapters.glob(".*"))  # no half-published copy, nor a replaced one, left behind


def test_an_evaluation_that_cannot_be_queued_is_recorded_on_the_run(trainer):
    http, settings, connection = trainer
    assert http.post("/v1/runs", json={"dataset_id": DATASET, "run_id": "r-eval"}).status_code == 202
    place_adapter(settings.adapters_dir / "r-eval", {"model": "m"})  # as the worker publishes it before queueing

    # A run recorded before the API refused these: an unknown benchmark (refused by the service), and options that
    # no longer validate (a ValidationError).
    for options, named in [({"benchmark": "gsm9k"}, "gsm9k"), ({"benchmark": "gsm8k", "samples": 0}, "samples")]:
        assert queue_evaluation_after(settings, connection, "r-eval", options) is None
        run = http.get("/v1/runs/r-eval").json()
        assert run["status"] == "queued" and run["evaluation_id"] is None, run
        assert named in run["evaluation_error"], run


def test_a_run_trains_the_model_its_record_names_not_the_workers(trainer, tmp_path, monkeypatch):
    """Every attempt, on any worker, trains the base model the run was recorded with: a worker set up with another
    model (here the default) still loads the record's (here a path that is no model, which fails the run saying so)."""
    from services.trainer import jobs
    from services.trainer.records import run_records

    http, settings, connection = trainer
    created = http.post("/v1/runs", json={"dataset_id": DATASET, "run_id": "recorded-model"})
    assert created.status_code == 202, created.text
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    runs = run_records(connection, settings.key_prefix)
    runs.update("recorded-model", model=str(not_a_model))
    monkeypatch.setattr(jobs, "_settings", settings)
    assert jobs.train_run("recorded-model") == {"status": "failed"}
    run = runs.get("recorded-model")
    assert run["status"] == "failed" and f"{not_a_model} is not a model checkpoint" in run["error"]


def test_an_attempt_that_a_later_one_took_over_stops_at_its_next_step(trainer, monkeypatch):
    """The logic of `train_run` with `train` stood in for (real training is in test_service.py): after a second
    attempt starts (the first one's worker lost its heartbeat), the first stops at its next step, publishes nothing
    and writes nothing more to the run's record."""
    from services.trainer import jobs, training
    from services.trainer.records import run_records

    http, settings, connection = trainer
    assert http.post("/v1/runs", json={"dataset_id": DATASET, "run_id": "taken-over"}).status_code == 202
    runs = run_records(connection, settings.key_prefix)
    steps = []

    def stand_in(pairs_dir, out_dir, model, config, *, resume, on_step, before_write, hold_output_dir):
        assert hold_output_dir is False  # the record keeps attempts apart: one taking a stalled one over must start
        metrics = training.StepMetrics(step=1, total_steps=5, epoch=0.2, loss=1.0, kl=1.0, ce=None, grad_norm=1.0,
                                       lr=1e-4, explanation_tokens=10.0, tokens_per_s=1.0)
        on_step(metrics)
        steps.append(1)
        runs.increment("taken-over", "attempts")  # the attempt that took the job over
        on_step(metrics.model_copy(update={"step": 2}))
        steps.append(2)  # never reached

    monkeypatch.setattr(jobs, "_settings", settings)
    monkeypatch.setattr(training, "train", stand_in)
    assert jobs.train_run("taken-over") == {"status": "superseded"}
    run = runs.get("taken-over")
    assert steps == [1] and run["step"] == 1 and run["status"] == "running" and run["attempts"] == 2
    assert not (settings.adapters_dir / "taken-over").exists()

    def crashes(pairs_dir, out_dir, model, config, *, resume, on_step, before_write, hold_output_dir):
        runs.increment("taken-over", "attempts")  # taken over, then this attempt crashes (say, out of memory)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(training, "train", crashes)
    assert jobs.train_run("taken-over") == {"status": "superseded"}  # not raised: no failure callback to mislead
    assert runs.get("taken-over")["status"] == "running"

    writes = []

    def writes_after_a_takeover(pairs_dir, out_dir, model, config, *, resume, on_step, before_write, hold_output_dir):
        before_write()
        writes.append("step 1")
        runs.increment("taken-over", "attempts")  # taken over between two steps
        before_write()  # the check before the next metrics line, checkpoint or adapter
        writes.append("step 2")  # never reached

    monkeypatch.setattr(training, "train", writes_after_a_takeover)
    assert jobs.train_run("taken-over") == {"status": "superseded"}
    assert writes == ["step 1"] and runs.get("taken-over")["status"] == "running"


def test_a_run_whose_job_ended_without_finishing_it_is_queued_again(trainer):
    """An attempt superseded by a later one ends the job both share as finished; should the later attempt's process
    then die, nothing would take the run up. Reading the run notices (no worker holds the job) and queues it again."""
    from rq.job import Job, JobStatus

    from services.trainer.queues import TRAIN, job_id
    from services.trainer.records import run_records

    http, settings, connection = trainer
    assert http.post("/v1/runs", json={"dataset_id": DATASET, "run_id": "left-over"}).status_code == 202
    job = Job.fetch(job_id(settings, TRAIN, "left-over"), connection=connection)
    job.set_status(JobStatus.FINISHED)
    run_records(connection, settings.key_prefix).update("left-over", status="running")
    run = http.get("/v1/runs/left-over").json()
    assert run["status"] == "queued" and "queued again" in run["note"], run
    assert Job.fetch(job.id, connection=connection).get_status() == JobStatus.QUEUED
    assert http.get("/v1/runs/left-over").json()["status"] == "queued"  # once: the job is queued now
    # A second reader that saw the same finished job and attempt (it read them before the first re-queued) leaves
    # the run alone: it would delete the job just queued, perhaps running, and queue another.
    job.set_status(JobStatus.FINISHED)
    records = run_records(connection, settings.key_prefix)
    records.update("left-over", status="running")
    assert http.get("/v1/runs/left-over").json()["status"] == "running"
    assert Job.fetch(job.id, connection=connection).get_status() == JobStatus.FINISHED
    records.increment("left-over", "attempts")  # a later attempt whose job ends alike is queued again
    assert http.get("/v1/runs/left-over").json()["status"] == "queued"


def test_an_evaluation_whose_job_ended_without_finishing_it_is_queued_again(trainer):
    """The same for an evaluation (it stayed `running` for ever): reading it queues it again, once per attempt; a job
    RQ failed fails it."""
    from rq.job import Job, JobStatus

    from services.trainer.queues import EVAL, job_id
    from services.trainer.records import eval_records

    http, settings, connection = trainer
    request = {"eval_id": "eval-left-over", "models": ["base"], "benchmark": "gsm8k", "limit": 2}
    assert http.post("/v1/evals", json=request).status_code == 202
    records = eval_records(connection, settings.key_prefix)
    job = Job.fetch(job_id(settings, EVAL, "eval-left-over"), connection=connection)
    job.set_status(JobStatus.FINISHED)
    records.update("eval-left-over", status="running")
    evaluation = http.get("/v1/evals/eval-left-over").json()
    assert evaluation["status"] == "queued" and "queued again" in evaluation["note"], evaluation
    assert Job.fetch(job.id, connection=connection).get_status() == JobStatus.QUEUED
    job.set_status(JobStatus.FINISHED)  # a second reader of the same attempt leaves it alone
    records.update("eval-left-over", status="running")
    assert http.get("/v1/evals/eval-left-over").json()["status"] == "running"
    records.increment("eval-left-over", "attempts")
    assert http.get("/v1/evals/eval-left-over").json()["status"] == "queued"
    Job.fetch(job.id, connection=connection).set_status(JobStatus.FAILED)  # failed by RQ, no worker on it
    evaluation = http.get("/v1/evals/eval-left-over").json()
    assert evaluation["status"] == "failed" and "the evaluation job ended as failed" in evaluation["error"], evaluation


def test_a_cancelled_run_never_starts_and_a_running_one_stops_at_its_next_step(trainer, monkeypatch):
    """DELETE /v1/runs/{id}: a queued run ends `cancelled` and its job leaves the queue (a retried DELETE or POST
    changes nothing, a delivery of its job trains nothing); a running attempt (`train` stood in for: the worker's
    real run is in test_service.py) stops before its next write and publishes nothing; an ended run is a 409."""
    from services.trainer import jobs, training
    from services.trainer.queues import TRAIN, fetch_job, open_queue
    from services.trainer.records import run_records

    http, settings, connection = trainer
    runs = run_records(connection, settings.key_prefix)
    request = {"dataset_id": DATASET, "run_id": "cancel-queued"}
    assert http.post("/v1/runs", json=request).status_code == 202
    cancelled = http.delete("/v1/runs/cancel-queued")
    assert cancelled.status_code == 200, cancelled.text
    run = cancelled.json()
    assert run["status"] == "cancelled" and run["note"] == "cancelled by request" and run["attempts"] == 0, run
    # Its job cancelled, then deleted: RQ would keep a cancelled job, and its registry entry, for ever.
    assert fetch_job(settings, connection, TRAIN, "cancel-queued") is None
    assert open_queue(settings, TRAIN, connection).canceled_job_registry.get_job_ids() == []
    assert http.delete("/v1/runs/cancel-queued").json()["status"] == "cancelled"  # a retried DELETE
    again = http.post("/v1/runs", json=request)  # a retried POST: the same run, not queued again
    assert again.status_code == 202 and again.json()["status"] == "cancelled"
    assert fetch_job(settings, connection, TRAIN, "cancel-queued") is None
    monkeypatch.setattr(jobs, "_settings", settings)
    assert jobs.train_run("cancel-queued") == {"status": "cancelled"}  # delivered anyway: nothing done
    assert runs.get("cancel-queued")["attempts"] == 0

    assert http.post("/v1/runs", json={"dataset_id": DATASET, "run_id": "cancel-running"}).status_code == 202
    writes = []

    def cancelled_while_training(pairs_dir, out_dir, model, config, *, resume, on_step, before_write, hold_output_dir):
        before_write()
        writes.append("step 1")
        on_step(training.StepMetrics(step=1, total_steps=5, epoch=0.2, loss=1.0, kl=1.0, ce=None, grad_norm=1.0,
                                     lr=1e-4, explanation_tokens=10.0, tokens_per_s=1.0))
        assert runs.get("cancel-running")["status"] == "running"
        assert http.delete("/v1/runs/cancel-running").json()["status"] == "cancelled"
        before_write()  # the check before the next metrics line, checkpoint or adapter
        writes.append("step 2")  # never reached

    monkeypatch.setattr(training, "train", cancelled_while_training)
    assert jobs.train_run("cancel-running") == {"status": "superseded"}
    run = runs.get("cancel-running")
    assert writes == ["step 1"] and run["status"] == "cancelled" and run["step"] == 1, run
    assert not (settings.adapters_dir / "cancel-running").exists()

    runs.update("cancel-running", status="succeeded")  # as if it had ended before the DELETE
    for run_id, status, error_type in [("cancel-running", 409, "conflict"), ("no-such-run", 404, "not_found")]:
        response = http.delete(f"/v1/runs/{run_id}")
        assert response.status_code == status and response.json()["error"]["type"] == error_type, response.text
    assert "already succeeded" in http.delete("/v1/runs/cancel-running").json()["error"]["message"]
    assert runs.get("cancel-running")["status"] == "succeeded"


def test_a_cancel_while_the_adapter_is_published_queues_no_evaluation_and_a_failed_job_is_not_cancelled(
    trainer, monkeypatch
):
    """A cancel that lands while a finished run publishes its adapter leaves the run cancelled and queues none of the
    evaluation it asked for; a run whose job RQ failed is failed, and a DELETE of it a 409."""
    from types import SimpleNamespace

    from rq.job import Job, JobStatus

    from services.trainer import jobs, training
    from services.trainer.queues import TRAIN, job_id
    from services.trainer.records import eval_records, run_records

    http, settings, connection = trainer
    request = {"dataset_id": DATASET, "run_id": "cancel-publishing", "evaluation": {"benchmark": "gsm8k"}}
    assert http.post("/v1/runs", json=request).status_code == 202
    publish = jobs.publish_adapter

    def publish_then_cancel(*args, **kwargs):
        published = publish(*args, **kwargs)
        assert http.delete("/v1/runs/cancel-publishing").json()["status"] == "cancelled"
        return published

    monkeypatch.setattr(jobs, "_settings", settings)
    monkeypatch.setattr(training, "train", lambda *args, **kwargs: None)  # trained; its result is never read
    monkeypatch.setattr(jobs, "publish_adapter", publish_then_cancel)
    assert jobs.train_run("cancel-publishing") == {"status": "superseded"}
    run = run_records(connection, settings.key_prefix).get("cancel-publishing")
    assert run["status"] == "cancelled" and run.get("evaluation_id") is None, run
    assert eval_records(connection, settings.key_prefix).get("cancel-publishing-eval") is None

    # A cancel after that last check, while the evaluation is queued: the run stays cancelled and the evaluation,
    # queued already, ends failed saying why (its job does nothing for an ended record).
    request = {**request, "run_id": "cancel-queueing"}
    assert http.post("/v1/runs", json=request).status_code == 202
    queue_evaluation = jobs.queue_evaluation_after

    def queue_then_cancel(*args, **kwargs):
        evaluation_id = queue_evaluation(*args, **kwargs)
        assert http.delete("/v1/runs/cancel-queueing").json()["status"] == "cancelled"
        return evaluation_id

    def trains(pairs_dir, out_dir, *args, **kwargs):
        place_adapter(Path(out_dir), exist_ok=True)
        return SimpleNamespace(steps=1, final_loss=0.5, num_pairs=1)

    monkeypatch.setattr(training, "train", trains)
    monkeypatch.setattr(jobs, "publish_adapter", publish)
    monkeypatch.setattr(jobs, "queue_evaluation_after", queue_then_cancel)
    assert jobs.train_run("cancel-queueing") == {"status": "superseded"}
    assert run_records(connection, settings.key_prefix).get("cancel-queueing")["status"] == "cancelled"
    evaluation = eval_records(connection, settings.key_prefix).get("cancel-queueing-eval")
    assert evaluation["status"] == "failed", evaluation
    assert evaluation["error"] == "run cancel-queueing was cancelled before its evaluation started", evaluation
    assert jobs.evaluate_models("cancel-queueing-eval") == {"status": "failed"}

    assert http.post("/v1/runs", json={"dataset_id": DATASET, "run_id": "failed-by-rq"}).status_code == 202
    Job.fetch(job_id(settings, TRAIN, "failed-by-rq"), connection=connection).set_status(JobStatus.FAILED)
    refused = http.delete("/v1/runs/failed-by-rq")
    assert refused.status_code == 409 and "already failed" in refused.json()["error"]["message"], refused.text
    assert http.get("/v1/runs/failed-by-rq").json()["status"] == "failed"


def test_two_evaluations_posted_under_one_new_id_at_once_keep_the_first_ones_problems(trainer, monkeypatch):
    """Two POSTs of different uploaded problems under one new `eval_id`, both past the check for an existing record
    before either recorded it: the one recorded first keeps its problems, the other is a 409 and leaves no file."""
    from services.errors import ServiceError
    from services.trainer.records import Records
    from services.trainer.schemas import BASE_MODEL, EvalRequest
    from services.trainer.service import TrainerService

    http, settings, connection = trainer
    first = {"eval_id": "raced", "models": [BASE_MODEL], "problems": [{"question": "1 + 1?", "answer": "2"}]}
    assert http.post("/v1/evals", json=first).status_code == 202
    second = {**first, "problems": [{"question": "2 + 2?", "answer": "4"}]}
    real_get = Records.get
    monkeypatch.setattr(Records, "get", lambda records, record_id: None)  # read before the first one recorded it
    service = TrainerService(settings, connection)
    with pytest.raises(ServiceError) as refused:
        service.create_evaluation(EvalRequest(**second))
    monkeypatch.setattr(Records, "get", real_get)
    assert refused.value.status == 409 and refused.value.param == "eval_id"
    record = service.evals.get("raced")
    files = sorted(path.name for path in (settings.evals_dir() / "raced").iterdir())
    assert files == [record["problems_file"]], files
    written = (settings.evals_dir() / "raced" / record["problems_file"]).read_text()
    assert "1 + 1?" in written and "2 + 2?" not in written
    assert http.post("/v1/evals", json=first).status_code == 202  # the first one again: the same evaluation


def test_the_newest_checkpoint_is_reported_though_log_every_does_not_divide_it(trainer, monkeypatch):
    """`on_step` runs on logged steps only: with `log_every` 3 and `checkpoint_every` 5, the run names the checkpoint
    saved at step 5 from step 6 on, and the one at 10 from step 12 (`train` stood in for)."""
    from services.trainer import jobs, training
    from services.trainer.records import run_records

    http, settings, connection = trainer
    request = {"dataset_id": DATASET, "run_id": "checkpoints", "log_every": 3, "checkpoint_every": 5}
    assert http.post("/v1/runs", json=request).status_code == 202
    runs = run_records(connection, settings.key_prefix)
    reported = {}

    def stand_in(pairs_dir, out_dir, model, config, *, resume, on_step, before_write, hold_output_dir):
        for step in range(config.log_every, 13, config.log_every):
            on_step(training.StepMetrics(step=step, total_steps=12, epoch=step / 12, loss=1.0, kl=1.0, ce=None,
                                         grad_norm=1.0, lr=1e-4, explanation_tokens=10.0, tokens_per_s=1.0))
            reported[step] = runs.get("checkpoints").get("checkpoint_step")
        raise jobs.AttemptSuperseded("the stand-in's end: nothing to publish")

    monkeypatch.setattr(jobs, "_settings", settings)
    monkeypatch.setattr(training, "train", stand_in)
    assert jobs.train_run("checkpoints") == {"status": "superseded"}
    assert reported == {3: None, 6: 5, 9: 5, 12: 10}, reported


def test_an_attempt_that_fails_before_its_progress_is_recorded_is_its_workers_failure(trainer, monkeypatch):
    """A retried attempt on another worker that fails before training starts (its run directory cannot be cleared):
    the record names that worker at once, so the failure callback records the error instead of taking it for the
    late failure of an attempt another worker took over."""
    import shutil
    from types import SimpleNamespace

    from services.trainer import jobs
    from services.trainer.records import run_records

    http, settings, connection = trainer
    assert http.post("/v1/runs", json={"dataset_id": DATASET, "run_id": "early-failure"}).status_code == 202
    runs = run_records(connection, settings.key_prefix)
    runs.update("early-failure", worker="worker-1", attempts=1)  # the first attempt, on another worker
    (settings.runs_dir() / "early-failure").mkdir(parents=True)  # it died before its first checkpoint

    def cannot_clear(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(jobs, "_settings", settings)
    monkeypatch.setattr(shutil, "rmtree", cannot_clear)
    monkeypatch.setenv("RQ_WORKER_ID", "worker-2")
    with pytest.raises(PermissionError):
        jobs.train_run("early-failure")
    assert runs.get("early-failure")["worker"] == "worker-2"
    job = SimpleNamespace(args=["early-failure"], worker_name="worker-2", retries_left=0)
    jobs.on_train_failure(job, connection, PermissionError, PermissionError("Permission denied"), None)
    run = runs.get("early-failure")
    assert run["status"] == "failed" and run["error"] == "PermissionError: Permission denied", run


def test_a_request_body_over_the_limit_is_refused_as_it_arrives(trainer):
    http, _, _ = trainer
    request = {"dataset_id": DATASET, "run_id": "r-large", "config": {"target_modules": ["q_proj"] * 1000}}
    body = json.dumps(request).encode()
    assert len(body) > MAX_REQUEST_BYTES
    declared = http.post("/v1/runs", content=body, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"] == {
        "message": f"the request body is {len(body)} bytes; at most {MAX_REQUEST_BYTES}", "type": "too_large",
        "param": None, "code": 413,
    }
    # Sent in pieces without a length: refused once what arrived passes the limit.
    pieces = (body[i : i + 1000] for i in range(0, len(body), 1000))
    streamed = http.post("/v1/runs", content=pieces, headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["type"] == "too_large"
    assert f"over {MAX_REQUEST_BYTES} bytes" in streamed.json()["error"]["message"]
    assert http.get("/v1/runs/r-large").status_code == 404  # nothing recorded, nothing queued
    assert 'ssb_trainer_requests_total{endpoint="/v1/runs",status="413"} 2.0' in http.get("/metrics").text
