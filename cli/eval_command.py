"""`ssb eval`: pass@1 and mean@n of the base model and any LoRA adapters on one benchmark, as a table and a JSON file.

    ssb eval --benchmark math500 --limit 50
    ssb eval --benchmark aime24 --adapter runs/adapter --samples 8
    ssb eval --benchmark held_out.jsonl --adapter runs/a --adapter runs/b --max-tokens 256 --worked-example

The benchmark is a packaged name (`gsm8k` is the GSM8K test split, `math500`, `aime24`) or a `.jsonl`/`.parquet` file
with a question and an answer per row. The base model is always evaluated first, then each `--adapter` (a PEFT adapter
directory, loaded by the engine as a LoRA, not merged). Everything is checked before the engine starts; a bad
benchmark, file or adapter exits with status 2 and one message. The logic lives in `services/evaluation/evaluation.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.runtime import ModelOption, console, ensure_model, fail, progress_bar
from cli.serve_command import TeacherUrlOption, open_teacher
from services.evaluation.evaluation import EvalConfig, evaluate, render_table
from shared.settings import Settings


def _default(name: str):
    """The option's default is EvalConfig's, so the two never disagree."""
    return EvalConfig.model_fields[name].default


def benchmark_label(benchmark: str) -> str:
    """The benchmark's short name: itself for a packaged benchmark, the file's stem for a file."""
    from shared.datasets import BENCHMARKS

    return benchmark if benchmark in BENCHMARKS else Path(benchmark).stem


def check_benchmark(benchmark: str) -> None:
    """Reject a value that is neither a packaged benchmark nor a problem file, before anything is loaded.

    Evaluation takes no Hugging Face dataset names: a mistyped benchmark must not turn into a network lookup.
    """
    from shared.datasets import BENCHMARKS, SUPPORTED_EXTENSIONS

    path = Path(benchmark).expanduser()
    if benchmark in BENCHMARKS or path.suffix.lower() in SUPPORTED_EXTENSIONS or path.exists():
        return  # load_problems explains a missing, unsupported or malformed file
    raise ValueError(
        f"unknown benchmark {benchmark!r}: use {', '.join(BENCHMARKS)}, or a {' or '.join(SUPPORTED_EXTENSIONS)} file"
    )


def check_adapter(path: Path, max_rank: int) -> str:
    """The adapter directory's resolved path, or ValueError saying why vLLM could not load it as a LoRA."""
    if not path.is_dir():
        raise ValueError(f"adapter {path}: no such directory")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"adapter {path}: no adapter_config.json in it; is this a PEFT adapter directory?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"adapter {config_file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"adapter {config_file}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {path}: peft_type is {config['peft_type']!r}; only LoRA adapters can be served")
    rank = config.get("r")
    if isinstance(rank, int) and rank > max_rank:
        raise ValueError(f"adapter {path}: LoRA rank {rank} is above the engine's maximum of {max_rank}")
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError(f"adapter {path}: no adapter_model.safetensors (or .bin) in it")
    return str(path.resolve())


def write_json_atomically(text: str, out: Path) -> None:
    """Write the whole file or nothing: a temporary file beside it replaces it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def eval_command(
    benchmark: Annotated[
        str, typer.Option("--benchmark", help="gsm8k (test split), math500, aime24, or a .jsonl/.parquet problem file.")
    ],
    model: ModelOption = None,
    adapter: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--adapter", help="A PEFT LoRA adapter directory; repeat for several. The base model always runs first."
        ),
    ] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N problems.")] = None,
    samples: Annotated[
        int, typer.Option("--samples", min=1, max=64, help="Samples per problem for mean@n (1: greedy pass@1 only).")
    ] = _default("samples"),
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.01, max=5.0, help="Sampling temperature for mean@n.")
    ] = _default("temperature"),
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Longest response, in tokens.")] = _default(
        "max_tokens"
    ),
    worked_example: Annotated[
        bool,
        typer.Option(help="Put one worked example turn before each question (as in curation; helps small models)."),
    ] = _default("worked_example"),
    seed: Annotated[int, typer.Option("--seed", help="Seeds the per-problem sampling.")] = _default("seed"),
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="JSON report with per-problem results (default: runs/eval-BENCHMARK.json)."),
    ] = None,
    teacher_url: TeacherUrlOption = None,
) -> None:
    """pass@1 (greedy) and mean@n of the base model and each adapter on a benchmark: a table and a JSON report."""
    from services.teacher.engine import EngineOptions
    from shared.datasets import DatasetError, load_problems

    settings = Settings()
    try:
        check_benchmark(benchmark)
        if teacher_url:  # adapters are names in the service's adapters directory, served as LoRAs there
            adapters = [str(path) for path in adapter or []]
        else:
            adapters = [check_adapter(path, EngineOptions.max_lora_rank) for path in adapter or []]
        if max_tokens >= settings.max_model_len:
            raise ValueError(
                f"--max-tokens {max_tokens} leaves no room for the prompt in the engine's {settings.max_model_len} "
                "tokens (SSB_MAX_MODEL_LEN)"
            )
        problems = load_problems(benchmark, limit=limit)
        config = EvalConfig(
            samples=samples, temperature=temperature, max_tokens=max_tokens, worked_example=worked_example, seed=seed
        )
        label = benchmark_label(benchmark)
        out = out or Path("runs") / f"eval-{label}.json"
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory; give a JSON file path")
        model_path = None if teacher_url else ensure_model(model, settings)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc

    models = [None, *adapters]
    with open_teacher(teacher_url, model_path, settings, seed=seed) as engine, progress_bar("model") as progress:
        model_path = model_path or engine.model_name
        task = progress.add_task(f"evaluating {label}", total=len(problems) * len(models), model="")
        finished: dict[str, int] = {}

        def show_progress(name: str, done: int, total: int) -> None:
            finished[name] = done
            progress.update(task, completed=sum(finished.values()), model=name)

        eval_report = evaluate(problems, engine, config, adapters=models, benchmark=label, on_progress=show_progress)

    write_json_atomically(eval_report.model_dump_json(indent=2), out)
    console.print(render_table(eval_report, title=f"{label}: {len(problems)} problems, {Path(model_path).name}"))
    for row in eval_report.rows:
        console.print(
            f"{row.name}: {row.correct}/{row.problems} greedy correct, {row.ungradeable} ungradeable, "
            f"{row.truncated} cut at --max-tokens, {row.mean_response_tokens:.0f} tokens on average, "
            f"{row.seconds:.1f} s"
        )
    console.print(f"per-problem results in {out}")
