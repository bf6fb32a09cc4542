"""Runs a `cli.topology` plan as local processes: starts them in order, prefixes every line they print with their
name, tells when they all answer, and stops them all, leaving no process behind.

Each process starts in a session (and so a process group) of its own: a Ctrl-C at the terminal reaches only
`ssb up`, which then stops the processes itself, and a stop reaches everything a process started (vLLM's engine core
and workers, RQ's work horses), since it is sent to the whole group: SIGTERM, up to `stop_timeout` seconds for a
graceful exit, then SIGKILL to whatever is left in the group. Redis stops last, after the processes that use it.

    with Supervisor(topology.processes) as supervisor:
        supervisor.start()
        supervisor.wait_ready(...)       # or poll supervisor.exited() and supervisor.ready()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO
from urllib.parse import urlsplit

from cli.topology import ProcessSpec


class StartError(RuntimeError):
    """A process could not be started, or one that others wait for never became ready."""


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on `host:port` (binding it would fail)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_ready(url: str, timeout: float = 2.0) -> bool:
    """`http(s)://...`: answers 200. `redis://...`: answers PING."""
    try:
        if urlsplit(url).scheme.startswith("redis"):
            import redis

            return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
        import httpx

        return httpx.get(url, timeout=timeout).status_code == 200
    except Exception:  # noqa: BLE001 (anything short of an answer means not ready yet)
        return False


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies, already dead, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil
    except ImportError:
        return True
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


class Supervisor:
    """Starts, watches and stops the processes of `specs` (in order); a context manager that always stops them."""

    def __init__(self, specs: Sequence[ProcessSpec], *, out: TextIO | None = None, stop_timeout: float = 30.0):
        self.specs = list(specs)
        self.out = out or sys.stdout
        self.stop_timeout = stop_timeout
        self.processes: dict[str, subprocess.Popen] = {}
        self._width = max((len(spec.name) for spec in self.specs), default=0)
        self._print_lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._stopping = False

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def say(self, name: str, text: str) -> None:
        with self._print_lock:
            self.out.write(f"{name:<{self._width}} | {text}\n")
            self.out.flush()

    def start(self, ready_timeout: float = 60.0) -> None:
        """Start every process in order; after one marked `ready_before_the_rest`, wait until it is ready."""
        for spec in self.specs:
            self._start_one(spec)
            if spec.ready_before_the_rest:
                deadline = time.monotonic() + ready_timeout
                while not is_ready(spec.ready_url):
                    if self.processes[spec.name].poll() is not None or time.monotonic() > deadline:
                        raise StartError(f"{spec.name} did not become ready ({spec.ready_url})")
                    time.sleep(0.1)

    def _start_one(self, spec: ProcessSpec) -> None:
        try:
            process = subprocess.Popen(
                spec.argv,
                env={**os.environ, **spec.env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise StartError(f"{spec.name}: cannot run {spec.argv[0]}: {exc}") from exc
        self.processes[spec.name] = process
        reader = threading.Thread(target=self._relay, args=(spec.name, process), daemon=True, name=f"log-{spec.name}")
        reader.start()
        self._readers.append(reader)

    def _relay(self, name: str, process: subprocess.Popen) -> None:
        for raw in iter(process.stdout.readline, b""):
            self.say(name, raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        process.stdout.close()

    def exited(self) -> tuple[str, int] | None:
        """The first process that has exited, with its status, or None while all run."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                return name, process.returncode
        return None

    def ready(self) -> bool:
        return all(is_ready(spec.ready_url) for spec in self.specs if spec.ready_url)

    def stop(self) -> None:
        """SIGTERM every process group (Redis last), SIGKILL what is left after `stop_timeout`; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        last = [spec.name for spec in self.specs if spec.ready_before_the_rest]
        first = [name for name in self.processes if name not in last]
        self._stop_groups(first)
        self._stop_groups([name for name in last if name in self.processes])
        for reader in self._readers:
            reader.join(timeout=5)

    def _stop_groups(self, names: list[str]) -> None:
        groups = {name: self.processes[name].pid for name in names}  # each leads its own session and group
        for name in reversed(names):
            self._signal_group(groups[name], signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline:
            for name in names:
                self.processes[name].poll()  # reap the leader, so that only the living count
            if not any(group_alive(pgid) for pgid in groups.values()):
                break
            time.sleep(0.2)
        for name, pgid in groups.items():
            if group_alive(pgid):
                self.say(name, f"still running {self.stop_timeout:.0f} s after SIGTERM: SIGKILL")
                self._signal_group(pgid, signal.SIGKILL)
        for name in names:
            try:
                self.processes[name].wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.say(name, "did not exit after SIGKILL")

    @staticmethod
    def _signal_group(pgid: int, signum: int) -> None:
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            pass
