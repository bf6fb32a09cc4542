"""`ssb up` for real: the whole topology as local processes on free loopback ports (the small model on the CPU, an
engine start of its own), every service answering /readyz, then SIGTERM: exit status 128 + 15, every process it
started and everything those started are gone, and the ready file is removed.

Marked `topology` (and `engine`): it costs an engine start, about a minute on 2 cores; `-m "not topology"` leaves it
out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import redis

pytestmark = [pytest.mark.topology, pytest.mark.engine, pytest.mark.slow]

READY_TIMEOUT_SECONDS = 300
NAMES = ("redis", "teacher", "curator", "curator-worker-1", "curator-worker-2", "trainer", "trainer-worker")


def test_ssb_up_starts_everything_and_sigterm_leaves_nothing(model_path, tmp_path):
    ready_file, log_path = tmp_path / "ready.json", tmp_path / "up.log"
    command = [sys.executable, "-m", "cli.main", "up", "--workers", "2", "--data-dir", str(tmp_path / "data")]
    command += ["--teacher-port", "0", "--curator-port", "0", "--trainer-port", "0", "--ready-file", str(ready_file)]
    env = {name: value for name, value in os.environ.items() if name != "SSB_REDIS_URL"}
    with open(log_path, "wb") as log:
        up = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not ready_file.exists():
            assert up.poll() is None, f"ssb up exited with {up.returncode}:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready in time:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.5)
        ready = json.loads(ready_file.read_text())
        assert set(ready["pids"]) == set(NAMES)
        for service in ("teacher", "curator", "trainer"):
            assert httpx.get(f"{ready[service]}/readyz", timeout=5).status_code == 200, service
        assert redis.Redis.from_url(ready["redis"]).ping()
        assert ready["redis"].startswith("redis://127.0.0.1:")
        everything = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
        assert len(everything) > len(NAMES) + 1, "the teacher started no engine process"
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            returncode = up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    _, alive = psutil.wait_procs(everything, timeout=10)
    left = [f"{p.pid} {p.name()}" for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for process in alive:
        process.kill()
    log = log_path.read_text(errors="replace")
    assert not left, f"processes left after SIGTERM: {left}"
    assert returncode == 128 + signal.SIGTERM, log[-3000:]
    assert not ready_file.exists()
    for name in NAMES:
        assert f"\n{name:<16} | " in log, f"no line of {name}"
    assert "ready: teacher=" in log
