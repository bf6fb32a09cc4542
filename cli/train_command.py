"""`ssb train`: step 6 of SSB, curated pairs to a LoRA adapter, with a progress bar of steps, loss and tokens/s.

    ssb train --pairs runs/demo/pairs --out runs/demo/adapter
    ssb train --pairs P --out O --epochs 1 --rank 8 --teacher online --checkpoint-every 50
    ssb train --pairs P --out O --checkpoint-every 50 --resume          # continue a killed run
    accelerate launch --num_processes 4 -m cli.main train --pairs P --out O   # data parallel on 4 GPUs

Flags map onto `services.trainer.config.TrainConfig` (defaults: the paper's); the logic lives in
`services/trainer/training.py`. A missing or empty pairs directory, or an output directory that already holds a run
(without `--resume`), exits with status 2 and one message.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.runtime import ModelOption, console, ensure_model, fail, progress_bar
from services.trainer.config import TrainConfig
from shared.settings import Settings


def _default(name: str):
    """The option's default is TrainConfig's, so the two never disagree."""
    return TrainConfig.model_fields[name].default


def train_command(
    pairs: Annotated[Path, typer.Option("--pairs", help="A curation output directory (with pairs/ in it).")],
    out: Annotated[Path, typer.Option("--out", help="Where the adapter, metrics, curve and checkpoints go.")],
    model: ModelOption = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the pairs.")] = _default("epochs"),
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many optimizer steps.")] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = _default("lr"),
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per micro-batch on each process.")] = _default(
        "batch_size"
    ),
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per optimizer step.")] = _default("grad_accum"),
    scheduler: Annotated[str, typer.Option(help="cosine, linear or constant, after warm-up.")] = _default("scheduler"),
    warmup_ratio: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction of steps warming up.")] = _default(
        "warmup_ratio"
    ),
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = _default("rank"),
    alpha: Annotated[float, typer.Option(min=0.0, help="LoRA alpha.")] = _default("alpha"),
    dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help="LoRA dropout.")] = _default("dropout"),
    temperature: Annotated[float, typer.Option(min=0.0, help="Distillation temperature T.")] = _default("temperature"),
    kd_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the KL term.")] = _default("kd_weight"),
    ce_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the cross-entropy term.")] = _default(
        "ce_weight"
    ),
    teacher: Annotated[
        str,
        typer.Option(
            help="stored: the top-k saved with the pairs (approximate at T > 1); online: exact, one more forward pass."
        ),
    ] = _default("teacher"),
    seed: Annotated[int, typer.Option(min=0, help="LoRA initialisation, data order and dropout.")] = _default("seed"),
    checkpoint_every: Annotated[
        Optional[int], typer.Option(min=1, help="Save a resumable checkpoint every N steps.")
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in backward (less memory, slower).")
    ] = _default("gradient_checkpointing"),
    dtype: Annotated[
        str, typer.Option(help="auto (bfloat16 on a GPU, float32 on the CPU), float32 or bfloat16.")
    ] = _default("dtype"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
) -> None:
    """Step 6: train a LoRA adapter that matches the hinted teacher from the bare question (KL at temperature T)."""
    from pydantic import ValidationError

    from services.trainer.data import PairDataError
    from services.trainer.training import TrainingError, train

    if not (pairs / "pairs").is_dir():
        raise fail(f"{pairs}: no pairs/ directory here; is this a curation output?")
    try:
        config = TrainConfig(
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            scheduler=scheduler,
            warmup_ratio=warmup_ratio,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            temperature=temperature,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            teacher=teacher,
            seed=seed,
            checkpoint_every=checkpoint_every,
            gradient_checkpointing=gradient_checkpointing,
            dtype=dtype,
        )
        model_path = ensure_model(model, Settings())
    except ValidationError as exc:
        problems = [f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        raise fail("; ".join(problems)) from exc
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc

    # Under `accelerate launch` every process runs this command; only the main one draws (and gets on_step calls).
    main_process = int(os.environ.get("RANK", "0")) == 0
    with progress_bar("loss", "speed") if main_process else nullcontext() as progress:
        tasks = []  # added at the first step, once the number of steps is known

        def report(metrics) -> None:
            if not tasks:
                tasks.append(progress.add_task("training", total=metrics.total_steps, loss="", speed=""))
            progress.update(
                tasks[0],
                completed=metrics.step,
                total=metrics.total_steps,
                loss=f"loss {metrics.loss:.4f}",
                speed=f"{metrics.tokens_per_s:,.0f} tok/s",
            )

        try:
            result = train(pairs, out, model_path, config, resume=resume, on_step=report)
        except (PairDataError, TrainingError) as exc:
            raise fail(str(exc)) from exc
    if main_process:
        print_training_summary(result)


def print_training_summary(result) -> None:
    """Where the adapter, its metrics and the training curve are."""
    loss = "no step logged" if result.final_loss is None else f"final loss {result.final_loss:.4f}"
    console.print(
        f"trained {result.steps} steps on {result.num_pairs} pairs in {result.seconds:.0f} s ({loss})\n"
        f"adapter:        {result.out_dir}\n"
        f"metrics:        {result.metrics_path}\n"
        f"training curve: {result.curve_path}"
    )
