"""A training run's inputs, checked before anything heavy loads: a curation output directory with pairs in it, and an
output directory free for a new run (the names of what a run writes there are defined here). Nothing here imports
torch, so `ssb train` given a wrong path says so at once instead of after torch, transformers and peft have loaded
(about 5 s on a 2-core machine).

    store = pair_store("runs/demo")                      # PairDataError: no pairs/ directory, or no pair in it
    note = other_model_note(store, model_path)           # the pairs made by a model of another name, or None
    left = check_output_dir(Path("runs/demo/adapter"), resume=False)   # TrainingError: an adapter, a checkpoint
    with claimed_output_dir(Path("runs/demo/adapter")):  # TrainingError: another run trains there now
        clear_stopped_attempt(Path("runs/demo/adapter"), left)
"""

from __future__ import annotations

import errno
import fcntl
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.trainer.config import TrainingError
from shared.models import model_name
from shared.storage import PairStore, decode_pair_record
from shared.teacher_api import ADAPTER_NAME_PATTERN


class PairDataError(ValueError):
    """The pairs cannot be trained on as they are (missing, empty, or inconsistent)."""


def pair_store(pairs_dir: str | Path) -> PairStore:
    """The store of a curation output directory that holds at least one pair; PairDataError otherwise."""
    store = PairStore(pairs_dir)
    if not store.pairs_dir.is_dir():
        raise PairDataError(f"{store.root}: no pairs/ directory here; is this a curation output?")
    if not store.pair_ids():
        raise PairDataError(f"{store.root}: no pairs in {store.pairs_dir}; curation kept none, or has not run")
    return store


def other_model_note(store: PairStore, model_path: str) -> str | None:
    """A note when the pairs were made by a model of another name than the one to train (by its first pair's record;
    the teacher of a later round is `base+adapter`, its base the model), or None. Distilling one model's explanations
    into another of the same tokenizer can be meant; into one of another tokenizer it is noise, and only token ids
    past the student's vocabulary would be caught."""
    recorded = decode_pair_record(store.pair_path(store.pair_ids()[0])).model
    base, plus, adapter = recorded.rpartition("+")
    made_by = base if plus and re.fullmatch(ADAPTER_NAME_PATTERN, adapter) else recorded
    teacher, student = model_name(made_by), model_name(str(model_path))
    if teacher == student:
        return None
    return (
        f"note: the pairs were made by {teacher} (recorded as {recorded}) and the model to train is {student}: if "
        f"they are two models, the student learns another's token distributions, which is only meaningful with the "
        f"same tokenizer (to train {teacher}, pass it as --model)"
    )


# What a run writes into its output directory, `checkpoints/` and `metrics.jsonl` first, `adapter_config.json` last.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_STAGING_DIR = ".adapter.tmp"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
CURVE_FILE = "training_curve.png"
METRICS_FILE = "metrics.jsonl"
PAIR_IDS_FILE = "pair_ids.txt"
TRAINING_CONFIG_FILE = "training_config.json"
LOCK_FILE = ".training.lock"
# What an attempt leaves before its adapter is whole: cleared by a new run there when none of it can be resumed (no
# complete checkpoint) or used (no adapter config).
ATTEMPT_FILES = (
    METRICS_FILE, PAIR_IDS_FILE, TRAINING_CONFIG_FILE, CHECKPOINTS_DIR, ADAPTER_STAGING_DIR, ADAPTER_WEIGHTS_FILE,
    CURVE_FILE,
)  # fmt: skip


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. Incomplete ones never carry the final name."""
    try:
        entries = list(checkpoints_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return None
    found = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in entries
        if p.name.startswith(CHECKPOINT_PREFIX)
        and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        and (p / "state.json").exists()
    ]
    return max(found)[1] if found else None


def check_output_dir(out_dir: Path, *, resume: bool) -> list[str]:
    """Refuse (TrainingError) for a new run (not `resume`) an output directory that holds a trained adapter, a run it
    could resume, or files of those names that no run left; return what an attempt that stopped before its first
    checkpoint left there (the run clears it: `clear_stopped_attempt`), none for a free directory or a resume."""
    if resume:
        return []
    if (out_dir / ADAPTER_CONFIG_FILE).exists():
        raise TrainingError(
            f"{out_dir} already holds a trained adapter; evaluate it (ssb eval --adapter {out_dir}), or train into a "
            "new output directory"
        )
    checkpoint = latest_checkpoint(out_dir / CHECKPOINTS_DIR)
    if checkpoint is not None:
        raise TrainingError(
            f"{out_dir} already holds a training run, stopped after its checkpoint {checkpoint.name}: resume it "
            "(--resume), or train into a new output directory"
        )
    left = [name for name in ATTEMPT_FILES if (out_dir / name).exists()]
    if left and not any((out_dir / marker).exists() for marker in (PAIR_IDS_FILE, TRAINING_CONFIG_FILE)):
        raise TrainingError(
            f"{out_dir} holds {', '.join(left)}, which no training run of this tool left there: train into a new "
            "output directory"
        )
    return left


@contextmanager
def claimed_output_dir(out_dir: Path) -> Iterator[None]:
    """The output directory for this run alone while it trains: an exclusive lock on its `.training.lock` (a second
    run there would clear or overwrite the first's files); TrainingError while another run holds it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise TrainingError(f"{out_dir} is in use by another training run") from None
            raise TrainingError(f"cannot lock {out_dir / LOCK_FILE} ({exc.strerror or exc})") from None
        yield


def stopped_attempt_note(out_dir: Path, left: list[str]) -> str:
    """What a command says before training over what `check_output_dir` found an earlier attempt left."""
    names = ", ".join(left)
    return f"{out_dir}: a run that stopped before its first checkpoint left {names}; cleared as training starts"


def clear_stopped_attempt(out_dir: Path, left: list[str]) -> None:
    """Remove what `check_output_dir` found an attempt that stopped before its first checkpoint left (hold
    `claimed_output_dir`); TrainingError naming what cannot be removed."""
    markers = (PAIR_IDS_FILE, TRAINING_CONFIG_FILE)  # last: a clearing cut short is still a run's, cleared next time
    for name in sorted(left, key=lambda name: name in markers):
        path = out_dir / name
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            reason = exc.strerror or exc
            raise TrainingError(f"cannot clear {path}, left by a run that stopped early ({reason})") from exc
