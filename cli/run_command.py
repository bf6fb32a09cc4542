"""`ssb run`: the main job in one process: curate pairs, train a LoRA adapter on them, evaluate base vs adapter.

    ssb run --train train.jsonl --eval held_out.jsonl --out runs/demo --worked-example

One engine serves curation and evaluation (the adapter is loaded into it as a LoRA); training runs in this process
between the two. Writes `OUT/pairs/` (curation), `OUT/adapter/` (the adapter, metrics, training curve) and
`OUT/eval.json` (per-problem results). A rerun skips problems already curated; training needs an empty
`OUT/adapter/` (or `--resume`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.runtime import ModelOption, console, ensure_model, fail, print_funnel, progress_bar, start_engine


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
    epochs: Annotated[int, typer.Option(min=1, help="Training passes over the pairs.")] = 3,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    eval_max_tokens: Annotated[int, typer.Option(help="Longest evaluation answer.")] = 512,
    worked_example: Annotated[
        bool, typer.Option(help="One worked example turn before each question, in every prompt (helps small models).")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Resume training from OUT/adapter's last checkpoint.")] = False,
) -> None:
    """Curate, train and evaluate in one process: from problems to a measured adapter."""
    from services.curator.curation import curate
    from services.evaluation.evaluation import EvalConfig, evaluate, render_table
    from services.trainer.config import TrainConfig
    from services.trainer.training import TrainingError, train as train_adapter
    from shared.datasets import DatasetError, load_problems
    from shared.settings import CurationConfig, Settings
    from shared.storage import PairStore

    settings = Settings()
    try:
        problems = load_problems(train, limit=limit)
        held_out = load_problems(eval_, limit=eval_limit)
        overlap = {p.question for p in problems} & {p.question for p in held_out}
        if overlap:
            raise ValueError(f"{len(overlap)} held-out questions are also training questions, e.g. {min(overlap)!r}")
        curation = CurationConfig(
            k=k,
            seed=seed,
            worked_example=worked_example,
            rollout_max_tokens=rollout_max_tokens,
            explanation_max_tokens=explanation_max_tokens,
        )
        training = TrainConfig(epochs=epochs, lr=lr, seed=seed)
        evaluation = EvalConfig(max_tokens=eval_max_tokens, worked_example=worked_example, seed=seed)
        model_path = ensure_model(model, settings)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc

    pairs_dir, adapter_dir, eval_path = out / "pairs", out / "adapter", out / "eval.json"
    with start_engine(model_path, settings, seed=seed) as engine, progress_bar("status") as progress:
        curating = progress.add_task("1/3 curating", total=len(problems), status="")

        def on_curation(funnel) -> None:
            progress.update(
                curating,
                completed=funnel.skipped + funnel.processed,
                status=f"pairs {funnel.pairs}, {funnel.tokens_per_second:,.0f} tok/s",
            )

        funnel = curate(problems, engine, PairStore(pairs_dir), curation, on_progress=on_curation)
        if not PairStore(pairs_dir).pair_ids():
            progress.stop()
            print_funnel(funnel, pairs_dir)
            raise fail("no verified pairs to train on: use more problems, --k, or --worked-example for small models")

        training_task = progress.add_task("2/3 training", total=None, status="")

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

        evaluating = progress.add_task("3/3 evaluating", total=2 * len(held_out), status="")
        done: dict[str, int] = {}

        def on_eval(name: str, problems_done: int, _total: int) -> None:
            done[name] = problems_done
            progress.update(evaluating, completed=sum(done.values()), status=name)

        report = evaluate(
            held_out, engine, evaluation, adapters=[None, str(adapter_dir)], benchmark=Path(eval_).stem,
            on_progress=on_eval,
        )
    eval_path.write_text(report.model_dump_json(indent=1))

    print_funnel(funnel, pairs_dir)
    console.print(f"training: {result.steps} steps on {result.num_pairs} pairs, final loss {result.final_loss:.4f}")
    console.print(f"training curve: {result.curve_path}")
    console.print(render_table(report, title="Held-out accuracy, base vs adapter"))
    base, adapted = report.rows
    change = 100 * (adapted.pass_at_1 - base.pass_at_1)
    console.print(
        f"pass@1 on {base.problems} held-out problems: base {100 * base.pass_at_1:.1f}%, "
        f"adapter {100 * adapted.pass_at_1:.1f}% ({change:+.1f} points, as measured)"
    )
    console.print(f"adapter: {adapter_dir}   per-problem results: {eval_path}")
