"""The real teacher service for the test session (the `teacher_server` fixture in tests/conftest.py, for every test that
needs it): `ssb serve teacher` as its own process on a loopback port, on the real small model with the CPU build of
vLLM, started once, with a bearer key, a small admission bound (so 429 is cheap to reach), a 1 MiB limit on request
bodies and, for the one built for LoRA, an adapters directory holding one tiny LoRA adapter. The session starts the
ones its tests need before the first test (`start_early`), so that their start overlaps other tests; each fixture
claims its own and waits until it is ready. On teardown it gets SIGTERM, and the test asserts that it and every
process it started are gone.
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

from tests.processes import kill_leftovers

API_KEY = "test-key-7f3a"
MAX_PENDING_REQUESTS = 16
MAX_REQUEST_BYTES = 2**20  # far above what the tests send, but for the one about it
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


# The services started before the first test (`start_early`), by whether they are built for LoRA, until a fixture
# claims them.
_started_early: dict[bool, TeacherServer] = {}


def begin_teacher_server(model_path: str, tmp_path_factory, *, lora: bool) -> TeacherServer:
    """Start the service as its own process (its engine built for LoRA adapters, or not: `--no-lora`); return at once,
    before it is ready."""
    root = tmp_path_factory.mktemp("lora-teacher" if lora else "teacher")
    adapters_dir = root / "adapters"
    adapters_dir.mkdir()
    port = free_port()
    log_path = root / "serve.log"
    env = {
        **os.environ,
        "SSB_TEACHER_API_KEY": API_KEY,
        "SSB_MAX_PENDING_REQUESTS": str(MAX_PENDING_REQUESTS),
        "SSB_RETRY_AFTER_SECONDS": "1",
        "SSB_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        # Its workloads are small; several engines share the machine's memory during the session.
        "SSB_KV_CACHE_GIB": "0.5",
        # The suite's adapters have rank 8 at most; on a CPU a smaller bound makes every request faster.
        "SSB_MAX_LORA_RANK": "8",
    }
    command = [sys.executable, "-m", "cli.main", "serve", "teacher", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--adapters-dir", str(adapters_dir), "--log-level", "info", "--lora" if lora else "--no-lora"]
    with open(log_path, "wb") as log_file:
        # At the lowest priority: while it starts early, it takes only the CPU the tests leave idle (an engine's
        # threads, bound to every core, slow down whole when another process takes a core from one of them).
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19)
        )
    return TeacherServer(f"http://127.0.0.1:{port}", process, adapters_dir, log_path)


def start_early(model_path: str, tmp_path_factory, *, lora: bool) -> None:
    """Start the service now, for its fixture to claim later: its start (about 15 s, mostly one core importing) then
    overlaps the tests that run before, which leave a core idle for much of their time."""
    _started_early[lora] = begin_teacher_server(model_path, tmp_path_factory, lora=lora)


def stop_unclaimed() -> None:
    """Stop the services started early that no fixture claimed (a run stopped early, say), ready or not, and their
    children."""
    while _started_early:
        _, server = _started_early.popitem()
        try:
            parent = psutil.Process(server.process.pid)
            family = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:  # it already ended
            continue
        server.process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=60)
        for leftover in alive:
            leftover.kill()


def start_teacher_server(model_path: str, tmp_path_factory, *, lora: bool) -> Iterator[TeacherServer]:
    """The service started early, or started now; yielded when ready (the one built for LoRA with the tiny adapter
    `tiny` in its adapters directory, which it reads on request), stopped on exit, and checked that nothing is left."""
    server = _started_early.pop(lora, None) or begin_teacher_server(model_path, tmp_path_factory, lora=lora)
    try:
        if lora:
            write_tiny_adapter(model_path, server.adapters_dir / "tiny")
        wait_ready(server.url, server.process, server.log_path)
        yield server
    finally:
        stop_and_check_nothing_left(server.process, server.log_path)


def stop_and_check_nothing_left(process: subprocess.Popen, log_path: Path) -> None:
    """SIGTERM the service; it and every process it started (the engine core, its workers) must be gone."""
    if process.poll() is not None:
        return
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGTERM)
    try:
        returncode = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        returncode = None
    names = kill_leftovers(family, timeout=30)
    assert returncode is not None, f"still running 60 s after SIGTERM:\n{log_path.read_text()[-3000:]}"
    assert not names, f"processes left after SIGTERM: {names}"
    assert len(family) >= 2, "the service started no engine process"
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status is -SIGTERM.
    assert returncode in (0, -signal.SIGTERM), f"exit status {returncode}:\n{log_path.read_text()[-3000:]}"
    log = log_path.read_text(errors="replace")
    assert "Application shutdown complete" in log and "engine shut down" in log, log[-3000:]
