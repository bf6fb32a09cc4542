"""The real teacher service for the test session (the `teacher_server` fixture in tests/conftest.py, for every test that
needs it): `ssb serve teacher` as its own process on a loopback port, on the
real small model with the CPU build of vLLM, started once, with a bearer key, a small admission bound (so 429 is
cheap to reach) and, for the one built for LoRA, an adapters directory holding one tiny LoRA adapter. On teardown it
gets SIGTERM, and the test asserts that it and every process it started are gone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

API_KEY = "test-key-7f3a"
MAX_PENDING_REQUESTS = 16
READY_TIMEOUT_SECONDS = 300


@dataclass
class TeacherServer:
    url: str
    process: subprocess.Popen
    adapters_dir: Path
    log_path: Path

    def client(self, *, key: str | None = API_KEY, timeout: float = 600.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    """A free loopback port, never the services' usual 8000-8002."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in (8000, 8001, 8002):
            return port


def write_tiny_adapter(model_path: str, directory: Path, rank: int = 4) -> None:
    """A LoRA on q/v (rank 4 unless told) with random (non-zero) weights: it changes the model's output, as a trained
    one would."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(directory)


def wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready in {READY_TIMEOUT_SECONDS} s:\n{log_path.read_text()[-4000:]}")


def start_teacher_server(model_path: str, tmp_path_factory, *, lora: bool) -> Iterator[TeacherServer]:
    """Start the service (its engine built for LoRA adapters, or not: `--no-lora`), yield it when ready, stop it (and
    check that nothing is left) on exit."""
    root = tmp_path_factory.mktemp("lora-teacher" if lora else "teacher")
    adapters_dir = root / "adapters"
    if lora:
        write_tiny_adapter(model_path, adapters_dir / "tiny")
    adapters_dir.mkdir(exist_ok=True)
    port = free_port()
    log_path = root / "serve.log"
    env = {
        **os.environ,
        "SSB_TEACHER_API_KEY": API_KEY,
        "SSB_MAX_PENDING_REQUESTS": str(MAX_PENDING_REQUESTS),
        "SSB_RETRY_AFTER_SECONDS": "1",
        # Its workloads are small; several engines share the machine's memory during the session.
        "SSB_KV_CACHE_GIB": "0.5",
        # The suite's adapters have rank 8 at most; on a CPU a smaller bound makes every request faster.
        "SSB_MAX_LORA_RANK": "8",
    }
    command = [sys.executable, "-m", "cli.main", "serve", "teacher", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--adapters-dir", str(adapters_dir), "--log-level", "info", "--lora" if lora else "--no-lora"]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path)
        yield TeacherServer(url, process, adapters_dir, log_path)
    finally:
        stop_and_check_nothing_left(process, log_path)


def stop_and_check_nothing_left(process: subprocess.Popen, log_path: Path) -> None:
    """SIGTERM the service; it and every process it started (the engine core, its workers) must be gone."""
    if process.poll() is not None:
        return
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGTERM)
    try:
        returncode = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    _, alive = psutil.wait_procs(family, timeout=30)
    names = [f"{p.pid} {p.name()}" for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for leftover in alive:
        leftover.kill()
    assert not names, f"processes left after SIGTERM: {names}"
    assert len(family) >= 2, "the service started no engine process"
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status is -SIGTERM.
    assert returncode in (0, -signal.SIGTERM), f"exit status {returncode}:\n{log_path.read_text()[-3000:]}"
    log = log_path.read_text(errors="replace")
    assert "Application shutdown complete" in log and "engine shut down" in log, log[-3000:]
