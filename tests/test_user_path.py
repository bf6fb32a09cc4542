"""The user's path end to end over HTTP between real processes, on the CPU with the small model: a dataset submitted
to the curator with a training request is curated by two curator workers through the teacher service, the curator
starts the run on the trainer when the last problem is final, the trainer worker trains it, the adapter downloads and
loads in peft, and an evaluation of the base model against the adapter (served by the teacher as a LoRA) returns a
table.

The processes: the session's teacher service (tests/conftest.py), `ssb serve curator`, two `ssb worker curate`,
`ssb serve trainer` and `ssb worker train`, on free loopback ports, with the machine's Redis in a database of their
own (emptied before and after); the adapters directory is the teacher's, as the shared volume is in a deployment.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time

import httpx
import pytest
from redis import Redis

from shared.arithmetic import make_arithmetic_problems
from tests.conftest import CURATION_CONFIG
from tests.services.curator.conftest import stop_process
from tests.teacher_server import API_KEY as TEACHER_KEY
from tests.teacher_server import free_port

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/12"
TRAIN = dict(batch_size=1, rank=8, alpha=16, teacher="stored", epochs=1, max_steps=2, seed=0)


def wait_for(http: httpx.Client, path: str, done, logs, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(path).json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"{path} still {body} after {timeout:.0f} s\n{logs()}")
        time.sleep(0.5)


def wait_ready(url: str, logs) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not ready\n{logs()}")


def test_submit_curate_train_download_and_evaluate(teacher_server, model_path, tmp_path):
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    curator_port, trainer_port = free_port(), free_port()
    curator_url, trainer_url = f"http://127.0.0.1:{curator_port}", f"http://127.0.0.1:{trainer_port}"
    env = {
        **os.environ,
        "SSB_REDIS_URL": REDIS_URL,
        "SSB_KEY_PREFIX": "ssb-test-path",
        "SSB_DATA_DIR": str(tmp_path / "data"),
        "SSB_ADAPTERS_DIR": str(teacher_server.adapters_dir),
        "SSB_TEACHER_URLS": teacher_server.url,
        "SSB_TEACHER_API_KEY": TEACHER_KEY,
        "SSB_TRAINER_URL": trainer_url,
        "SSB_WORKER_HEARTBEAT_SECONDS": "2",
        "SSB_MAINTENANCE_INTERVAL_SECONDS": "3",
    }
    commands = {
        "curator": ["serve", "curator", "--port", str(curator_port), "--log-level", "warning"],
        "curator-worker-1": ["worker", "curate"],
        "curator-worker-2": ["worker", "curate"],
        "trainer": ["serve", "trainer", "--port", str(trainer_port), "--log-level", "warning"],
        "trainer-worker": ["worker", "train"],
    }
    processes = {}

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in tmp_path.glob("*.log"))

    try:
        for name, args in commands.items():
            with open(tmp_path / f"{name}.log", "wb") as log:
                processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "cli.main", *args], env=env, stdout=log, stderr=subprocess.STDOUT
                )
        wait_ready(curator_url, logs)
        wait_ready(trainer_url, logs)
        problems = make_arithmetic_problems(30, seed=0)
        options = {**CURATION_CONFIG, "batch_size": 8, "train": TRAIN}
        with httpx.Client(base_url=curator_url, timeout=60) as curator:
            created = curator.post(
                "/v1/datasets", json={"rows": [p.model_dump(exclude_none=True) for p in problems], "options": options}
            )
            assert created.status_code == 201, created.text
            dataset_id = created.json()["id"]
            dataset = wait_for(
                curator, f"/v1/datasets/{dataset_id}",
                lambda b: b["state"] == "done" and (b["training_run"] or b["training_error"]), logs,
            )
        assert dataset["training_error"] is None, dataset["training_error"]
        assert dataset["funnel"]["paired"] >= 1, dataset["funnel"]
        run_id = dataset["training_run"]

        with httpx.Client(base_url=trainer_url, timeout=60) as trainer:
            run = wait_for(trainer, f"/v1/runs/{run_id}", lambda b: b["status"] in ("succeeded", "failed"), logs)
            assert run["status"] == "succeeded", f"{run}\n{logs()}"
            archive = trainer.get(f"/v1/runs/{run_id}/adapter")
            assert archive.status_code == 200
            held_out = make_arithmetic_problems(6, seed=99)
            held_out = [p.model_dump(include={"id", "question", "answer"}) for p in held_out]
            body = {"models": ["base", run_id], "problems": held_out, "max_tokens": 96}
            evaluation = trainer.post("/v1/evals", json=body)
            assert evaluation.status_code == 202, evaluation.text
            report = wait_for(
                trainer, f"/v1/evals/{evaluation.json()['id']}", lambda b: b["status"] in ("succeeded", "failed"), logs
            )
        assert report["status"] == "succeeded", f"{report}\n{logs()}"
        assert [row["name"] for row in report["rows"]] == ["base", run_id]
        assert all(row["problems"] == 6 and 0 <= row["pass_at_1"] <= 1 for row in report["rows"])
        assert run_id in report["table"]

        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            tar.extractall(tmp_path / "downloaded", filter="data")
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, tmp_path / "downloaded" / run_id)
        assert any("lora_" in name for name, _ in adapted.named_parameters())
    finally:
        for process in reversed(list(processes.values())):
            stop_process(process)
        redis.flushdb()
        redis.close()
