"""Benchmark: problems per minute through the curator service with W = 1, 2 and 4 workers against one teacher
service, and the same kind of problems curated by the engine alone, in-process, in the same run.

The engine alone: `curate()` on an in-process vLLM engine built from the same `TeacherSettings` as the teacher
service (`SSB_ENABLE_LORA`, `SSB_DTYPE`, `SSB_KV_CACHE_GIB`, ... hold on both sides), `--problems` arithmetic problems
in batches of 64 (the CLI's default), after a warm-up on one problem (the service gets one rollout request). Then
`ssb serve teacher`, `ssb serve curator` and W `ssb worker curate` processes on loopback, on a `redis-server` of the
benchmark's own (a free port, its files under runs/bench/, stopped at the end); `--problems` problems are submitted
as a new dataset for each W (with `--job-batch` problems per job), and the rate is problems over the time from the
first job's start to the last problem's final state, as the curator reports them. Every run curates problems of its
own (the same generator, another seed), so that none finds an earlier run's prompts in the teacher's prefix cache.
Ratios: each W over the engine alone.

    .venv/bin/python -m benchmarks.curator_workers [--problems 64] [--workers 1 2 4] [--job-batch 8]

Settings are the demo's (k=4, worked example, 192 rollout / 256 explanation tokens). Writes
runs/bench/curator_workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from cli.runtime import ensure_model
from cli.supervisor import is_ready
from cli.topology import redis_server_argv
from services.curator.curation import curate
from services.teacher.engine import TeacherEngine
from services.teacher.service import engine_options
from services.teacher.settings import TeacherSettings
from shared.arithmetic import make_arithmetic_problems
from shared.settings import CurationConfig, Settings
from shared.storage import PairStore, replace_atomically
from shared.teacher_client import TeacherClient

OUT = Path("runs/bench")
OPTIONS = dict(k=4, seed=0, worked_example=True, rollout_max_tokens=192, explanation_max_tokens=256, topk=20)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_alone(model_path: str, problems, directory: Path) -> dict:
    config = CurationConfig(**OPTIONS)
    with TeacherEngine(engine_options(TeacherSettings(), model_path)) as engine:
        warm_up = make_arithmetic_problems(1, seed=4)  # the first request compiles; a problem of no run
        curate(warm_up, engine, PairStore(directory.with_name("warm-up")), config)
        started = time.perf_counter()
        funnel = curate(problems, engine, PairStore(directory), config)
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "problems_per_minute": len(problems) / seconds * 60,
        "pairs": funnel.pairs,
        "tokens": funnel.generated_tokens,
    }


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    for leftover in psutil.wait_procs(family, timeout=20)[1]:
        leftover.kill()


def wait_for_redis(url: str, server: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not is_ready(url, timeout=1):
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"redis-server did not start (see {OUT / 'curator_redis.log'})")
        time.sleep(0.1)


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready in {timeout:.0f} s")


def through_workers(workers: int, rows: list[dict], curator_url: str, env: dict, job_batch: int) -> dict:
    procs = [
        start([sys.executable, "-m", "cli.main", "worker", "curate", "--log-level", "warning"], env,
              OUT / f"curator_worker_{workers}_{i}.log")
        for i in range(workers)
    ]
    try:
        time.sleep(3)  # the workers are listening before the dataset arrives
        with httpx.Client(base_url=curator_url, timeout=60) as http:
            created = http.post("/v1/datasets", json={"rows": rows, "options": {**OPTIONS, "batch_size": job_batch}})
            created.raise_for_status()
            dataset_id = created.json()["id"]
            while True:
                status = http.get(f"/v1/datasets/{dataset_id}").json()
                if status["funnel"]["queued"] == status["funnel"]["running"] == 0:
                    break
                time.sleep(0.5)
    finally:
        for process in procs:
            stop(process)
    seconds = status["finished_at"] - status["started_at"]
    return {
        "workers": workers,
        "job_batch": job_batch,
        "seconds": seconds,
        "problems_per_minute": len(rows) / seconds * 60,
        "pairs": status["funnel"]["paired"],
        "failed": status["funnel"]["failed"],
        "teacher_tokens_per_second": status["tokens_per_second"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--job-batch", type=int, nargs="+", default=[8])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model_path = ensure_model(None, Settings())
    problems = make_arithmetic_problems(args.problems, seed=5)
    data_dir = OUT / "curator_workers_data"
    subprocess.run(["rm", "-rf", str(data_dir)], check=True)

    alone = engine_alone(model_path, problems, data_dir / "engine_alone")
    print(f"engine alone: {alone['problems_per_minute']:.1f} problems/min ({alone['seconds']:.0f} s, {alone['pairs']} pairs)")

    redis_dir = OUT / "curator_workers_redis"
    subprocess.run(["rm", "-rf", str(redis_dir)], check=True)
    redis_dir.mkdir()
    redis_port, teacher_port, curator_port = free_port(), free_port(), free_port()
    redis_server = start(list(redis_server_argv(redis_port, redis_dir.resolve())), dict(os.environ),
                         OUT / "curator_redis.log")
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    wait_for_redis(redis_url, redis_server)
    env = {
        **os.environ,
        "SSB_REDIS_URL": redis_url,
        "SSB_KEY_PREFIX": "ssb-bench",
        "SSB_DATA_DIR": str(data_dir),
        "SSB_TEACHER_URLS": f"http://127.0.0.1:{teacher_port}",
    }
    teacher = start([sys.executable, "-m", "cli.main", "serve", "teacher", "--model", model_path, "--port",
                     str(teacher_port), "--log-level", "warning"], env, OUT / "curator_teacher.log")
    curator = start([sys.executable, "-m", "cli.main", "serve", "curator", "--port", str(curator_port),
                     "--log-level", "warning"], env, OUT / "curator_api.log")
    results = []
    try:
        wait_ready(f"http://127.0.0.1:{teacher_port}")
        wait_ready(f"http://127.0.0.1:{curator_port}")
        with TeacherClient(f"http://127.0.0.1:{teacher_port}") as warm:  # the first request compiles
            warm.rollouts([problems[0].question], [CurationConfig(**OPTIONS).rollout_sampling()])
        for job_batch in args.job_batch:
            for workers in args.workers:
                run_problems = make_arithmetic_problems(args.problems, seed=6 + len(results))  # none cached
                rows = [p.model_dump(exclude_none=True) for p in run_problems]
                result = through_workers(workers, rows, f"http://127.0.0.1:{curator_port}", env, job_batch)
                result["ratio_to_engine_alone"] = result["problems_per_minute"] / alone["problems_per_minute"]
                results.append(result)
                print(
                    f"{workers} workers, {job_batch} problems/job: {result['problems_per_minute']:.1f} problems/min "
                    f"= {result['ratio_to_engine_alone']:.2f} of the engine alone ({result['seconds']:.0f} s, "
                    f"{result['pairs']} pairs, teacher {result['teacher_tokens_per_second']:.0f} tok/s)"
                )
    finally:
        stop(curator)
        stop(teacher)
        stop(redis_server)
    report = {"problems": args.problems, "settings": OPTIONS, "engine_alone": alone, "service": results}
    replace_atomically(OUT / "curator_workers.json", json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
