"""The user's path end to end, on the CPU with the small model: `ssb up` starts the whole topology as local processes (a
Redis of its own, the teacher, the curator API and two curator workers, the trainer API and its worker) on free loopback
ports; a dataset submitted with `ssb submit --wait` with a training request is curated through the teacher, the curator
starts the run on the trainer when the last problem is final, the run succeeds, its adapter downloads and loads in peft,
and an evaluation of the base model against the adapter (served by the teacher as a LoRA) returns a table. Finally
SIGTERM: `ssb up` exits 128 + 15 and every process it started, and everything those started, is gone, and so are the IPC
sockets of the teacher's engine. (`ssb submit --wait`'s progress bar against a real curator is tested in
tests/services/curator.)

Marked `topology` (and `engine`): it costs an engine start of its own; `-m "not topology"` leaves it out.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import httpx
import psutil
import pytest
import redis

from shared.arithmetic import make_arithmetic_problems
from tests.conftest import CURATION_CONFIG
from tests.processes import kill_leftovers

pytestmark = [pytest.mark.topology, pytest.mark.engine, pytest.mark.slow]

READY_TIMEOUT_SECONDS = 300
NAMES = ("redis", "teacher", "curator", "curator-worker-1", "curator-worker-2", "trainer", "trainer-worker")
TRAIN = dict(batch_size=1, rank=8, alpha=16, teacher="stored", epochs=1, max_steps=2, seed=0)


def wait_for(http: httpx.Client, path: str, done, log, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(path).json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"{path} still {body} after {timeout:.0f} s\n{log()[-6000:]}")
        time.sleep(0.5)


def paired_problem(curation_run) -> dict:
    """One of the session's curated problems (tests/conftest.py) that paired in-process: the topology curates it with
    the same seed and options, so it pairs there too (the service agrees with in-process curation problem by problem,
    tests/services/curator), and the training run has data. One problem: its teacher is built for LoRA (it serves the
    adapter's evaluation), which on a CPU generates at about half the speed, and the other kinds of problem are
    curated through the service in tests/services/curator."""
    problems, store, _ = curation_run
    pair_ids = set(store.pair_ids())
    return next(p for p in problems if p.id in pair_ids).model_dump(exclude_none=True)


def test_up_submit_curate_train_download_evaluate_and_stop(model_path, curation_run, tmp_path, tmp_path_factory):
    ready_file, log_path = tmp_path / "ready.json", tmp_path / "up.log"
    command = [sys.executable, "-m", "cli.main", "up", "--workers", "2", "--data-dir", str(tmp_path / "data")]
    command += ["--teacher-port", "0", "--curator-port", "0", "--trainer-port", "0", "--ready-file", str(ready_file)]
    env = {name: value for name, value in os.environ.items() if not name.startswith("SSB_")}
    env["SSB_KV_CACHE_GIB"] = "0.5"  # the session's engines and teachers are alive too: they share the memory
    env["SSB_MAX_LORA_RANK"] = "8"  # the run trains rank 8; on a CPU a smaller bound makes every request faster
    env["SSB_DTYPE"] = os.environ["SSB_DTYPE"]  # the session's dtype (tests/conftest.py), as the curation it repeats
    ipc = tmp_path_factory.mktemp("ipc")  # where vLLM puts the engine's IPC sockets: a short path (108 bytes at most)
    env["VLLM_RPC_BASE_PATH"] = str(ipc)
    with open(log_path, "wb") as log_file:
        up = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)

    def log() -> str:
        return log_path.read_text(errors="replace")

    everything = [psutil.Process(up.pid)]
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not ready_file.exists():
            assert up.poll() is None, f"ssb up exited with {up.returncode}:\n{log()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready in time:\n{log()[-4000:]}"
            time.sleep(0.5)
        ready = json.loads(ready_file.read_text())
        assert set(ready["pids"]) == set(NAMES)
        for service in ("teacher", "curator", "trainer"):
            assert httpx.get(f"{ready[service]}/readyz", timeout=5).status_code == 200, service
        assert redis.Redis.from_url(ready["redis"]).ping()
        everything += psutil.Process(up.pid).children(recursive=True)
        assert len(everything) > len(NAMES) + 1, "the teacher started no engine process"
        assert any(path.is_socket() for path in ipc.rglob("*")), "the engine's processes talk over IPC sockets"

        # An arithmetic problem submitted with `ssb submit --wait`, with a training request, then an evaluation.
        problems = tmp_path / "problems.jsonl"
        problems.write_text(json.dumps(paired_problem(curation_run)) + "\n")
        submit = [sys.executable, "-m", "cli.main", "submit", str(problems), "--curator", ready["curator"], "--wait",
                  "--options", json.dumps(CURATION_CONFIG), "--train", json.dumps(TRAIN), "--name", "user path"]
        submitted = subprocess.run(submit, capture_output=True, text=True, timeout=600)
        assert submitted.returncode == 0, f"{submitted.stdout}\n{submitted.stderr}\n{log()[-4000:]}"
        dataset_id = submitted.stdout.split()[0]  # its first line: the dataset's id
        with httpx.Client(base_url=ready["curator"], timeout=60) as curator:  # --wait waited for the hand-off too
            dataset = wait_for(
                curator, f"/v1/datasets/{dataset_id}",
                lambda b: b["state"] == "done" and (b["training_run"] or b["training_error"]), log, timeout=10,
            )
        assert dataset["name"] == "user path", dataset
        assert dataset["training_error"] is None, dataset["training_error"]
        assert dataset["funnel"]["paired"] == 1, dataset["funnel"]
        run_id = dataset["training_run"]
        assert run_id == f"{dataset_id}-train"  # named after the dataset: a request sent twice starts one run
        with httpx.Client(base_url=ready["trainer"], timeout=60) as trainer:
            run = wait_for(trainer, f"/v1/runs/{run_id}", lambda b: b["status"] in ("succeeded", "failed"), log)
            assert run["status"] == "succeeded", f"{run}\n{log()[-4000:]}"
            archive = trainer.get(f"/v1/runs/{run_id}/adapter")
            assert archive.status_code == 200
            held_out = [p.model_dump(include={"id", "question", "answer"}) for p in make_arithmetic_problems(2, 99)]
            body = {"models": ["base", run_id], "problems": held_out, "max_tokens": 32}
            evaluation = trainer.post("/v1/evals", json=body)
            assert evaluation.status_code == 202, evaluation.text
            report = wait_for(
                trainer, f"/v1/evals/{evaluation.json()['id']}", lambda b: b["status"] in ("succeeded", "failed"), log
            )
        assert report["status"] == "succeeded", f"{report}\n{log()[-4000:]}"
        assert [row["name"] for row in report["rows"]] == ["base", run_id]
        assert all(row["problems"] == 2 and 0 <= row["pass_at_1"] <= 1 for row in report["rows"])
        assert run_id in report["table"]

        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            tar.extractall(tmp_path / "downloaded", filter="data")
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, tmp_path / "downloaded" / run_id)
        assert any("lora_" in name for name, _ in adapted.named_parameters())
    finally:  # on every path, a failed one too: nothing of the topology outlives the test
        if up.poll() is None:  # every process alive now (work horses and grading helpers included)
            everything += [p for p in psutil.Process(up.pid).children(recursive=True) if p not in everything]
        up.send_signal(signal.SIGTERM)
        try:
            returncode = up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            returncode = None
        left = kill_leftovers(everything, timeout=10)
    assert returncode is not None, f"ssb up still ran 120 s after SIGTERM:\n{log()[-3000:]}"
    assert not left, f"processes left after SIGTERM: {left}"
    assert returncode == 128 + signal.SIGTERM, log()[-3000:]
    assert not ready_file.exists()
    assert not list(ipc.iterdir()), "the teacher's engine left its IPC sockets behind"
    for name in NAMES:
        assert f"\n{name:<16} | " in log(), f"no line of {name}"
    assert "ready: teacher=" in log()
