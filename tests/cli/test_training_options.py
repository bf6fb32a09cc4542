"""The training options, defined once by TrainConfig: every field is a flag of `ssb train`, and any other command
takes them all with `@training_options()` (as `ssb run` does). In-process through typer's runner: no model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from typer.testing import CliRunner

from cli.train_command import build_train_config, train_command, training_options
from services.trainer.config import TrainConfig


def one_command_app(command) -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def run(app: typer.Typer, *args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_every_train_config_field_is_an_option_of_ssb_train():
    app = one_command_app(train_command)
    flags = {opt for param in typer.main.get_command(app).params for opt in param.opts}
    assert {f"--{name.replace('_', '-')}" for name in TrainConfig.model_fields} <= flags
    assert {"--pairs", "--out", "--model", "--resume"} <= flags
    help_text = " ".join(run(app, "--help").output.split())
    assert "1.30x the step time" in help_text  # what the online teacher costs, in --help


def test_another_command_gets_the_same_options_and_builds_the_same_config():
    received: dict[str, Any] = {}

    @training_options(exclude={"seed"})
    def pipeline(
        out: Annotated[Path, typer.Option("--out")],
        seed: Annotated[int, typer.Option("--seed")] = 0,
        *,
        train_options: dict[str, Any],
    ) -> None:
        received["out"] = out
        received["config"] = build_train_config(train_options, seed=seed)

    app = one_command_app(pipeline)
    args = ["--out", "x", "--seed", "7", "--temperature", "1", "--lr", "1e-3", "--no-log-ce"]
    args += ["--target-modules", "q_proj", "--target-modules", "v_proj", "--max-steps", "5"]
    result = run(app, *args)
    assert result.exit_code == 0, result.output
    assert received["out"] == Path("x")
    assert received["config"] == TrainConfig(
        seed=7, temperature=1.0, lr=1e-3, log_ce=False, target_modules=("q_proj", "v_proj"), max_steps=5
    )
    assert received["config"].teacher == "stored"  # auto at T = 1

    assert run(app, "--out", "x").exit_code == 0
    assert received["config"] == TrainConfig()  # the defaults are TrainConfig's
    assert received["config"].teacher == "online"


def test_a_bad_value_exits_2_naming_the_flag():
    received = {}

    @training_options()
    def command(*, train_options: dict[str, Any]) -> None:
        received["config"] = build_train_config(train_options)

    result = CliRunner().invoke(one_command_app(command), ["--lr", "0", "--rank", "0"])
    assert result.exit_code == 2 and "config" not in received
    message = " ".join(result.output.split())
    assert "--lr: Input should be greater than 0" in message and "--rank:" in message


def test_a_parameter_that_is_also_a_training_option_must_be_excluded():
    def command(seed: int = 0, *, train_options: dict) -> None: ...

    with pytest.raises(TypeError, match=r"\['seed'\] are also training options"):
        training_options()(command)
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        training_options(exclude={"sede"})


def test_a_loss_of_nothing_exits_2_saying_why():
    @training_options()
    def command(*, train_options: dict[str, Any]) -> None:
        build_train_config(train_options)

    result = CliRunner().invoke(one_command_app(command), ["--kd-weight", "0"])
    assert result.exit_code == 2
    assert "kd_weight and ce_weight are both 0" in " ".join(result.output.split())
