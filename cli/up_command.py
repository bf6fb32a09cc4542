"""`ssb up`: the whole topology of docker-compose.yml as local processes on one machine (no Docker, CPU or GPU).

    ssb up                                   Redis, teacher :8000, curator :8001, 2 curator workers, trainer :8002,
                                             trainer worker; Ctrl-C stops them all
    ssb up --workers 4 --model Qwen/Qwen2.5-3B-Instruct --data-dir /srv/ssb
    ssb up --teacher-port 0 ... --ready-file up.json    (tests: free ports, and a file once every service is ready)

A Redis of its own is started (its own free port, its files in DATA_DIR/redis) unless SSB_REDIS_URL is set. Every
line a process prints comes out prefixed with its name. When every service answers /readyz, a line `ready` is printed
and `--ready-file` (if given) is written: JSON with the URLs and the process ids. Ctrl-C, SIGTERM or SIGHUP stop every
process and everything they started (exit status 128 + the signal; a second one SIGKILLs what is still left); if
one process exits by itself, the rest are stopped and the status is 1. One `ssb up` at a time uses a data directory
(a lock in it; a second is refused). The plan is `cli/topology.py`, the process handling `cli/supervisor.py`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Annotated, Optional

import typer

from cli.runtime import LogLevel, ModelOption, console, ensure_model, fail


def up_command(
    workers: Annotated[int, typer.Option("--workers", min=1, help="Curator workers.")] = 2,
    model: ModelOption = None,
    data_dir: Annotated[
        Optional[Path], typer.Option(help="The shared data directory: datasets, runs, adapters, Redis (SSB_DATA_DIR).")
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Interface the services listen on: set as their SSB_TEACHER_HOST, SSB_CURATOR_HOST and "
            "SSB_TRAINER_HOST, whatever the environment says."
        ),
    ] = "127.0.0.1",
    teacher_port: Annotated[
        Optional[int], typer.Option(min=0, max=65535, help="Teacher port (SSB_TEACHER_PORT; 8000); 0: a free one.")
    ] = None,
    curator_port: Annotated[
        Optional[int], typer.Option(min=0, max=65535, help="Curator port (SSB_CURATOR_PORT; 8001); 0: a free one.")
    ] = None,
    trainer_port: Annotated[
        Optional[int], typer.Option(min=0, max=65535, help="Trainer port (SSB_TRAINER_PORT; 8002); 0: a free one.")
    ] = None,
    redis_port: Annotated[
        int,
        typer.Option(min=0, max=65535, help="Port of the Redis started here (without SSB_REDIS_URL); 0: a free one."),
    ] = 0,
    ready_file: Annotated[
        Optional[Path], typer.Option(help="Write the URLs and process ids here (JSON) once every service is ready.")
    ] = None,
    stop_timeout: Annotated[
        float, typer.Option(min=0, help="Seconds each process has to exit after SIGTERM before SIGKILL.")
    ] = 30.0,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Log level of every service and worker.")
    ] = LogLevel.info,
) -> None:
    """Start Redis, the teacher, the curator API, N curator workers, the trainer API and the trainer worker here."""
    from cli.supervisor import StartError, Supervisor, free_port, port_in_use
    from cli.topology import Ports, plan_topology
    from services.curator.settings import CuratorSettings
    from services.teacher.settings import TeacherSettings
    from services.trainer.settings import TrainerSettings

    settings = TrainerSettings()  # as the trainer will read it (a bad variable is an error naming it: cli/main.py)
    try:
        ensure_model(model, settings)  # once, before the teacher and the trainer worker both look for it
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc
    chosen = {  # a flag (0: a free port), else the service's own variable (SSB_TEACHER_PORT, ...), else its default
        "teacher": teacher_port if teacher_port is not None else TeacherSettings().teacher_port,
        "curator": curator_port if curator_port is not None else CuratorSettings().curator_port,
        "trainer": trainer_port if trainer_port is not None else settings.trainer_port,
    }
    ports = Ports(**{name: port or free_port() for name, port in chosen.items()})
    redis_url = os.environ.get("SSB_REDIS_URL") or None
    redis_port = None if redis_url else (redis_port or free_port())
    wanted = {f"{name} port {port}": (host, port) for name, port in vars(ports).items()}
    if redis_port is not None:
        wanted[f"redis port {redis_port}"] = ("127.0.0.1", redis_port)  # its own, on the loopback
    if len({port for _, port in wanted.values()}) < len(wanted):
        raise fail(f"one port for two processes: {', '.join(wanted)}; give each its own")
    busy = []
    for name, (bind_host, port) in wanted.items():
        try:
            if port_in_use(bind_host, port):
                busy.append(name)
        except OSError as exc:  # not a port this user may take, or no address of this machine
            reason = exc.strerror or exc
            if exc.errno == errno.EACCES:
                raise fail(f"{name}: this user may not listen on it ({reason}); choose a port above 1023") from None
            raise fail(f"--host {host}: nothing can listen there ({reason})") from None
    if busy:
        raise fail(f"in use: {', '.join(busy)} (another `ssb up`?); choose others with --teacher-port and the like")
    data_root = (data_dir or settings.data_dir).resolve()
    topology = plan_topology(
        python=sys.executable,
        data_dir=data_root,
        workers=workers,
        host=host,
        ports=ports,
        redis_url=redis_url,
        redis_port=redis_port,
        model=model,
        log_level=log_level.value,
    )
    if ready_file is not None and (not ready_file.parent.is_dir() or not os.access(ready_file.parent, os.W_OK)):
        raise fail(f"--ready-file {ready_file}: {ready_file.parent} is not a directory this process can write in")
    claim = claim_data_directory(data_root)  # before anything is touched: another `ssb up` may own it
    stop = threading.Event()
    caught: list[int] = []
    running: list = []  # the supervisor, once there is one

    def on_signal(signum, _frame):
        if caught and running:  # a second signal during the stop: what is left is SIGKILLed now
            running[0].hurry()
        caught.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    status = 0
    try:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        for directory in topology.directories:
            directory.mkdir(parents=True, exist_ok=True)
        # Every process holds the lock too, so that it stays taken while any of them lives (`ssb up` killed).
        with Supervisor(topology.processes, stop_timeout=stop_timeout, pass_fds=(claim.fileno(),)) as supervisor:
            running.append(supervisor)
            _print_urls(topology, redis_started=redis_url is None)
            try:
                supervisor.start(cancelled=stop.is_set)  # a Ctrl-C meanwhile starts nothing more
            except StartError as exc:
                console.print(f"[red]{exc}[/red]")
                status = 1
                stop.set()
            announced = False
            while not stop.wait(0.5):
                if (exited := supervisor.exited()) is not None:
                    name, code = exited
                    console.print(f"[red]{name} exited with status {code}: stopping everything[/red]")
                    status = 1
                    break
                if announced:
                    continue
                ready, failed = supervisor.readiness()
                if failed is not None:
                    name, why = failed
                    console.print(f"[red]{name} failed to start ({why}): stopping everything[/red]")
                    status = 1
                    break
                if ready:
                    announced = True
                    _announce_ready(topology, supervisor, ready_file)
            console.print("stopping every process...")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        claim.close()
    if caught:
        raise typer.Exit(128 + caught[0])
    if status:
        raise typer.Exit(status)


DATA_LOCK = ".ssb-up.lock"


def claim_data_directory(data_dir: Path) -> IO:
    """The data directory for this `ssb up` alone while it runs: a second one on it (other ports, the same default
    directory) would start a second Redis on the same append-only files, and both sets of services on the same
    datasets and runs. Held by an exclusive lock on DATA_DIR/.ssb-up.lock (for a data directory on a local disk: on
    NFS a lock may not reach other hosts, nor be shared with children), which the processes `ssb up` starts hold too,
    so that the kernel lets it go once the last of them has ended, however they end; the lock's file stays."""
    import fcntl

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / DATA_LOCK, "a")  # noqa: SIM115 (held open for the life of `ssb up`)
    except OSError as exc:
        reason = exc.strerror or exc
        raise fail(f"the data directory {data_dir} (--data-dir or SSB_DATA_DIR) cannot be used ({reason})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise fail(f"{data_dir} is in use by another `ssb up`, or by processes one left (they hold "
                       f"{data_dir / DATA_LOCK}): stop them, or give this one another --data-dir") from None
        raise fail(f"cannot lock {data_dir / DATA_LOCK} ({exc.strerror}): a filesystem without locks? Give "
                   "--data-dir on a local disk") from None
    return handle


def _print_urls(topology, *, redis_started: bool) -> None:
    urls = topology.urls
    redis = f"{urls['redis']} (started here)" if redis_started else f"{urls['redis']} (SSB_REDIS_URL)"
    workers = sum(spec.name.startswith("curator-worker") for spec in topology.processes)
    console.print(
        f"teacher  {urls['teacher']}   (API reference at /docs)\n"
        f"curator  {urls['curator']}   (/docs; `ssb submit` with SSB_CURATOR_URL={urls['curator']})\n"
        f"trainer  {urls['trainer']}   (/docs)\n"
        f"redis    {redis}\n"
        f"{workers} curator worker(s), 1 trainer worker; data in {topology.process('curator').env['SSB_DATA_DIR']}",
        highlight=False,
        soft_wrap=True,
    )


def _announce_ready(topology, supervisor, ready_file: Path | None) -> None:
    supervisor.line("ready: " + " ".join(f"{name}={url}" for name, url in topology.urls.items()))
    if ready_file is not None:
        content = {**topology.urls, "pids": {name: p.pid for name, p in supervisor.processes.items()}}
        partial = ready_file.with_name(ready_file.name + ".partial")
        partial.write_text(json.dumps(content, indent=2) + "\n")
        partial.replace(ready_file)
