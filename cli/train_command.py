"""`ssb train`: step 6 of SSB, curated pairs to a LoRA adapter, with a progress bar of steps, loss and tokens/s.

    ssb train --pairs runs/demo/pairs --out runs/demo/adapter
    ssb train --pairs P --out O --epochs 1 --rank 8 --teacher stored --checkpoint-every 50
    ssb train --pairs P --out O --checkpoint-every 50 --resume          # continue a killed run
    accelerate launch --num_processes 4 -m cli.main train --pairs P --out O   # data parallel on 4 GPUs

The training options are generated from `services.trainer.config.TrainConfig`, one `--flag` per field, with the
field's default and description: one definition of every knob, and any command can take them all with
`@training_options()` and build its config with `build_train_config` (`ssb run` does). The logic lives in
`services/trainer/training.py`. A missing or empty pairs directory, a bad option value, or an output directory that
holds an adapter or a checkpoint (without `--resume`) exits with status 2 and one message; what a run that stopped
before its first checkpoint left there is cleared, and training starts over. SIGTERM ends it as Ctrl-C does.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from collections.abc import Callable, Collection
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional, Union, get_args, get_origin

import typer

from cli.runtime import (
    ModelOption,
    check_output_path,
    config_from_options,
    console,
    counted,
    ensure_model,
    exit_on_signals,
    fail,
    progress_bar,
)
from services.trainer.config import TrainConfig, TrainingError
from shared.settings import Settings

TRAIN_OPTIONS_PARAMETER = "train_options"


def _option_type(annotation: Any) -> Any:
    """The command-line type of a TrainConfig field: tuples become repeatable options, `X | None` an optional X."""
    origin = get_origin(annotation)
    if origin is tuple:
        return list[get_args(annotation)[0]]
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return Optional[inner]
    return annotation


def training_options(*, exclude: Collection[str] = ()) -> Callable[[Callable], Callable]:
    """Give a typer command every TrainConfig field as an option, and pass it the values as one argument.

    Each field `name` becomes `--name-with-dashes` with the field's type, default and description (bools become
    `--name/--no-name`, tuples repeatable options), shown under "Training" in `--help`. The command declares a
    keyword-only parameter `train_options: dict` and receives the chosen values (field name -> value) in it; pass
    them to `build_train_config`. `exclude` names fields the command sets itself (`ssb run`'s `--seed` also seeds
    curation); a command parameter with a field's name must be excluded, or the decorator refuses it.

        @training_options(exclude={"seed"})
        def run_command(out: ..., seed: int = 0, *, train_options: dict) -> None:
            config = build_train_config(train_options, seed=seed)
    """
    unknown = set(exclude) - set(TrainConfig.model_fields)
    if unknown:
        raise ValueError(f"not TrainConfig fields: {sorted(unknown)}")
    names = [name for name in TrainConfig.model_fields if name not in exclude]

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != TRAIN_OPTIONS_PARAMETER]
        if TRAIN_OPTIONS_PARAMETER not in signature.parameters:
            raise TypeError(f"{command.__name__} needs a keyword-only parameter `{TRAIN_OPTIONS_PARAMETER}`")
        clashes = {p.name for p in own} & set(names)
        if clashes:
            raise TypeError(f"{command.__name__}: parameters {sorted(clashes)} are also training options; exclude them")
        generated = []
        for name in names:
            field = TrainConfig.model_fields[name]
            default = list(field.default) if isinstance(field.default, tuple) else field.default
            flag = f"--{name.replace('_', '-')}"
            if field.annotation is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            option = typer.Option(flag, help=field.description, rich_help_panel="Training")
            generated.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=Annotated[_option_type(field.annotation), option],
                    default=default,
                )
            )

        @functools.wraps(command)
        def with_training_options(**kwargs: Any) -> Any:
            chosen = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, **{TRAIN_OPTIONS_PARAMETER: chosen})

        parameters = sorted(own, key=lambda p: p.kind == inspect.Parameter.KEYWORD_ONLY) + generated
        with_training_options.__signature__ = signature.replace(parameters=parameters)
        # typer reads the annotations too; the command's own are given evaluated, so they resolve anywhere.
        with_training_options.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_training_options

    return decorate


def build_train_config(train_options: dict[str, Any], **settings: Any) -> TrainConfig:
    """The TrainConfig of a command's training options (plus `settings`, e.g. a seed the command chose itself).

    Raises the command's exit (status 2) with one line per bad option, named as on the command line.
    """
    values = {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in {**train_options, **settings}.items()
    }
    return config_from_options(TrainConfig, values)


@training_options()
def train_command(
    pairs: Annotated[Path, typer.Option("--pairs", help="A curation output directory (with pairs/ in it).")],
    out: Annotated[Path, typer.Option("--out", help="Where the adapter, metrics, curve and checkpoints go.")],
    model: ModelOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    *,
    train_options: dict[str, Any],
) -> None:
    """Step 6: train a LoRA adapter that matches the hinted teacher from the bare question (KL at temperature T).

    Teacher (--teacher): auto, the default, is online at any T other than 1 and stored at T = 1.
    online: the exact full-vocabulary loss; the base model reads the hinted prompt in every step (1.30x the step time).
    stored: the top-k saved with the pairs, no teacher pass; gradient cosine with exact 0.995 at T = 1, 0.58 at T = 2.
    """
    from services.trainer.inputs import (
        PairDataError,
        check_output_dir,
        other_model_note,
        pair_store,
        stopped_attempt_note,
    )
    from shared.storage import StorageError

    # Under `accelerate launch` every process runs this command; only the main one draws (and gets on_step calls).
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:  # a wrong path fails at once, before torch and the model load
        check_output_path(out, directory=True)
        left = check_output_dir(out, resume=resume)
        store = pair_store(pairs)
    except (ValueError, TrainingError) as exc:  # PairDataError is a ValueError
        raise fail(str(exc)) from exc
    if left and main_process:
        console.print(stopped_attempt_note(out, left))
    config = build_train_config(train_options)
    settings = Settings()  # a bad SSB_* value: one line naming it (cli.main)
    try:
        if resume:  # other settings than the checkpoint's: said before the model loads
            from services.trainer.checkpoints import check_same_settings
            from services.trainer.inputs import CHECKPOINTS_DIR, latest_checkpoint

            if (checkpoint := latest_checkpoint(out / CHECKPOINTS_DIR)) is not None:
                check_same_settings(checkpoint, None, config.model_dump(mode="json"))
        model_path = ensure_model(model, settings)
        check_model_config(model_path)  # a model that cannot load: said in a line, before torch and the weights load
        note = other_model_note(store, model_path)
    except (FileNotFoundError, ValueError, TrainingError, StorageError) as exc:  # StorageError: an unreadable pair
        raise fail(str(exc)) from exc
    if note and main_process:
        console.print(note)

    from services.trainer.training import train

    # SIGTERM (`kill`, a scheduler's time limit) ends the command as Ctrl-C does: the progress bar gives the terminal
    # back, and a checkpoint being written is removed, not left half-written (status 128 + 15).
    with exit_on_signals(), progress_bar("loss", "speed") if main_process else nullcontext() as progress:
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


def check_model_config(model_path: str) -> None:
    """A ValueError naming `--model` when its configuration cannot be read (no checkpoint there, or not one
    transformers knows); training needs no tokenizer (the pairs hold token ids), so none is asked for."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {model_path!r}: cannot be loaded: {' '.join(str(exc).split())}") from exc


def steps_trained(result) -> str:
    """How many steps a run took in all, and the checkpoint's step a resumed run went on from."""
    if result.resumed_from_step is None:
        return counted(result.steps, "step")
    return f"{counted(result.steps, 'step')} (resumed from the checkpoint at step {result.resumed_from_step})"


def print_training_summary(result) -> None:
    """Where the adapter, its metrics and the training curve are."""
    loss = "no step logged" if result.final_loss is None else f"final loss {result.final_loss:.4f}"
    console.print(
        f"trained {steps_trained(result)} on {counted(result.num_pairs, 'pair')} in {result.seconds:.0f} s ({loss})\n"
        f"adapter:        {result.out_dir}\n"
        f"metrics:        {result.metrics_path}\n"
        f"training curve: {result.curve_path}"
    )
