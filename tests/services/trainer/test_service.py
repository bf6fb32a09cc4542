"""The trainer service end to end on loopback: `ssb serve trainer` and `ssb worker train` as separate processes, real
Redis (a throwaway database and a key prefix of the test's own, deleted at the end), real training of the small model
on the session's curated pairs, and evaluations through the session's real teacher service.

One run carries most checks: its first worker is SIGKILLed (with its work horse) after the first checkpoint, a second
worker resumes it from that checkpoint, and the finished run's metrics, curve and adapter (which loads in peft) are
then read over HTTP and evaluated through the teacher beside the base model. A second run is round two (its dataset
was rolled out by the first run's adapter) and asks for an evaluation when it ends.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from shared.arithmetic import make_arithmetic_problems
from tests.prometheus_text import metric
from tests.redis_server import delete_keys, redis_url
from tests.teacher_server import API_KEY as TEACHER_KEY
from tests.teacher_server import free_port

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REDIS_URL = redis_url(13)
TRAINER_KEY = "trainer-test-key-5b1e"
DATASET = "arith"
# Small and quick: one pair per step, a rank-8 adapter on the stored top-k teacher, a checkpoint after every step.
RUN_SETTINGS = dict(batch_size=1, rank=8, alpha=16, teacher="stored", log_ce=False, checkpoint_every=1, seed=0)
RUN_STEPS = 5


@dataclass
class TrainerStack:
    url: str
    data_dir: Path
    adapters_dir: Path
    root: Path
    env: dict
    key_prefix: str
    api: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    finished: dict = field(default_factory=dict)

    def client(self, key: str | None = TRAINER_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def start_worker(self, name: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "train", "--log-level", "info"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.workers.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.root.glob("*.log"))

    def wait_for(self, path: str, done, timeout: float = 240.0) -> dict:
        """Poll GET `path` until `done(body)`; fail with the services' logs on timeout."""
        deadline = time.monotonic() + timeout
        with self.client() as http:
            while True:
                body = http.get(path).json()
                if done(body):
                    return body
                if time.monotonic() > deadline:
                    pytest.fail(f"{path} still {body} after {timeout} s\n{self.logs()}")
                time.sleep(0.25)


def start_api(env: dict, log_path: Path) -> tuple[str, subprocess.Popen, Path]:
    """`ssb serve trainer` on a free loopback port with `env`, its output in `log_path`: (its URL, process, log)."""
    port = free_port()
    with open(log_path, "wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "trainer", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    return f"http://127.0.0.1:{port}", api, log_path


def wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the trainer API was not ready:\n{log_path.read_text()}")


def stop(process: subprocess.Popen, timeout: float = 120) -> None:
    """SIGTERM a process (a worker finishes its job first) and check that it and its children are gone."""
    if process.poll() is not None:
        return
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    _, alive = psutil.wait_procs(family, timeout=30)
    left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    assert not left, f"processes left after SIGTERM: {left}"


@pytest.fixture(scope="module")
def trainer(lora_teacher_server, curated_pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    data_dir = root / "data"
    shutil.copytree(curated_pairs, data_dir / "datasets" / DATASET)
    key_prefix = f"test-trainer-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "SSB_REDIS_URL": REDIS_URL,
        "SSB_KEY_PREFIX": key_prefix,
        "SSB_DATA_DIR": str(data_dir),
        # The teacher's adapters directory: runs publish there, and the teacher loads them as LoRAs by name.
        "SSB_ADAPTERS_DIR": str(lora_teacher_server.adapters_dir),
        "SSB_TEACHER_URLS": lora_teacher_server.url,
        "SSB_TEACHER_API_KEY": TEACHER_KEY,
        "SSB_TRAINER_API_KEY": TRAINER_KEY,
        "SSB_WORKER_HEARTBEAT_SECONDS": "1",
        "SSB_MAINTENANCE_INTERVAL_SECONDS": "1",
        "SSB_JOB_RETRIES": "2",
    }
    url, api, log_path = start_api(env, root / "api.log")
    stack = TrainerStack(url, data_dir, lora_teacher_server.adapters_dir, root, env, key_prefix, api)
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        wait_ready(url, api, log_path)
        yield stack
    finally:
        with ExitStack() as cleanup:  # each step runs, whichever fails
            cleanup.callback(connection.close)
            cleanup.callback(delete_keys, connection, key_prefix)
            for process in [api, *reversed(stack.workers)]:  # workers first, the API last
                cleanup.callback(stop, process)


def test_bad_requests_are_refused_naming_the_field(trainer):
    with trainer.client() as http:
        for body, status, param in [
            ({"dataset_id": DATASET, "lr": -1}, 422, "lr"),
            ({"dataset_id": DATASET, "rank": 0}, 422, "rank"),
            ({"dataset_id": DATASET, "teacher": "oracle"}, 422, "teacher"),
            ({"dataset_id": DATASET, "learning_rate": 0.1}, 422, "learning_rate"),
            ({"dataset_id": "no-such-set"}, 404, "dataset_id"),
            ({"pairs_dir": "/etc"}, 422, "pairs_dir"),
            ({"pairs_dir": "../../.."}, 422, "pairs_dir"),
            ({"pairs_dir": "a\u0000b"}, 422, "pairs_dir"),
            ({"pairs_dir": "x" * 300}, 422, "pairs_dir"),
            (f'{{"dataset_id": "{DATASET}", "lr": Infinity}}', 422, "lr"),  # Python's JSON reads it
            ({"dataset_id": DATASET, "temperature": int("1" * 400)}, 422, "temperature"),
            ({}, 422, None),
            ({"dataset_id": DATASET, "pairs_dir": "datasets/arith"}, 422, None),
            ({"dataset_id": DATASET, "run_id": "ds-0123456789ab-train"}, 422, None),  # that dataset's own run
        ]:
            if isinstance(body, str):
                response = http.post("/v1/runs", content=body, headers={"content-type": "application/json"})
            else:
                response = http.post("/v1/runs", json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert error["code"] == status and error["param"] == param, (body, error)
        for path in ("/v1/runs/nope", "/v1/runs/nope/metrics", "/v1/runs/nope/curve.png", "/v1/runs/nope/adapter",
                     "/v1/evals/nope", "/v1/runs/nope:requeued:1", "/v1/evals/a:b"):
            response = http.get(path)
            assert response.status_code == 404 and response.json()["error"]["type"] == "not_found", path
        bad_eval = http.post("/v1/evals", json={"models": ["base"], "benchmark": "gsm9k"})
        assert bad_eval.status_code == 422 and bad_eval.json()["error"]["param"] == "benchmark"
        evals_dir = trainer.data_dir / "evals"
        files_before = set(evals_dir.rglob("*"))
        twice = [{"id": "a", "question": "1 + 1?", "answer": "2"}, {"id": "a", "question": "2 + 2?", "answer": "4"}]
        duplicate = http.post("/v1/evals", json={"models": ["base"], "problems": twice})
        assert duplicate.status_code == 422 and duplicate.json()["error"]["param"] == "problems"
        assert "problems:row 1: duplicate id 'a' (also at problems:row 0)" in duplicate.json()["error"]["message"]
        assert set(evals_dir.rglob("*")) == files_before  # a refused upload writes nothing
        unknown_adapter = http.post("/v1/evals", json={"models": ["base", "nobody"], "benchmark": "gsm8k"})
        assert unknown_adapter.status_code == 404 and unknown_adapter.json()["error"]["param"] == "models.1"


def test_a_key_is_needed_when_configured(trainer):
    for key in (None, "wrong"):
        with trainer.client(key) as http:
            guarded = [("GET", "/v1/runs"), ("POST", "/v1/runs"), ("GET", "/v1/runs/x"), ("DELETE", "/v1/runs/x"),
                       ("POST", "/v1/evals")]
            for method, path in guarded:
                response = http.request(method, path)
                assert response.status_code == 401, (key, path)
                assert response.json()["error"]["type"] == "unauthorized"
            assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200


def test_a_killed_worker_leaves_the_run_to_resume_from_its_checkpoint(trainer):
    """SIGKILL the worker and its work horse after the first checkpoint; a second worker resumes at that step."""
    first = trainer.start_worker("worker-1")
    with trainer.client() as http:
        created = http.post("/v1/runs", json={"dataset_id": DATASET, "max_steps": RUN_STEPS, **RUN_SETTINGS})
        assert created.status_code == 202, created.text
        run_id = created.json()["id"]
        assert created.headers["location"] == f"/v1/runs/{run_id}"
        assert http.get(f"/v1/runs/{run_id}").json()["status"] in ("queued", "running")
    running = trainer.wait_for(f"/v1/runs/{run_id}", lambda r: (r["checkpoint_step"] or 0) >= 1)
    horses = psutil.Process(first.pid).children(recursive=True)
    first.kill()
    for horse in horses:
        horse.kill()
    first.wait(timeout=10)
    psutil.wait_procs(horses, timeout=10)
    at_kill = trainer.wait_for(f"/v1/runs/{run_id}", lambda r: True)
    assert running["status"] == "running" and at_kill["step"] < RUN_STEPS, at_kill
    assert at_kill["time_left_seconds"] > 0 and at_kill["metrics"]["step"] == at_kill["step"]

    trainer.start_worker("worker-2")
    done = trainer.wait_for(f"/v1/runs/{run_id}", lambda r: r["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2 and done["resumed_from_step"] >= 1, done
    assert f"resumed from the checkpoint at step {done['resumed_from_step']}" in done["note"]
    assert done["step"] == done["total_steps"] == RUN_STEPS and done["adapter"] == run_id
    assert done["round"] == 1 and done["parent_run"] is None
    trainer.finished["run"] = done


def test_a_finished_runs_metrics_curve_and_adapter(trainer, model_path):
    run = trainer.finished.get("run") or pytest.skip("needs the run of the resume test")
    run_id = run["id"]
    with trainer.client() as http:
        listed = http.get("/v1/runs").json()["runs"]
        assert run_id in [r["id"] for r in listed]
        newest = http.get("/v1/runs", params={"limit": 1}).json()["runs"]
        assert [r["id"] for r in newest] == [listed[0]["id"]]  # the listing's first (it lists the newest first)
        metrics = http.get(f"/v1/runs/{run_id}/metrics")
        assert metrics.status_code == 200
        steps = [json.loads(line)["step"] for line in metrics.text.splitlines()]
        assert steps == list(range(1, RUN_STEPS + 1)), steps  # the resumed run logged every step once
        curve = http.get(f"/v1/runs/{run_id}/curve.png")
        assert curve.status_code == 200 and curve.headers["content-type"] == "image/png"
        assert curve.content.startswith(b"\x89PNG")
        archive = http.get(f"/v1/runs/{run_id}/adapter")
        assert archive.status_code == 200 and archive.headers["content-type"] == "application/gzip"

    unpacked = trainer.root / "downloaded"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        tar.extractall(unpacked, filter="data")
    adapter = unpacked / run_id
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    assert model.peft_config["default"].r == RUN_SETTINGS["rank"]
    trained = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # lora_B starts at zero: training moved it


def test_evaluation_of_base_and_adapter_through_the_teacher(trainer, lora_teacher_server):
    run = trainer.finished.get("run") or pytest.skip("needs the run of the resume test")
    problems = [{"question": p.question, "answer": p.answer} for p in make_arithmetic_problems(2, seed=5)]
    body = {"models": ["base", run["id"]], "problems": problems, "max_tokens": 32, "samples": 2,
            "eval_id": "side-by-side"}
    with trainer.client() as http:
        created = http.post("/v1/evals", json=body)
        assert created.status_code == 202, created.text
        eval_id = created.json()["id"]
        # Sent again (its answer lost): the same evaluation, queued once; other settings under its id: refused.
        again = http.post("/v1/evals", json=body)
        assert again.status_code == 202 and again.json()["id"] == eval_id == "side-by-side"
        other = http.post("/v1/evals", json={**body, "max_tokens": 16})
        assert other.status_code == 409 and other.json()["error"]["param"] == "eval_id"
    done = trainer.wait_for(f"/v1/evals/{eval_id}", lambda e: e["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert [row["name"] for row in done["rows"]] == ["base", run["id"]]
    assert all(row["problems"] == 2 and 0 <= row["pass_at_1"] <= 1 for row in done["rows"])
    assert all(0 <= row["mean_at_n"] <= 1 for row in done["rows"])  # mean@n of the 2 samples, sent to the teacher
    assert done["rows"][1]["served"] == "lora"
    assert len(done["problems"]) == 2 and set(done["problems"][0]["answers"]) == {"base", run["id"]}
    assert run["id"] in done["table"] and "pass@1" in done["table"]
    assert done["progress"] == {"base": "2/2", run["id"]: "2/2"}
    # The adapter it loaded is unloaded again: each is a copy in the teacher, one more for every run evaluated.
    with lora_teacher_server.client() as teacher:
        assert run["id"] not in [a["name"] for a in teacher.get("/v1/models").json()["adapters"]]


def test_a_run_on_unreadable_pairs_fails_once_naming_the_file(trainer):
    """An error no retry can fix fails the run at its first attempt, with the reason."""
    broken = trainer.data_dir / "datasets" / "broken"
    (broken / "pairs").mkdir(parents=True)
    (broken / "pairs" / "p1.safetensors").write_bytes(b"not a pair file")
    with trainer.client() as http:
        created = http.post("/v1/runs", json={"dataset_id": "broken", "max_steps": 1})
        assert created.status_code == 202, created.text
    done = trainer.wait_for(f"/v1/runs/{created.json()['id']}", lambda r: r["status"] in ("succeeded", "failed"))
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert "p1.safetensors" in done["error"], done["error"]


def test_round_two_records_its_parent_and_evaluates_when_done(trainer):
    """A dataset rolled out by the first run's adapter (its dataset.json says so) trains as round 2 with that parent;
    the run's evaluation request is queued when it succeeds. A repeated POST with its id starts nothing twice."""
    parent = trainer.finished.get("run") or pytest.skip("needs the run of the resume test")
    round_two = trainer.data_dir / "datasets" / "round2"
    shutil.copytree(trainer.data_dir / "datasets" / DATASET, round_two)
    meta = {"id": "round2", "problems": 64, "options": {"rollout_adapter": parent["id"]}, "created_at": time.time()}
    (round_two / "dataset.json").write_text(json.dumps(meta))  # as the curator service writes it
    body = {
        "dataset_id": "round2",
        "run_id": f"{parent['id']}-r2",
        "max_steps": 1,
        **RUN_SETTINGS,
        "evaluation": {"benchmark": "gsm8k", "limit": 2, "max_tokens": 32, "include_base": False},
    }
    with trainer.client() as http:
        first = http.post("/v1/runs", json=body)
        again = http.post("/v1/runs", json=body)
        assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
        conflict = http.post("/v1/runs", json={**body, "max_steps": 2})
        assert conflict.status_code == 409 and conflict.json()["error"]["param"] == "run_id"
    run_id = first.json()["id"]
    done = trainer.wait_for(f"/v1/runs/{run_id}", lambda r: r["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["round"] == 2 and done["parent_run"] == parent["id"] and done["attempts"] == 1
    assert done["evaluation_id"] == f"{run_id}-eval"
    evaluation = trainer.wait_for(
        f"/v1/evals/{done['evaluation_id']}?problems=false", lambda e: e["status"] in ("succeeded", "failed")
    )
    assert evaluation["status"] == "succeeded", evaluation
    assert evaluation["run_id"] == run_id and evaluation["benchmark"] == "gsm8k" and evaluation["problems"] is None
    assert [row["name"] for row in evaluation["rows"]] == [run_id] and evaluation["rows"][0]["problems"] == 2


def test_a_run_cancelled_while_it_trains_stops_and_one_queued_behind_it_never_starts(trainer):
    """DELETE /v1/runs/{id} with a real worker: the run it trains stops at the end of the step under way (its
    checkpoints stay, no adapter is published), and the run queued behind it never starts."""
    from rq.job import JobStatus

    from services.trainer.queues import TRAIN, fetch_job
    from services.trainer.settings import TrainerSettings

    if not any(worker.poll() is None for worker in trainer.workers):
        trainer.start_worker("worker-3")
    settings = TrainerSettings(redis_url=REDIS_URL, key_prefix=trainer.key_prefix)
    connection = redis.Redis.from_url(REDIS_URL)
    long_run = {"dataset_id": DATASET, **RUN_SETTINGS, "epochs": 100, "max_steps": 400}
    with trainer.client() as http:
        training = http.post("/v1/runs", json={**long_run, "run_id": "cancelled-while-training"}).json()["id"]
        waiting = http.post("/v1/runs", json={**long_run, "run_id": "cancelled-while-queued"}).json()["id"]
        trainer.wait_for(f"/v1/runs/{training}", lambda r: (r["checkpoint_step"] or 0) >= 1)
        assert http.get(f"/v1/runs/{waiting}").json()["status"] == "queued"  # one worker, busy
        assert http.delete(f"/v1/runs/{waiting}").json()["status"] == "cancelled"
        response = http.delete(f"/v1/runs/{training}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
        deadline = time.monotonic() + 120
        while fetch_job(settings, connection, TRAIN, training).get_status() != JobStatus.FINISHED:
            assert time.monotonic() < deadline, trainer.logs()
            time.sleep(0.25)
        run = http.get(f"/v1/runs/{training}").json()
        lines = http.get(f"/v1/runs/{training}/metrics").text.splitlines()
        assert run["status"] == "cancelled" and run["attempts"] == 1 and run["step"] < run["total_steps"], run
        # The step under way at the cancel may still log (its line comes before the record's update); none after it.
        assert run["step"] <= len(lines) <= run["step"] + 1, (len(lines), run)
        assert http.get(f"/v1/runs/{training}/adapter").status_code == 409
        time.sleep(2)  # the worker, free again, takes no job
        queued = http.get(f"/v1/runs/{waiting}").json()
    connection.close()
    assert queued["status"] == "cancelled" and queued["attempts"] == 0 and queued["step"] == 0, queued
    assert any((trainer.data_dir / "runs" / training / "checkpoints").iterdir())
    assert not (trainer.adapters_dir / training).exists() and not (trainer.adapters_dir / waiting).exists()


def test_metrics_show_runs_queues_workers_and_requests(trainer):
    """`/metrics` after the runs above: the finished runs by status (the states add up to every run), no job waiting,
    the requests counted, the key needed."""
    with trainer.client() as http:
        runs = http.get("/v1/runs").json()["runs"]
        text = http.get("/metrics").text
    assert metric(text, "ssb_trainer_runs") == len(runs)
    assert metric(text, "ssb_trainer_runs", 'status="succeeded"') == sum(r["status"] == "succeeded" for r in runs) >= 1
    assert metric(text, "ssb_trainer_queued_jobs") == 0
    alive = sum(worker.poll() is None for worker in trainer.workers)  # a killed one counts until its key expires
    assert alive <= metric(text, "ssb_trainer_workers") <= len(trainer.workers)
    assert metric(text, "ssb_trainer_requests_total", 'endpoint="/v1/runs",status="202"') >= 1
    assert metric(text, "ssb_trainer_errors_total", 'status="401"') >= 1  # test_a_key_is_needed_when_configured
    with trainer.client(None) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/docs").status_code == 200  # the API's description needs no key
