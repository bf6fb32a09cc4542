"""`ssb worker ...`: the RQ workers of the distributed topology, one command per queue.

    ssb worker curate        turn queued problems into verified pairs through the teacher service (any number)
    ssb worker train         train queued runs (one at a time; one worker per GPU) and run queued evaluations

Each reads its settings from `SSB_*` environment variables (see `.env.example`) and runs until SIGTERM or Ctrl-C,
finishing or handing back the job it holds.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli.runtime import LogLevel

worker_app = typer.Typer(help="Run a queue worker.", no_args_is_help=True)


@worker_app.command("train")
def worker_train(
    queue: Annotated[
        list[str],
        typer.Option(
            "--queue",
            help="Queues to take jobs from, first has priority: `train` (training runs), `eval` (evaluations "
            "through the teacher service). Repeat it; default both.",
        ),
    ] = ["train", "eval"],  # noqa: B006 (typer reads the default; it is never mutated)
    burst: Annotated[bool, typer.Option(help="Exit once the queues are empty.")] = False,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Log level of the worker and its jobs.")
    ] = LogLevel.info,
) -> None:
    """Train queued runs from the trainer API (resuming a run whose worker died from its last checkpoint) and run
    queued evaluations through the teacher service. One job at a time, each in a child process."""
    import logging
    import subprocess
    import sys

    from cli.runtime import fail
    from services.trainer import jobs
    from services.trainer.queues import KINDS, make_worker
    from services.trainer.settings import TrainerSettings
    from shared.models import default_model_dir, is_default_model
    from shared.workers import connect_redis

    unknown = sorted(set(queue) - set(KINDS))
    if unknown:
        raise fail(f"--queue: unknown queue {', '.join(unknown)}; one of {', '.join(KINDS)}")
    settings = TrainerSettings()  # a bad variable is an error naming it (cli/main.py)
    if is_default_model(settings.model) and not (default_model_dir(settings) / "config.json").exists():
        # Pulled in a child process: this process forks a work horse per job and must not start torch's threads.
        pulled = subprocess.run([sys.executable, "-m", "cli.main", "model", "pull"])
        if pulled.returncode != 0:  # it said why
            raise fail(f"the default model could not be pulled (`ssb model pull` exited {pulled.returncode})")
    logging.getLogger("ssb").setLevel(log_level.upper())
    jobs.configure(settings)
    worker = make_worker(settings, tuple(dict.fromkeys(queue)), connect_redis(settings.redis_url))
    worker.work(burst=burst, logging_level=log_level.upper())


@worker_app.command("curate")
def worker_curate(
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty.")] = False,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Log level of the worker and its jobs.")
    ] = LogLevel.info,
) -> None:
    """Curate queued problems through the teacher service (SSB_TEACHER_URLS) into the datasets' pair stores under
    SSB_DATA_DIR. Any number of these, on any machine that reaches Redis, the teacher and the data volume; each job
    runs in a child process, and a job whose worker died is taken over by another."""
    import logging

    from services.curator.jobs import run_worker
    from services.curator.settings import CuratorSettings

    settings = CuratorSettings()  # a bad variable: one line naming it (cli/main.py's `main`)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    run_worker(settings, burst=burst)
