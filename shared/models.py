"""Which model a `--model` value means: the small default's name, a local checkpoint directory, or a Hugging Face id;
and the model's name, wherever it is.

Pure path logic; pulling the default model (which needs torch) lives in `services/teacher/base_model.py`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from shared.settings import DEFAULT_MODEL, Settings


def default_model_dir(settings: Settings) -> Path:
    """Where `ssb model pull` puts the default model."""
    return settings.home / "models" / DEFAULT_MODEL


def model_name(model: str) -> str:
    """A model's name wherever it is: the last part of a Hugging Face id or of a checkpoint's path, and NAME for a
    checkpoint in a Hugging Face cache (`.../models--ORG--NAME/snapshots/REVISION`, whose last part is a commit hash).
    One model at different paths on different machines, or an id here and a directory there, has one name."""
    path = PurePosixPath(model.rstrip("/"))
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]  # a repository's name holds no "--" (the Hub refuses it)
    return path.name


def is_default_model(model: str | None) -> bool:
    return model in (None, "", DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}")


def needs_worked_example(model: str | None) -> bool:
    """Whether prompts should carry the worked example turn by default for `model` (as given to `--model`, or as an
    engine names it: the directory the default model was pulled to): on for the small default, which without it
    rarely ends in the expected form (7.5% right on easy arithmetic against 24% with it, and rollouts that run to the
    token limit), off for every other model (the paper's prompt)."""
    return is_default_model(model) or model_name(model) == DEFAULT_MODEL


def resolve_model(model: str | None, settings: Settings) -> str:
    """Return what loaders take: a local directory for the default or a path, else the Hugging Face id unchanged."""
    if is_default_model(model):
        return str(default_model_dir(settings))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model checkpoint (no config.json in it)")
        return str(path.resolve())
    if model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {model} does not exist")
    return model
