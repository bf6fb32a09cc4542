"""`ssb eval`: pass@1 and mean@n of the base model and any LoRA adapters on one benchmark, as a table and a JSON file.

    ssb eval --benchmark math500 --limit 50
    ssb eval --benchmark aime24 --adapter runs/adapter --samples 8
    ssb eval --benchmark held_out.jsonl --adapter runs/a --adapter runs/b --max-tokens 256

The benchmark is a packaged name (`gsm8k` is the GSM8K test split, `gsm8k_train` its training split, `math500`,
`aime24`) or a `.jsonl`/`.parquet` file with a question and an answer per row. The base model is always evaluated first,
then each `--adapter` (a PEFT adapter directory). On a CPU each adapter is merged into a temporary copy of the base
weights, which the same engine then loads in place of its own, to answer at the base model's speed (the CPU build of
vLLM runs a LoRA several times slower, and a large LoRA batch can outlast its step timeout), and an evaluation with
adapters computes in float32, since rounding merged weights to bfloat16 loses most of a small adapter's update; on a GPU
the engine serves each as a LoRA (`--adapter-serving` chooses). Everything is checked before the engine starts; a bad
benchmark, file or adapter exits with status 2 and one message. The logic lives in `services/evaluation/evaluation.py`.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Annotated, NamedTuple, Optional

import typer

from cli.runtime import (
    ModelOption,
    WorkedExampleOption,
    check_fits_context,
    check_output_path,
    config_from_options,
    console,
    engine_reporting,
    ensure_model,
    exit_on_signals,
    fail,
    progress_bar,
    resolve_worked_example,
)
from cli.serve_command import TeacherUrlOption, open_teacher
from services.evaluation.evaluation import (
    EvalConfig,
    EvalReport,
    as_merged_adapter,
    combine_reports,
    evaluate,
    render_table,
)
from shared.models import model_name, needs_worked_example
from shared.settings import Settings
from shared.storage import replace_atomically
from shared.teacher_api import ADAPTER_NAME_PATTERN


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


def check_adapter_name(name: str) -> str:
    """An adapter given with `--teacher-url`: a name in the teacher's adapters directory, not a path here."""
    if not re.fullmatch(ADAPTER_NAME_PATTERN, name):
        raise ValueError(
            f"--adapter {name}: with --teacher-url an adapter is named as in the teacher's adapters directory "
            f"(SSB_ADAPTERS_DIR there; letters, digits, '.', '_' and '-'), not given by a path"
        )
    return name


def check_answer_room(max_tokens: int, context: int, whose: str, setting: str) -> None:
    """Refuse (ValueError) an answer limit that leaves no token of the engine's context for the prompt."""
    if max_tokens >= context:
        raise ValueError(
            f"--max-tokens {max_tokens} leaves no room for the prompt in {whose} {context} tokens {setting}"
        )


def check_adapter(path: Path) -> tuple[str, dict]:
    """The adapter directory's resolved path and its config, or ValueError saying why it is no LoRA adapter."""
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
    if not isinstance(config.get("rank_pattern") or {}, dict):
        raise ValueError(f"adapter {config_file}: rank_pattern is not an object of module names and ranks")
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError(f"adapter {path}: no adapter_model.safetensors (or .bin) in it")
    return str(path.resolve()), config


def adapter_rank(config: dict) -> int:
    """The largest rank among an adapter's LoRAs: its `r` and `rank_pattern` overrides (one missing, or no number, is
    left to vLLM's own check, which refuses it)."""
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    return max((math.ceil(r) for r in ranks if isinstance(r, (int, float)) and not isinstance(r, bool)), default=1)


def lora_engine_rank(adapters: list[tuple[str, dict]]) -> int:
    """The largest LoRA rank an engine serving these adapters (paths and configs) is built for: the smallest of vLLM's
    bounds that fits them all. ValueError naming an adapter vLLM would not serve as a LoRA with it."""
    from services.teacher.settings import lora_rank_bound

    bound = lora_rank_bound(max(adapter_rank(config) for _, config in adapters))
    for path, config in adapters:
        check_servable_as_lora(Path(path), config, bound)
    return bound


def check_mergeable(what: str, model_path: str, lora: dict) -> None:
    """Refuse (ValueError) a LoRA that cannot be merged into `model_path`'s weights: one on an input embedding the
    output layer shares (`lora`: an adapter's config, or a run's target modules)."""
    from services.teacher.merging import targets_a_tied_embedding, tied_embedding_refusal

    if targets_a_tied_embedding(model_path, lora):
        raise ValueError(tied_embedding_refusal(what, model_path))


def check_servable_as_lora(path: Path, config: dict, max_rank: int) -> None:
    """ValueError naming what of the adapter's config vLLM does not serve as a LoRA (by vLLM's own check: a rank above
    `max_rank`, DoRA, bias terms, whole modules saved beside the LoRA, ...), before the engine starts, not
    at its first request, after the base model's whole evaluation. Merged into the weights, PEFT applies it all."""
    from vllm.config import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    try:
        PEFTHelper.from_dict(config).validate_legal(LoRAConfig(max_lora_rank=max_rank))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"adapter {path}: vLLM does not serve it as a LoRA ({exc}); serve it merged (--adapter-serving merged)"
        ) from exc


AdapterServingOption = Annotated[
    str,
    typer.Option(
        "--adapter-serving",
        help="How adapters are served: merged (into a copy of the base weights, which the engine loads in place of "
        "its own: the base model's speed), lora (beside the base weights in one engine), or auto: on a CPU merged, "
        "with the evaluation in float32 (the CPU build of vLLM runs a LoRA several times slower, and rounding merged "
        "weights to bfloat16 would lose most of a small adapter's update), on a GPU lora. With SSB_DTYPE set, auto "
        "merges in float32 and serves a LoRA in other dtypes.",
    ),
]


class AdapterServing(NamedTuple):
    """How an evaluation with adapters runs: `how` (merged or lora) and the engine's dtype setting for it."""

    how: str
    dtype: str


def resolve_adapter_serving(serving: str, dtype: str) -> AdapterServing:
    """How adapters are served, and in which dtype the evaluation's engine computes (`dtype` is `SSB_DTYPE`).

    Merged weights are rounded to the engine's dtype as a whole: in bfloat16 that changed the demo's adapter's update
    by 92% (`Merged.update_error`, services/teacher/merging.py), where a LoRA keeps the update in a path of its own; in
    float32 by less than 1e-4. And the CPU build of vLLM runs a LoRA 7-10x slower than the base model. So `auto`, with
    the dtype left to the machine, merges on a CPU and evaluates in float32 (the base model too, so that both are
    measured in one dtype; a CPU with BF16 computes float32 somewhat slower), and serves a LoRA on a GPU; with a dtype
    given it merges in float32 and serves a LoRA in any other. `merged` and `lora` keep the dtype as given."""
    if serving not in ("auto", "merged", "lora"):
        raise ValueError(f"--adapter-serving {serving!r}: use auto, merged or lora")
    if serving != "auto":
        return AdapterServing(serving, dtype)
    if dtype != "auto":
        return AdapterServing("merged" if dtype == "float32" else "lora", dtype)
    import torch

    return AdapterServing("lora", dtype) if torch.cuda.is_available() else AdapterServing("merged", "float32")


def evaluate_with_progress(
    problems, engine, config: EvalConfig, adapters: list, label: str, *, what: str | None = None
) -> EvalReport:
    """`evaluate` on one engine with a progress bar over every model it answers for (`what`, else the benchmark),
    moving as the engine finishes answers inside a batch, not only between batches."""
    with progress_bar("model") as progress:
        task = progress.add_task(f"evaluating {what or label}", total=len(problems) * len(adapters), model="")
        finished: dict[str, int] = {}

        def show_progress(name: str, done: int, total: int) -> None:
            finished[name] = done
            progress.update(task, completed=sum(finished.values()), model=name if len(adapters) > 1 else "")

        def on_sequences(done_in_call: int, in_call: int) -> None:
            # The models run one after another, in batches of `batch_size` problems; counted in problems, a batch's
            # share is exact with one sample per problem.
            done = sum(finished.values())
            batch = min(config.batch_size, len(problems) - done % len(problems))
            progress.update(task, completed=done + batch * done_in_call // max(in_call, 1))

        with engine_reporting(engine, on_sequences):
            return evaluate(problems, engine, config, adapters=adapters, benchmark=label, on_progress=show_progress)


def evaluate_merged_adapter(
    problems, adapter: str, model_path: str, engine, config: EvalConfig, label: str
) -> EvalReport:
    """Evaluate one adapter merged into a temporary copy of the base weights `model_path`, which `engine` (an engine
    without LoRA support, on that base model or an earlier merge) loads in place of its weights and keeps. In an engine
    that computes in bfloat16, a note says how much of the adapter's update the rounded weights lose, when it is more
    than a percent (services/teacher/merging.py)."""
    from services.teacher.merging import merge_adapter

    dtype = engine.dtype
    with tempfile.TemporaryDirectory(prefix="ssb-merged-") as merged_dir:
        with console.status(f"Merging {Path(adapter).name} into a copy of the base weights..."):
            merged = merge_adapter(adapter, model_path, merged_dir, dtype)
            engine.load_weights(merged.path)
    if merged.update_error > 0.01:
        console.print(
            f"note: the engine computes in {dtype}, and rounding the merged weights to it changes the adapter's update "
            f"by {merged.update_error:.0%} (relative); for an exact comparison, --adapter-serving lora (slower on a "
            "CPU) or SSB_DTYPE=float32"
        )
    what = f"{label} ({Path(adapter).name}, merged)"
    report = evaluate_with_progress(problems, engine, config, [None], label, what=what)
    return as_merged_adapter(report.model_copy(update={"model": model_path}), adapter)


def eval_command(
    benchmark: Annotated[
        str,
        typer.Option(
            "--benchmark",
            help="gsm8k (test split), gsm8k_train (training split), math500, aime24, or a .jsonl/.parquet problem "
            "file.",
        ),
    ],
    model: ModelOption = None,
    adapter: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--adapter",
            help="A PEFT LoRA adapter directory (with --teacher-url, its name in the teacher's adapters directory); "
            "repeat for several. The base model always runs first.",
        ),
    ] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N problems.")] = None,
    samples: Annotated[
        int, typer.Option("--samples", min=1, max=64, help="Samples per problem for mean@n (1: greedy pass@1 only).")
    ] = _default("samples"),
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.01, max=2.0, help="Sampling temperature for mean@n.")
    ] = _default("temperature"),
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Longest response, in tokens.")] = _default(
        "max_tokens"
    ),
    worked_example: WorkedExampleOption = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the per-problem sampling.")] = _default("seed"),
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="JSON report with per-problem results (default: runs/eval-BENCHMARK.json)."),
    ] = None,
    adapter_serving: AdapterServingOption = "auto",
    teacher_url: TeacherUrlOption = None,
) -> None:
    """pass@1 (greedy) and mean@n of the base model and each adapter on a benchmark: a table and a JSON report."""
    from shared.datasets import DatasetError, load_problems

    settings = Settings()
    try:
        check_benchmark(benchmark)
        found, lora_rank = [], None  # local adapters (paths and configs); the rank a local LoRA engine serves
        if teacher_url:  # adapters are names in the service's adapters directory, served as LoRAs there
            adapters, serving = [check_adapter_name(str(path)) for path in adapter or []], "lora"
        else:
            serving, dtype = resolve_adapter_serving(adapter_serving, settings.dtype)
            found = [check_adapter(path) for path in adapter or []]
            adapters = [path for path, _ in found]
            if found and serving == "lora":  # merged: any rank
                lora_rank = lora_engine_rank(found)
            if adapters:  # the base model and the adapters in one dtype
                settings = settings.model_copy(update={"dtype": dtype})
        if not teacher_url:  # a teacher's context is its own: checked once it answers
            check_answer_room(max_tokens, settings.max_model_len, "the engine's", "(SSB_MAX_MODEL_LEN)")
        problems = load_problems(benchmark, limit=limit)
        config = config_from_options(EvalConfig, dict(
            samples=samples,
            temperature=temperature,
            max_tokens=max_tokens,
            worked_example=resolve_worked_example(worked_example, model),
            seed=seed,
        ))
        label = benchmark_label(benchmark)
        out = out or Path("runs") / f"eval-{label}.json"
        check_output_path(out, directory=False)
        model_path = None if teacher_url else ensure_model(model, settings)
        if model_path is not None:
            check_fits_context(problems, model_path, settings, answer_tokens=max_tokens,
                               worked_example=config.worked_example)
        if serving == "merged":  # said now, not after the base model's whole evaluation
            for path, lora in found:
                check_mergeable(f"adapter {path}", model_path, lora)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc

    with exit_on_signals():
        lora = serving == "lora" and bool(adapters)
        with open_teacher(
            teacher_url, model_path, settings, seed=seed, enable_lora=lora, max_lora_rank=lora_rank
        ) as engine:
            model_path = model_path or engine.model_name
            if teacher_url:
                try:
                    context = engine.served().max_model_len
                    check_answer_room(max_tokens, context, "the teacher's", "(its SSB_MAX_MODEL_LEN)")
                except ValueError as exc:
                    raise fail(str(exc)) from exc
            if teacher_url and worked_example is None:  # the teacher's model decides, not --model
                config = config.model_copy(update={"worked_example": needs_worked_example(engine.model_name)})
            lora_adapters = adapters if serving == "lora" else []
            if teacher_url:  # an adapter the teacher lacks: said now, not after the base model's whole evaluation
                for name in lora_adapters:
                    engine.ensure_adapter(name)
            reports = [evaluate_with_progress(problems, engine, config, [None, *lora_adapters], label)]
            if serving == "merged":
                reports += [
                    evaluate_merged_adapter(problems, adapter_path, model_path, engine, config, label)
                    for adapter_path in adapters
                ]
    eval_report = combine_reports(reports)

    replaced = out.exists()  # the default path is one per benchmark: an evaluation of other models replaces it
    replace_atomically(out, eval_report.model_dump_json(indent=2))
    console.print(render_table(eval_report, title=f"{label}: {len(problems)} problems, {model_name(model_path)}"))
    for row in eval_report.rows:
        console.print(
            f"{row.name}: {row.correct}/{row.problems} greedy correct, {row.ungradeable} ungradeable, "
            f"{row.truncated} cut at --max-tokens, {row.mean_response_tokens:.0f} tokens on average, "
            f"{row.seconds:.1f} s"
        )
    if len(eval_report.rows) > 1:
        print_paired_comparison(eval_report)
    console.print(f"per-problem results in {out}" + (" (it replaced the report that was there)" if replaced else ""))


def print_paired_comparison(report) -> None:
    """Each adapter against the base model (the report's first row) on the same problems: accuracy, answers cut off
    or ungradeable, and McNemar's exact test on the paired verdicts."""
    from shared.metrics import mcnemar

    base, *adapted = report.rows
    for row in report.rows:
        console.print(
            f"{row.name}: {row.correct}/{row.problems} right ({100 * row.pass_at_1:.1f}%), "
            f"{row.truncated} cut at the token limit, {row.ungradeable} without a gradeable answer"
        )
    for row in adapted:
        test = mcnemar(
            [p.answers[base.name].correct for p in report.problems],
            [p.answers[row.name].correct for p in report.problems],
        )
        verdict = "a real difference at the 5% level" if test.p_value < 0.05 else "not distinguishable from noise"
        console.print(
            f"{row.name} - base: {100 * test.difference:+.1f} points on {test.problems} held-out problems "
            f"(right only with the adapter: {test.only_second}, only without: {test.only_first}); "
            f"McNemar's exact p = {test.p_value:.3f}: {verdict}"
        )
