"""The curator service for its tests: `ssb serve curator` and `ssb worker curate` as separate processes on loopback,
against the session's real teacher service (tests/conftest.py), the machine's Redis in a database of their own
(emptied before and after), and a data directory in the test's temporary folder. Every process started is stopped,
its children included, and checked gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from redis import Redis

from tests.processes import kill_leftovers
from tests.redis_server import redis_url
from tests.teacher_server import API_KEY as TEACHER_KEY
from tests.teacher_server import free_port

REDIS_URL = redis_url(11)
PREFIX = "ssb-test-curator"
CURATOR_KEY = "curator-key-51c2"
MAX_UPLOAD_BYTES = 200_000
MAX_PROBLEMS = 1000


@dataclass
class CuratorDeployment:
    url: str
    env: dict[str, str]
    data_dir: Path
    root: Path
    redis: Redis
    workers: list[subprocess.Popen] = field(default_factory=list)
    workers_started: int = 0  # names each worker's log: a later test's workers do not overwrite an earlier one's

    def client(self, *, key: str | None = CURATOR_KEY, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def start_worker(self) -> subprocess.Popen:
        log = open(self.root / f"worker-{self.workers_started}.log", "wb")
        self.workers_started += 1
        command = [sys.executable, "-m", "cli.main", "worker", "curate", "--log-level", "info"]
        worker = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        """Stop every worker, the rest too when one does not stop cleanly (its error is raised after)."""
        with ExitStack() as stops:
            for worker in self.workers:
                stops.callback(stop_process, worker)
            self.workers.clear()

    def wait_done(self, dataset_id: str, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        with self.client() as http:
            while True:
                status = http.get(f"/v1/datasets/{dataset_id}").json()
                funnel = status["funnel"]
                if funnel["queued"] == funnel["running"] == 0:
                    return status
                if time.monotonic() > deadline:
                    raise AssertionError(f"dataset {dataset_id} not done in {timeout:.0f} s: {status}\n{self.logs()}")
                time.sleep(0.25)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.root.glob("*.log")))


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM a process, wait, and make sure it and everything it started are gone."""
    if process.poll() is not None:
        return
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    left = kill_leftovers(family, timeout=20)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def curator(teacher_server, tmp_path_factory):
    """The curator API with a key, on a free port; workers are started by the tests that need them."""
    root = tmp_path_factory.mktemp("curator")
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    port = free_port()
    env = {
        **os.environ,
        "SSB_REDIS_URL": REDIS_URL,
        "SSB_KEY_PREFIX": PREFIX,
        "SSB_DATA_DIR": str(root / "data"),
        "SSB_TEACHER_URLS": teacher_server.url,
        "SSB_TEACHER_API_KEY": TEACHER_KEY,
        "SSB_CURATOR_API_KEY": CURATOR_KEY,
        "SSB_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "SSB_MAX_PROBLEMS": str(MAX_PROBLEMS),
        "SSB_WORKER_HEARTBEAT_SECONDS": "1",  # a killed worker's job is taken back after 3 s (as the trainer's)
        "SSB_MAINTENANCE_INTERVAL_SECONDS": "1",
    }
    log = open(root / "api.log", "wb")
    command = [sys.executable, "-m", "cli.main", "serve", "curator", "--port", str(port), "--log-level", "warning"]
    api = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deployment = CuratorDeployment(f"http://127.0.0.1:{port}", env, root / "data", root, redis)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{deployment.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert api.poll() is None and time.monotonic() < deadline, deployment.logs()
            time.sleep(0.3)
        yield deployment
    finally:
        with ExitStack() as cleanup:  # each step runs, whichever fails
            cleanup.callback(redis.close)
            cleanup.callback(redis.flushdb)
            cleanup.callback(stop_process, api)
            cleanup.callback(deployment.stop_workers)


@pytest.fixture(autouse=True)
def no_worker_outlives_its_test(request):
    """A test that fails before it stops its workers leaves none to the module's next tests."""
    yield
    if "curator" in request.fixturenames:
        request.getfixturevalue("curator").stop_workers()
