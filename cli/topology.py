"""The local topology of `ssb up`: which processes run, with which arguments and environment. Pure: nothing starts here.

The same services as docker-compose.yml, as processes on one machine:

    redis            redis-server on its own loopback port and data directory (only when SSB_REDIS_URL is not set)
    teacher          ssb serve teacher        the vLLM engine                                    :8000
    curator          ssb serve curator        datasets in, progress and pairs out                :8001
    curator-worker-i ssb worker curate        N of them: problems -> pairs through the teacher
    trainer          ssb serve trainer        runs and evaluations                               :8002
    trainer-worker   ssb worker train         training, and evaluations through the teacher

Each process is told where the others are through the same `SSB_*` variables compose sets (SSB_REDIS_URL,
SSB_TEACHER_URLS, SSB_TRAINER_URL, SSB_DATA_DIR, the hosts and ports). `cli/supervisor.py` starts and stops them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REDIS_DATABASE = 0


@dataclass(frozen=True)
class ProcessSpec:
    """One process of the topology. `env` is added to the environment it inherits; `ready_url` is polled until it
    answers (`http://.../readyz`: HTTP 200; `redis://...`: PING), None for a worker, which has nothing to ask."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    ready_url: str | None = None
    # Start nothing after this one until it is ready (Redis: every other process connects to it at start).
    ready_before_the_rest: bool = False


@dataclass(frozen=True)
class Ports:
    teacher: int = 8000
    curator: int = 8001
    trainer: int = 8002


@dataclass(frozen=True)
class Topology:
    processes: tuple[ProcessSpec, ...]
    urls: Mapping[str, str]  # teacher, curator, trainer, redis
    directories: tuple[Path, ...]  # created before anything starts

    def process(self, name: str) -> ProcessSpec:
        return next(spec for spec in self.processes if spec.name == name)


def redis_server_argv(port: int, directory: Path) -> tuple[str, ...]:
    """A Redis of the topology's own: loopback only, its append-only file in `directory` (queued jobs and the services'
    state survive a restart of `ssb up` with the same data directory), no RDB snapshots."""
    return (
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--appendonly", "yes",
        "--save", "",
        "--protected-mode", "yes",
    )  # fmt: skip


def plan_topology(
    *,
    python: str,
    data_dir: Path,
    workers: int,
    host: str = "127.0.0.1",
    ports: Ports = Ports(),
    redis_url: str | None = None,
    redis_port: int | None = None,
    model: str | None = None,
    log_level: str = "info",
) -> Topology:
    """The processes of `ssb up`, in start order.

    `redis_url`: a Redis to use (SSB_REDIS_URL); when None, one is started on `redis_port` with its files in
    DATA_DIR/redis. `python` runs the `ssb` commands (`python -m cli.main ...`: the same interpreter and install).
    `data_dir` should be absolute: every process reads it, whatever its working directory.
    """
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    if redis_url is None and redis_port is None:
        raise ValueError("a Redis port is needed when no Redis URL is given")
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host  # IPv6
    urls = {
        "teacher": f"http://{client_host}:{ports.teacher}",
        "curator": f"http://{client_host}:{ports.curator}",
        "trainer": f"http://{client_host}:{ports.trainer}",
        "redis": redis_url or f"redis://127.0.0.1:{redis_port}/{REDIS_DATABASE}",
    }
    shared = {
        "SSB_REDIS_URL": urls["redis"],
        "SSB_DATA_DIR": str(data_dir),
        "SSB_TEACHER_URLS": urls["teacher"],
        "SSB_TRAINER_URL": urls["trainer"],
        "PYTHONUNBUFFERED": "1",
    }
    if model:
        shared["SSB_MODEL"] = model

    def ssb(*words: str) -> tuple[str, ...]:
        return (python, "-m", "cli.main", *words, "--log-level", log_level)

    processes: list[ProcessSpec] = []
    directories = [data_dir]
    if redis_url is None:
        redis_dir = data_dir / "redis"
        directories.append(redis_dir)
        argv = redis_server_argv(redis_port, redis_dir)
        processes.append(ProcessSpec("redis", argv, ready_url=urls["redis"], ready_before_the_rest=True))
    processes.append(
        ProcessSpec(
            "teacher",
            ssb("serve", "teacher"),
            {**shared, "SSB_TEACHER_HOST": host, "SSB_TEACHER_PORT": str(ports.teacher)},
            ready_url=f"{urls['teacher']}/readyz",
        )
    )
    processes.append(
        ProcessSpec(
            "curator",
            ssb("serve", "curator"),
            {**shared, "SSB_CURATOR_HOST": host, "SSB_CURATOR_PORT": str(ports.curator)},
            ready_url=f"{urls['curator']}/readyz",
        )
    )
    processes += [ProcessSpec(f"curator-worker-{i}", ssb("worker", "curate"), shared) for i in range(1, workers + 1)]
    processes.append(
        ProcessSpec(
            "trainer",
            ssb("serve", "trainer"),
            {**shared, "SSB_TRAINER_HOST": host, "SSB_TRAINER_PORT": str(ports.trainer)},
            ready_url=f"{urls['trainer']}/readyz",
        )
    )
    processes.append(ProcessSpec("trainer-worker", ssb("worker", "train"), shared))
    return Topology(tuple(processes), urls, tuple(directories))
