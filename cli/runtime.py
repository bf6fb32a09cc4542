"""What the commands share: the resolved model, the engine start, and the rich console and progress bars."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shared.models import default_model_dir, is_default_model, resolve_model
from shared.settings import DEFAULT_MODEL, Settings

console = Console(stderr=True)

ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", help=f"The default's name ({DEFAULT_MODEL}), a local checkpoint path, or a Hugging Face id."),
]


def fail(message: str) -> typer.Exit:
    """Print one clear error line; the caller raises the returned exit (status 2)."""
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


def ensure_model(model: str | None, settings: Settings) -> str:
    """Resolve `--model`, pulling the default model first if it is not there yet."""
    if is_default_model(model) and not (default_model_dir(settings) / "config.json").exists():
        from services.teacher.checkpoints import pull_default_model

        with console.status("Pulling the default model (first use only)..."):
            pull_default_model(default_model_dir(settings))
    return resolve_model(model, settings)


def start_engine(model_path: str, settings: Settings, *, seed: int = 0):
    """Start the vLLM engine on a model (about half a minute for the small model on the CPU)."""
    from services.teacher.engine import EngineOptions, TeacherEngine

    with console.status(f"Starting the engine on {Path(model_path).name}..."):
        return TeacherEngine(
            EngineOptions(
                model=model_path,
                max_model_len=settings.max_model_len,
                max_logprobs=settings.max_logprobs,
                kv_cache_gib=settings.kv_cache_gib,
                seed=seed,
            )
        )


def progress_bar(*extra_fields: str) -> Progress:
    """A progress bar with counts, elapsed and remaining time, and the named extra fields shown after the bar."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{{task.fields[{name}]}}") for name in extra_fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def print_funnel(funnel, out: Path) -> None:
    """The end-of-run summary: how many problems reached each stage."""
    table = Table(title="Curation funnel", show_header=True)
    table.add_column("stage")
    table.add_column("problems", justify="right")
    table.add_row("problems", str(funnel.problems))
    table.add_row("already done (skipped)", str(funnel.skipped))
    table.add_row("with a mix of right and wrong", str(funnel.with_mix))
    table.add_row("explained", str(funnel.explained))
    table.add_row("verified pairs written", str(funnel.pairs))
    for reason, count in sorted(funnel.dropped.items()):
        table.add_row(f"dropped: {reason}", str(count))
    console.print(table)
    console.print(
        f"rollouts: {funnel.rollout_tokens:,} tokens in {funnel.rollout_seconds:.1f} s "
        f"({funnel.rollout_tokens / max(funnel.rollout_seconds, 1e-9):,.0f} tok/s); pairs in {out}"
    )
