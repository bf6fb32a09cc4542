"""The suite's own harness (tests/conftest.py): a test run stopped with SIGTERM, as a CI time limit stops it, still
tears its fixtures down, so what they started (engines, services, Redis) does not run on without it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

A_LONG_TEST = """
import subprocess
import time

import pytest


@pytest.fixture(scope="session")
def child():
    # Its output elsewhere: a process left running must fail the test below, not hold the run's output open.
    process = subprocess.Popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"child {process.pid}", flush=True)
    yield process
    process.kill()
    process.wait()


def test_waits(child):
    print("waiting", flush=True)
    time.sleep(600)
"""


def test_a_test_run_stopped_with_sigterm_tears_its_fixtures_down(tmp_path):
    (tmp_path / "test_long.py").write_text(A_LONG_TEST)
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "tests.conftest",
               str(tmp_path / "test_long.py")]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    child = None
    try:
        for line in run.stdout:  # the signal comes once the test runs: not inside the fixture, before its yield
            if line.startswith("child "):
                child = psutil.Process(int(line.split()[1]))
            if "waiting" in line:
                break
        assert child is not None, "the fixture never started its process"
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=60)[0]
        assert "KeyboardInterrupt: stopped by signal 15" in output, output
        assert not child.is_running(), "the fixture's process outlived the test run"
    finally:
        if child is not None and child.is_running():
            child.kill()
        if run.poll() is None:
            run.kill()
            run.wait()
