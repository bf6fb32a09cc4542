"""`ssb serve teacher`: the teacher service (services/teacher/app.py) on uvicorn; `ssb serve trainer`: the trainer
API (services/trainer/app.py).

    ssb serve teacher --port 8000 --adapters-dir runs/adapters
    ssb serve teacher --no-lora                          # base model only: on a CPU, twice as fast
    SSB_TEACHER_API_KEY=... ssb serve teacher --host 0.0.0.0
    ssb serve trainer --port 8002                        # runs and evaluations; `ssb worker train` does the work
    ssb serve curator --port 8001                        # datasets in; `ssb worker curate` does the work

Every option but `--log-level` falls back to its `SSB_*` environment variable (see `.env.example`), then to the
default; a bad variable is one error line naming it. The engine starts after the server does: `/healthz` answers at
once, `/readyz` once the model is loaded. SIGTERM or Ctrl-C stops the server and shuts the engine's processes down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.runtime import LogLevel, ModelOption, ensure_model, fail

serve_app = typer.Typer(help="Run a service.", no_args_is_help=True)


@serve_app.command("teacher")
def serve_teacher(
    model: ModelOption = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (SSB_TEACHER_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port (SSB_TEACHER_PORT; 8000).")] = None,
    adapters_dir: Annotated[
        Optional[Path], typer.Option(help="The only directory adapters load from (SSB_ADAPTERS_DIR).")
    ] = None,
    max_pending_requests: Annotated[
        Optional[int],
        typer.Option(min=1, help="Engine requests admitted at once before 429 (SSB_MAX_PENDING_REQUESTS)."),
    ] = None,
    lora: Annotated[
        Optional[bool],
        typer.Option(
            "--lora/--no-lora",
            help="Build the engine for LoRA adapters (SSB_ENABLE_LORA; on). On a CPU --no-lora runs every request "
            "about twice as fast, for a teacher that only curates.",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[LogLevel, typer.Option(case_sensitive=False, help="The log level.")] = LogLevel.info,
) -> None:
    """The teacher: rollouts, hinted explanations with top-k log-probabilities, scoring, LoRA adapters, OpenAI API."""
    import logging

    import uvicorn

    from services.teacher.app import create_app
    from services.teacher.settings import TeacherSettings

    overrides = {
        "model": model,
        "teacher_host": host,
        "teacher_port": port,
        "adapters_dir": adapters_dir,
        "max_pending_requests": max_pending_requests,
        "enable_lora": lora,
    }
    settings = TeacherSettings(**{name: value for name, value in overrides.items() if value is not None})
    try:
        ensure_model(settings.model, settings)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc
    service_log = logging.getLogger("ssb")
    service_log.setLevel(log_level.upper())
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    service_log.addHandler(handler)
    server: uvicorn.Server | None = None

    def end_the_server() -> bool:  # the engine died: the teacher ends with status 1, to be started again
        if server.should_exit:  # stopping already (a signal, which reached the engine too)
            return False
        server.should_exit = True
        return True

    app = create_app(settings, on_engine_death=end_the_server)
    config = uvicorn.Config(app, host=settings.teacher_host, port=settings.teacher_port, log_level=log_level.value,
                            timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    server.run()
    if app.state.engine_died:
        raise typer.Exit(1)


@serve_app.command("trainer")
def serve_trainer(
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (SSB_TRAINER_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port (SSB_TRAINER_PORT; 8002).")] = None,
    log_level: Annotated[LogLevel, typer.Option(case_sensitive=False, help="The log level.")] = LogLevel.info,
) -> None:
    """The trainer API: queue LoRA training runs and evaluations (done by `ssb worker train`), read their progress,
    metrics, curves, adapters and accuracy tables."""
    import uvicorn

    from services.trainer.app import create_app
    from services.trainer.settings import TrainerSettings

    overrides = {"trainer_host": host, "trainer_port": port}
    settings = TrainerSettings(**{name: value for name, value in overrides.items() if value is not None})
    add_service_log_handler("ssb", log_level.value)
    uvicorn.run(
        create_app(settings),
        host=settings.trainer_host,
        port=settings.trainer_port,
        log_level=log_level.value,
        timeout_graceful_shutdown=30,
    )


def add_service_log_handler(name: str, level: str) -> None:
    """The service's own log lines (`ssb.*` loggers) beside uvicorn's, in its format."""
    import logging

    service_log = logging.getLogger(name)
    service_log.setLevel(level.upper())
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    service_log.addHandler(handler)


@serve_app.command("curator")
def serve_curator(
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (SSB_CURATOR_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port (SSB_CURATOR_PORT; 8001).")] = None,
    log_level: Annotated[LogLevel, typer.Option(case_sensitive=False, help="The log level.")] = LogLevel.info,
) -> None:
    """The curator's intake API: datasets in over HTTP, one RQ job per batch of problems, status and pairs out."""
    import uvicorn

    from services.curator.app import create_app
    from services.curator.settings import CuratorSettings

    overrides = {"curator_host": host, "curator_port": port}
    settings = CuratorSettings(**{name: value for name, value in overrides.items() if value is not None})
    uvicorn.run(create_app(settings), host=settings.curator_host, port=settings.curator_port, log_level=log_level.value)


TeacherUrlOption = Annotated[
    Optional[str],
    typer.Option(
        "--teacher-url",
        help="Use a running teacher service (`ssb serve teacher`) instead of starting an engine here; its key, if "
        "any, comes from SSB_TEACHER_API_KEY.",
    ),
]

# How long a command waits for a teacher URL where no teacher answers (one started moments ago binds its port within
# seconds, or once it has pulled the default model on first use; its engine then loads while /readyz answers 503,
# waited for up to five minutes).
TEACHER_UNREACHABLE_SECONDS = 120.0


def open_teacher(teacher_url: str | None, model_path: str | None, settings, **engine_options):
    """The engine a command runs on: the teacher service at `teacher_url` (waiting until it is ready), else an engine
    started in this process on `model_path` with `engine_options`. Either is a context manager and an `Engine`."""
    from cli.runtime import checked_url, console, start_engine
    from shared.settings import ServiceSettings
    from shared.teacher_client import TeacherClient

    if teacher_url is None:
        return start_engine(model_path, settings, **engine_options)
    url = checked_url(teacher_url, "--teacher-url")
    client = TeacherClient(url, api_key=ServiceSettings().teacher_key())  # a key set but empty: refused
    with console.status(f"Waiting for the teacher at {teacher_url}..."):
        if not console.is_terminal:
            console.print(f"Waiting for the teacher at {teacher_url}...")
        try:
            client.wait_ready(unreachable_seconds=TEACHER_UNREACHABLE_SECONDS)
        except BaseException:
            client.close()
            raise
    return client
