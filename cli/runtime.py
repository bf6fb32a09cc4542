"""What the commands share: the resolved model, the engine start, stopping on signals, and progress output.

Progress is a rich bar on a terminal; elsewhere (a log file, CI, `docker logs`) it is one plain line per task every
`SSB_PROGRESS_INTERVAL` seconds (default 30): done of total, the task's own fields, elapsed and time left.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from shared.models import default_model_dir, is_default_model, model_name, needs_worked_example, resolve_model
from shared.settings import DEFAULT_MODEL, CurationConfig, Settings

console = Console(stderr=True)
if not console.is_terminal:
    # In a log (a file, CI, `docker logs`), decided once at import: a printed line stays one line, however long,
    # instead of wrapping at 80 columns (tables still fit the width; the plain progress lines ask for it on every
    # print), and the model loaders' progress bars, one line rewritten with carriage returns, are off (set before
    # huggingface_hub or transformers is imported).
    console.soft_wrap = True
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        envvar="SSB_MODEL",
        help=f"The default's name ({DEFAULT_MODEL}), a local checkpoint path, or a Hugging Face id.",
    ),
]


WorkedExampleOption = Annotated[
    Optional[bool],
    typer.Option(
        "--worked-example/--no-worked-example",
        help=(
            "Put one worked example turn before every question, identically in rollouts, the teacher's prompt, the "
            f"student's training input and evaluation. Default: on for {DEFAULT_MODEL} (which needs it to answer in "
            "the expected form), off for other models (the paper's prompt); with `ssb curate` or `ssb eval` "
            "--teacher-url, the teacher's model decides."
        ),
        show_default=False,
    ),
]


_ATTEMPTS = CurationConfig.model_fields["explanation_attempts"]
DEFAULT_EXPLANATION_ATTEMPTS = _ATTEMPTS.default
ExplanationAttemptsOption = Annotated[
    int, typer.Option("--explanation-attempts", min=1, max=16, help=_ATTEMPTS.description)
]
_BATCH = CurationConfig.model_fields["batch_size"]
DEFAULT_BATCH_SIZE = _BATCH.default
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help=_BATCH.description)]


def resolve_worked_example(worked_example: bool | None, model: str | None) -> bool:
    """`--worked-example` as given, else the model's default (`shared.models.needs_worked_example`)."""
    return needs_worked_example(model) if worked_example is None else worked_example


def fail(message: str) -> typer.Exit:
    """Print one clear error line; the caller raises the returned exit (status 2)."""
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


Config = TypeVar("Config")


def config_from_options(
    config_class: type[Config], values: dict[str, Any], flags: dict[str, str] | None = None
) -> Config:
    """`config_class` from a command's options; a value it refuses exits (status 2) with one line naming each option
    as on the command line (`flags` for an option named otherwise than its field), not pydantic's report."""
    from pydantic import ValidationError

    try:
        return config_class(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["loc"]:
                field = str(error["loc"][0])
                message = f"{(flags or {}).get(field, '--' + field.replace('_', '-'))}: {message}"
            problems.append(message)
        raise fail("; ".join(problems)) from exc


def checked_url(url: str, flag: str) -> str:
    """A service's URL from `flag` (or its variable), without a trailing slash; exit status 2 naming it unless it is
    `http(s)://HOST[:PORT][/PATH]` (`localhost:8000`, without its scheme, would fail only at the first request)."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise fail(f"{flag} {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise fail(f"{flag} {url!r}: not a service URL; expected http://HOST:PORT (or https://)")
    return url.rstrip("/")


def ensure_model(model: str | None, settings: Settings) -> str:
    """Resolve `--model`, pulling the default model first if it is not there yet."""
    if is_default_model(model) and not (default_model_dir(settings) / "config.json").exists():
        from services.teacher.base_model import pull_default_model

        with console.status("Pulling the default model (first use only)..."):
            pull_default_model(default_model_dir(settings))
    return resolve_model(model, settings)


def check_output_path(path: Path, *, directory: bool, option: str = "--out") -> None:
    """Refuse (ValueError), before anything loads, an output path that cannot be written: a file where a directory
    goes or the other way round, a file in the way of a directory to create, or a directory without write permission.
    A command that finds out only when it writes has done its work for nothing."""
    try:
        if path.is_symlink() and not path.exists():
            raise ValueError(f"{option} {path}: a link to nothing is there")
        if path.exists() and path.is_dir() != directory:
            wanted = "a directory" if directory else "a file path"
            raise ValueError(f"{option} {path}: a {'directory' if path.is_dir() else 'file'} is there; give {wanted}")
        existing = path if directory and path.is_dir() else path.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as exc:  # e.g. a directory on the way that may not be searched
        raise ValueError(f"{option} {path}: cannot be looked at ({exc.strerror})") from exc
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: no permission to write in {existing}")


class LogLevel(str, Enum):
    """A `--log-level` (checked as the command starts, not when a logger first meets it)."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


@contextmanager
def exit_on_signals():
    """Turn SIGTERM and SIGHUP into SystemExit (status 128 + signal) while the block runs, as Ctrl-C is turned into
    KeyboardInterrupt, so that every `with` around an engine closes it and its processes whatever ends the command.
    A signal the command was started ignoring (`nohup` ignores SIGHUP) stays ignored."""

    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    caught = [signum for signum in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, leave) for signum in caught}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@functools.lru_cache(maxsize=2)
def model_tokenizer(model_path: str):
    """The model's tokenizer, as the engine loads it; a model that is neither a local checkpoint nor on the Hugging Face
    Hub (a mistyped `--model`) is a ValueError that says so."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except OSError as exc:
        raise ValueError(
            f"--model {model_path!r}: no such local directory, and not loadable from the Hugging Face Hub: "
            f"{' '.join(str(exc).split())}"
        ) from exc
    except ValueError as exc:  # a checkpoint without a usable tokenizer
        reason = " ".join(str(exc).split())
        raise ValueError(f"--model {model_path!r}: its tokenizer cannot be loaded: {reason}") from exc


def check_fits_context(
    problems, model_path: str, settings: Settings, *, answer_tokens: int, explanation_tokens: int | None = None,
    worked_example: bool,
) -> None:
    """Refuse (ValueError) problems whose prompts cannot fit the engine's context, before the engine starts: it would
    refuse them only when it comes to them, ending the command in the middle of its work. Reads the model's
    tokenizer (once per model and process), and renders each prompt as the engine will."""
    from shared.prompts import context_overflows

    overflows = context_overflows(
        model_tokenizer(model_path), problems, context=settings.max_model_len, answer_tokens=answer_tokens,
        explanation_tokens=explanation_tokens, worked_example=worked_example,
    )
    if overflows:
        shown = "\n  ".join(overflows[:10]) + (f"\n  ... and {len(overflows) - 10} more" if len(overflows) > 10 else "")
        raise ValueError(
            f"{len(overflows)} of {len(problems)} problems do not fit the engine's {settings.max_model_len}-token "
            f"context (SSB_MAX_MODEL_LEN); shorten or drop them, or lower the token limits:\n  {shown}"
        )


def check_topk(topk: int, max_logprobs: int, whose: str, option: str = "--topk") -> None:
    """Refuse (ValueError) a top-k the engine cannot return: every explanation would be refused after the rollouts."""
    if topk > max_logprobs:
        raise ValueError(
            f"{option} {topk} is above {whose} largest top-k of log-probabilities, {max_logprobs} (SSB_MAX_LOGPROBS): "
            "no explanation could be scored"
        )


def start_engine(
    model_path: str, settings: Settings, *, seed: int = 0, enable_lora: bool = True, max_lora_rank: int | None = None
):
    """Start the vLLM engine on a model (about half a minute for the small model on the CPU), built for LoRAs up to
    `max_lora_rank` where `enable_lora` (None: `EngineOptions`' default)."""
    from dataclasses import replace

    from services.teacher.engine import EngineEnvironmentError, EngineOptions, TeacherEngine

    options = EngineOptions(
        model=model_path,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_logprobs=settings.max_logprobs,
        kv_cache_gib=settings.kv_cache_gib,
        seed=seed,
        enable_lora=enable_lora,
    )
    if max_lora_rank is not None:
        options = replace(options, max_lora_rank=max_lora_rank)
    with console.status(f"Starting the engine on {model_name(model_path)}..."):
        if not console.is_terminal:
            console.print(f"Starting the engine on {model_name(model_path)}...")
        try:
            return TeacherEngine(options)
        except EngineEnvironmentError as exc:
            raise fail(str(exc)) from exc


# The share of a task done before a plain progress line estimates the time left (the first answers of an evaluation
# arrive early, the batch's long ones late: 1 of 200 after 30 s is not 1 h 40 min to go).
ESTIMATE_AFTER = 0.05


class PlainProgress:
    """Progress for output that is not a terminal: `Progress`'s `add_task`/`update`/`stop`, printed as one plain line
    per unfinished task every `interval` seconds (and once when a task finishes), from a background thread so that a
    long engine call still shows that the run is alive. A line is never wrapped, whatever its length.

        curating: 43/100 (43%) pairs 3, 132 tok/s, batch 37/165 sequences | elapsed 2:40, left ~3:32
    """

    def __init__(self, extra_fields: tuple[str, ...], interval: float):
        self.extra_fields, self.interval = extra_fields, interval
        self.tasks: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._print_periodically, name="progress", daemon=True)

    def __enter__(self) -> PlainProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        with self._lock:
            task_id = len(self.tasks)
            self.tasks[task_id] = dict(
                description=description, total=total, completed=0, fields=fields, started=time.monotonic(), done=False
            )
        return task_id

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None, **fields) -> None:
        with self._lock:
            task = self.tasks[task_id]
            if completed is not None:
                task["completed"] = completed
            if total is not None:
                task["total"] = total
            task["fields"].update(fields)
            finished = task["total"] is not None and task["completed"] >= task["total"] and not task["done"]
            if finished:
                task["done"] = True
                console.print(self.line(task), highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self._stopped.set()

    def line(self, task: dict) -> str:
        elapsed = time.monotonic() - task["started"]
        done, total = task["completed"], task["total"]
        count = f"{done:g}" if total is None else f"{done:g}/{total:g} ({100 * done / max(total, 1):.0f}%)"
        fields = ", ".join(str(task["fields"][name]) for name in self.extra_fields if task["fields"].get(name))
        left = ""
        if total and total * ESTIMATE_AFTER <= done < total:  # from fewer, a straight line says little
            left = f", left ~{format_seconds(elapsed * (total - done) / done)}"
        head = " ".join(part for part in (f"{task['description']}:", count, fields) if part)
        return f"{head} | elapsed {format_seconds(elapsed)}{left}"

    def _print_periodically(self) -> None:
        while not self._stopped.wait(self.interval):
            with self._lock:
                for task in self.tasks.values():
                    if not task["done"]:
                        console.print(self.line(task), highlight=False, soft_wrap=True)


def counted(number: int, noun: str) -> str:
    """"1 step", "2 steps"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_bar(*extra_fields: str) -> Progress | PlainProgress:
    """A progress bar with counts, elapsed and remaining time, and the named extra fields shown after the bar; plain
    lines at a steady interval when the output is not a terminal."""
    if not console.is_terminal:
        return PlainProgress(extra_fields, Settings().progress_interval)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{{task.fields[{name}]}}") for name in extra_fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def engine_reporting(engine, report: Callable[[int, int], None]) -> AbstractContextManager:
    """`report(finished, total)` as the sequences of each engine call finish, where the engine runs in this process
    (`TeacherEngine.reporting`); a teacher over HTTP answers each call whole, so progress with it moves per call."""
    from services.teacher.engine import TeacherEngine

    return engine.reporting(report) if isinstance(engine, TeacherEngine) else nullcontext()


def curate_with_progress(problems, engine, store, config):
    """Curation with a progress line of problems done, pairs kept, tokens/s, and how far the engine's current batch
    is (one batch can take minutes on a small CPU)."""
    from services.curator.curation import curate

    with progress_bar("status") as progress:
        curating = progress.add_task("curating", total=len(problems), status="")
        kept = ""  # pairs and tokens/s after the latest engine call

        def on_curation(funnel) -> None:
            nonlocal kept
            kept = f"pairs {funnel.pairs}, {funnel.tokens_per_second:,.0f} tok/s"
            progress.update(curating, completed=funnel.skipped + funnel.processed, status=kept)

        def on_sequences(finished: int, total: int) -> None:
            progress.update(curating, status=", ".join(filter(None, (kept, f"batch {finished}/{total} sequences"))))

        with engine_reporting(engine, on_sequences):
            return curate(problems, engine, store, config, on_progress=on_curation)


def print_funnel(funnel, out: Path) -> None:
    """The end-of-run summary: how many problems reached each stage."""
    table = Table(title="Curation funnel", show_header=True)
    table.add_column("stage")
    table.add_column("problems", justify="right")
    table.add_row("problems", str(funnel.problems))
    table.add_row("already done (skipped)", str(funnel.skipped))
    table.add_row("with a mix of right and wrong", str(funnel.with_mix))
    table.add_row("explained", f"{funnel.explained} ({funnel.explanation_attempts} attempts)")
    table.add_row("verified pairs written", str(funnel.pairs))
    if funnel.pairs_from_later_attempts:
        table.add_row("  of them not from the first attempt", str(funnel.pairs_from_later_attempts))
    for reason, count in sorted(funnel.dropped.items()):
        table.add_row(f"dropped: {reason}", str(count))
    console.print(table)
    console.print(
        f"generated {funnel.rollout_tokens:,} rollout and {funnel.explanation_tokens:,} explanation tokens in "
        f"{funnel.engine_seconds:.1f} s ({funnel.tokens_per_second:,.0f} tok/s); pairs in {out}"
    )
