"""`ssb run`: the main job in one process: curate pairs, train a LoRA adapter on them, evaluate base vs adapter.

    ssb run --train train.jsonl --eval held_out.jsonl --out runs/demo

One engine curates and then answers the held-out problems with the base model; training runs in this process with every
core. The adapter is then evaluated on the same problems: on a CPU merged into a temporary copy of the base weights,
which the same engine loads in place of its own (it waits through training, idle) to answer at the base model's speed;
on a GPU as a LoRA, by an engine started after training. Merged weights keep a small adapter's update only in float32
(services/teacher/merging.py), so on a CPU that computes in bfloat16 the engine that curated closes and one in float32
evaluates the base model and the adapter (`--adapter-serving`). The end is a table of base vs adapter, how many answers
were cut off or ungradeable on each side, and McNemar's exact test on the paired verdicts. Writes `OUT/pairs/`
(curation), `OUT/adapter/` (the adapter, metrics, training curve) and `OUT/eval.json` (per-problem results). A rerun
skips problems already curated and trains again, unless `OUT/adapter/` holds an adapter or a checkpoint (`--resume`);
one whose `OUT/pairs/` holds results of other problems (another file, a smaller `--limit`) is refused. Every training
option of `ssb train` is an option here too (one definition, from `TrainConfig`); `--seed` seeds curation, training and
evaluation alike.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.eval_command import (
    AdapterServingOption,
    check_mergeable,
    evaluate_merged_adapter,
    evaluate_with_progress,
    print_paired_comparison,
    resolve_adapter_serving,
)
from cli.runtime import (
    DEFAULT_EXPLANATION_ATTEMPTS,
    ExplanationAttemptsOption,
    ModelOption,
    WorkedExampleOption,
    check_fits_context,
    check_output_path,
    check_topk,
    config_from_options,
    console,
    counted,
    curate_with_progress,
    ensure_model,
    exit_on_signals,
    fail,
    print_funnel,
    progress_bar,
    resolve_worked_example,
    start_engine,
)
from cli.train_command import build_train_config, steps_trained, training_options


@training_options(exclude={"seed"})
def run_command(
    train: Annotated[str, typer.Option("--train", help="Problems to curate and train on (file or benchmark name).")],
    eval_: Annotated[str, typer.Option("--eval", help="Held-out problems to evaluate on (file or benchmark name).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory: pairs/, adapter/ and eval.json go here.")],
    model: ModelOption = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N training problems.")] = None,
    eval_limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N held-out problems.")] = None,
    k: Annotated[int, typer.Option("--k", min=2, help="Rollouts per problem.")] = 4,
    seed: Annotated[int, typer.Option(help="Seeds curation, training and evaluation.")] = 0,
    rollout_max_tokens: Annotated[int, typer.Option(help="Longest rollout.")] = 512,
    explanation_max_tokens: Annotated[int, typer.Option(help="Longest explanation.")] = 768,
    explanation_attempts: ExplanationAttemptsOption = DEFAULT_EXPLANATION_ATTEMPTS,
    eval_max_tokens: Annotated[int, typer.Option(help="Longest evaluation answer.")] = 512,
    worked_example: WorkedExampleOption = None,
    resume: Annotated[bool, typer.Option(help="Resume training from OUT/adapter's last checkpoint.")] = False,
    adapter_serving: AdapterServingOption = "auto",
    *,
    train_options: dict,
) -> None:
    """Curate, train and evaluate in one process: from problems to a measured adapter."""
    from services.curator.curation import changed_problems, rerun_conflict
    from services.evaluation.evaluation import EvalConfig, combine_reports, render_table
    from services.teacher.engine import resolved_dtype
    from services.teacher.settings import LORA_RANKS, lora_rank_bound
    from services.trainer.checkpoints import check_same_settings
    from services.trainer.inputs import CHECKPOINTS_DIR, check_output_dir, latest_checkpoint, stopped_attempt_note
    from services.trainer.training import TrainingError
    from services.trainer.training import train as train_adapter
    from shared.datasets import DatasetError, load_problems
    from shared.settings import CurationConfig, Settings
    from shared.storage import PairStore, StorageError, replace_atomically

    settings = Settings()
    try:
        problems = load_problems(train, limit=limit)
        held_out = load_problems(eval_, limit=eval_limit)
        overlap = {p.question for p in problems} & {p.question for p in held_out}
        if overlap:
            raise ValueError(f"{len(overlap)} held-out questions are also training questions, e.g. {min(overlap)!r}")
        worked_example = resolve_worked_example(worked_example, model)
        serving, eval_dtype = resolve_adapter_serving(adapter_serving, settings.dtype)
        curation = config_from_options(CurationConfig, dict(
            k=k,
            seed=seed,
            worked_example=worked_example,
            rollout_max_tokens=rollout_max_tokens,
            explanation_max_tokens=explanation_max_tokens,
            explanation_attempts=explanation_attempts,
        ))
        training = build_train_config(train_options, seed=seed)
        evaluation = config_from_options(
            EvalConfig, dict(max_tokens=eval_max_tokens, worked_example=worked_example, seed=seed),
            {"max_tokens": "--eval-max-tokens"},
        )
        # Before the engine starts, not after curation and the base model's evaluation:
        check_output_path(out, directory=True)
        if changed := changed_problems(PairStore(out / "pairs"), problems):
            raise ValueError(changed)
        others = sorted(set(PairStore(out / "pairs").pair_ids()) - {p.id for p in problems})
        if others:  # training takes every pair of OUT/pairs
            raise ValueError(
                f"{out / 'pairs'} holds {len(others)} pairs of problems not among these (e.g. {others[0]}), which "
                "training would learn from too: use a new --out"
            )
        left = check_output_dir(out / "adapter", resume=resume)
        checkpoint = latest_checkpoint(out / "adapter" / CHECKPOINTS_DIR) if resume else None
        if resume and checkpoint is None:
            raise ValueError(
                f"--resume: no complete checkpoint in {out / 'adapter' / CHECKPOINTS_DIR} to resume training from "
                "(--checkpoint-every saves them); rerun without --resume: training starts over"
            )
        if checkpoint is not None:
            check_same_settings(checkpoint, None, training.model_dump(mode="json"))
        if serving == "lora" and training.rank > LORA_RANKS[-1]:
            raise ValueError(
                f"--rank {training.rank} is above the largest LoRA rank vLLM serves ({LORA_RANKS[-1]}); use "
                "--adapter-serving merged, or a smaller --rank"
            )
        lora_rank = lora_rank_bound(training.rank)  # what the adapter's engine is built for, where it is a LoRA
        model_path = ensure_model(model, settings)
        check_topk(curation.topk, settings.max_logprobs, "the engine's", "the curation's top-k")
        check_fits_context(
            problems, model_path, settings, answer_tokens=rollout_max_tokens, explanation_tokens=explanation_max_tokens,
            worked_example=worked_example,
        )
        check_fits_context(held_out, model_path, settings, answer_tokens=eval_max_tokens, worked_example=worked_example)
        if serving == "merged":  # said now, not after curation, the base model's evaluation and training
            targets = training.target_modules
            check_mergeable(f"--target-modules {','.join(targets)}", model_path, {"target_modules": list(targets)})
        if conflict := rerun_conflict(PairStore(out / "pairs"), curation, model_path):
            raise ValueError(conflict)
    except (DatasetError, FileNotFoundError, ValueError, TrainingError, StorageError) as exc:
        raise fail(str(exc)) from exc

    pairs_dir, adapter_dir, eval_path = out / "pairs", out / "adapter", out / "eval.json"
    if left:
        console.print(stopped_attempt_note(adapter_dir, left))
    label = Path(eval_).stem
    with exit_on_signals(), ExitStack() as engines:
        # One engine curates and evaluates the base model (on a CPU that computes in bfloat16, a float32 engine takes
        # over after curation). On a CPU it then stays open through training (idle, it takes no CPU time, only its
        # memory) and loads the adapter merged into the base weights: no engine start after training. Where the
        # adapter is served as a LoRA (by an engine built for it), or on a GPU (where training needs the memory vLLM
        # holds), it is closed before training and the adapter's engine starts after it.
        engine = engines.enter_context(start_engine(model_path, settings, seed=seed, enable_lora=False))
        funnel = curate_with_progress(problems, engine, PairStore(pairs_dir), curation)
        if not PairStore(pairs_dir).pair_ids():
            print_funnel(funnel, pairs_dir)
            raise fail("no verified pairs to train on: use more problems or --k")
        eval_settings = settings.model_copy(update={"dtype": eval_dtype})
        curated_in, evaluated_in = resolved_dtype(settings.dtype), resolved_dtype(eval_dtype)
        if evaluated_in != curated_in:  # a CPU with BF16: evaluated in float32
            console.print(f"Evaluating in {evaluated_in} (curation ran in {curated_in}): the adapter, merged into the "
                          "weights, answers exactly and at the base model's speed")
            engine.close()
            engine = engines.enter_context(start_engine(model_path, eval_settings, seed=seed, enable_lora=False))
        base_report = evaluate_with_progress(held_out, engine, evaluation, [None], label, what=f"{label} (base)")
        import torch  # loaded with the engine

        if serving == "lora" or torch.cuda.is_available():
            engine.close()

        with progress_bar("status") as progress:
            training_task = progress.add_task("training", total=None, status="")

            def on_step(metrics) -> None:
                progress.update(
                    training_task,
                    completed=metrics.step,
                    total=metrics.total_steps,
                    status=f"loss {metrics.loss:.4f}, {metrics.tokens_per_s:,.0f} tok/s",
                )

            try:
                result = train_adapter(pairs_dir, adapter_dir, model_path, training, resume=resume, on_step=on_step)
            except (TrainingError, ValueError) as exc:
                progress.stop()
                raise fail(str(exc)) from exc

        if engine.closed:
            engine = engines.enter_context(
                start_engine(
                    model_path, eval_settings, seed=seed, enable_lora=serving == "lora", max_lora_rank=lora_rank
                )
            )
        if serving == "merged":
            adapter_report = evaluate_merged_adapter(held_out, str(adapter_dir), model_path, engine, evaluation, label)
        else:
            adapter_report = evaluate_with_progress(held_out, engine, evaluation, [str(adapter_dir)], label)
    report = combine_reports([base_report, adapter_report])
    replace_atomically(eval_path, report.model_dump_json(indent=1))

    print_funnel(funnel, pairs_dir)
    pairs = counted(result.num_pairs, "pair")
    console.print(f"training: {steps_trained(result)} on {pairs}, final loss {result.final_loss:.4f}")
    console.print(f"training curve: {result.curve_path}")
    console.print(render_table(report, title="Held-out accuracy, base vs adapter"))
    print_paired_comparison(report)
    console.print(f"adapter: {adapter_dir}   per-problem results: {eval_path}")

