"""Runs a `cli.topology` plan as local processes: starts them in order, prefixes every line they print with their
name, tells when they all answer, and stops them all, leaving no process behind.

Each process starts in a session (and so a process group) of its own: a Ctrl-C at the terminal reaches only
`ssb up`, which then stops the processes itself. A stop sends SIGTERM to the process's group (vLLM's engine core and
workers with it), waits up to `stop_timeout` seconds for a graceful exit, then SIGKILLs whatever is left in the
session: also what moved to a group of its own (RQ forks each job's work horse into a new group, and a worker's warm
shutdown waits for it). Redis stops last, after the processes that use it. Should the supervisor itself die without
a stop (SIGKILL, the OOM killer), the kernel sends each process (not its group) SIGTERM at once, Redis too, and no
SIGKILL follows: each service and worker ends as it does on SIGTERM, taking what it started with it.

    with Supervisor(topology.processes) as supervisor:
        supervisor.start()
        ...                              # poll supervisor.exited() and supervisor.readiness()
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TextIO
from urllib.parse import urlsplit

import psutil

from cli.topology import ProcessSpec
from shared.processes import die_with_parent

HURRIED_GRACE_SECONDS = 1.0  # after `hurry`: Redis, stopped last, still gets to write its append-only file


class StartError(RuntimeError):
    """A process could not be started, or one that others wait for never became ready."""


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on `host:port`; `host` IPv4 or IPv6. OSError when nothing could listen
    there (a host that is no address of this machine, or a name that resolves to none; a port it may not take)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe(url: str, timeout: float = 2.0) -> tuple[bool, str | None]:
    """(ready, why it failed to start for good) of the service at `url`, in one request. `http(s)://...` (its
    `/readyz`): ready on 200; failed on a 503 of type `start_failed` (a teacher whose engine could not be built), with
    its message. `redis://...`: ready when it answers PING. Anything short of an answer: not ready yet."""
    from shared.teacher_api import START_FAILED

    try:
        if urlsplit(url).scheme.startswith("redis"):
            import redis

            return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping()), None
        import httpx

        response = httpx.get(url, timeout=timeout)
        error = response.json().get("error") if response.status_code == 503 else None
    except Exception:  # noqa: BLE001 (anything short of an answer means not ready yet)
        return False, None
    if isinstance(error, dict) and error.get("type") == START_FAILED:
        return False, str(error.get("message") or "no reason given")
    return response.status_code == 200, None


def is_ready(url: str, timeout: float = 2.0) -> bool:
    """Whether the service at `url` answers ready (`probe`)."""
    return probe(url, timeout)[0]


def session_members(sid: int) -> list[psutil.Process]:
    """The living processes of session `sid` (zombies, already dead, do not count)."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getsid(process.pid) == sid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


class Supervisor:
    """Starts, watches and stops the processes of `specs` (in order); a context manager that always stops them."""

    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        *,
        out: TextIO | None = None,
        stop_timeout: float = 30.0,
        pass_fds: Sequence[int] = (),
    ):
        self.specs = list(specs)
        self.out = out or sys.stdout
        self.stop_timeout = stop_timeout
        self.pass_fds = tuple(pass_fds)  # open in every process started (e.g. a lock they then hold too)
        self.processes: dict[str, subprocess.Popen] = {}
        self._width = max((len(spec.name) for spec in self.specs), default=0)
        self._print_lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._stopping = False
        self._hurried = False
        self._output_lost = False

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def say(self, name: str, text: str) -> None:
        """One line out, prefixed with `name` (`line`)."""
        self.line(f"{name:<{self._width}} | {text}")

    def line(self, text: str) -> None:
        """One whole line out, never mixed with another's; once the output is gone (a closed terminal, a dead pipe)
        lines are dropped, so that neither stopping the processes nor draining their output depends on it."""
        with self._print_lock:
            if self._output_lost:
                return
            try:
                self.out.write(f"{text}\n")
                self.out.flush()
            except (OSError, ValueError):  # EIO, EPIPE; ValueError: the stream was closed
                self._output_lost = True

    def start(self, ready_timeout: float = 60.0, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Start every process in order; after one marked `ready_before_the_rest`, wait until it is ready. Once
        `cancelled()` is true (a stop was asked for meanwhile), return at once, the rest not started."""
        for spec in self.specs:
            if cancelled():
                return
            self._start_one(spec)
            if spec.ready_before_the_rest:
                deadline = time.monotonic() + ready_timeout
                while not is_ready(spec.ready_url, timeout=0.5):
                    if cancelled():
                        return
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
                pass_fds=self.pass_fds,
                preexec_fn=functools.partial(die_with_parent, os.getpid(), signal.SIGTERM),
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

    def readiness(self) -> tuple[bool, tuple[str, str] | None]:
        """Whether every process with a `ready_url` answers ready, and the first that says it failed to start for
        good, with why (None while none does): one request to each."""
        ready = True
        for spec in self.specs:
            if spec.ready_url:
                up, failed = probe(spec.ready_url)
                if failed is not None:
                    return False, (spec.name, failed)
                ready = ready and up
        return ready, None

    def hurry(self) -> None:
        """Cut the grace period short: what is left of each session is SIGKILLed a second after its SIGTERM, or now
        if that second has passed (a second Ctrl-C during a stop); safe to call from a signal handler."""
        self._hurried = True

    def stop(self) -> None:
        """SIGTERM every process group (Redis last), SIGKILL what is left of each session after `stop_timeout` (a
        second after its SIGTERM at most, after `hurry`); idempotent."""
        if self._stopping:
            return
        self._stopping = True
        last = [spec.name for spec in self.specs if spec.ready_before_the_rest]
        first = [name for name in self.processes if name not in last]
        self._stop_sessions(first)
        self._stop_sessions([name for name in last if name in self.processes])
        for reader in self._readers:
            reader.join(timeout=5)

    def _stop_sessions(self, names: list[str]) -> None:
        leaders = {name: self.processes[name].pid for name in names}  # each leads its own session and group
        for name in reversed(names):
            try:
                os.killpg(leaders[name], signal.SIGTERM)
            except ProcessLookupError:
                pass
        signalled = time.monotonic()
        while time.monotonic() - signalled < (
            min(HURRIED_GRACE_SECONDS, self.stop_timeout) if self._hurried else self.stop_timeout
        ):
            for name in names:
                self.processes[name].poll()  # reap the leader, so that only the living count
            if not any(session_members(sid) for sid in leaders.values()):
                break
            time.sleep(0.2)
        for name, sid in leaders.items():
            left = session_members(sid)
            if left:
                when = "at a second signal" if self._hurried else f"{self.stop_timeout:.0f} s after SIGTERM"
                self.say(name, f"still running {when}: SIGKILL")
            for process in left:
                try:
                    process.kill()  # psutil checks first that the pid is still this process, not a reused one
                except psutil.NoSuchProcess:
                    pass
        for name in names:
            try:
                self.processes[name].wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.say(name, "did not exit after SIGKILL")
