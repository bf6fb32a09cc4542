"""A training run's inputs, checked before anything heavy loads: a curation output directory with pairs in it, and an
output directory free for a new run. Nothing here imports torch, so `ssb train` given a wrong path says so at once
instead of after torch, transformers and peft have loaded (about 5 s on a 2-core machine).

    store = pair_store("runs/demo")                      # PairDataError: no pairs/ directory, or no pair in it
    check_output_dir(Path("runs/demo/adapter"), resume=False)   # TrainingError: it holds an adapter or a checkpoint
"""

from __future__ import annotations

import shutil
from pathlib import Path

from services.trainer.config import TrainingError
from shared.storage import PairStore


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


# What an attempt writes into its output directory before its adapter is whole: cleared by a new run there when none
# of it can be resumed (no complete checkpoint) or used (no `adapter_config.json`, written last).
ATTEMPT_FILES = (
    "metrics.jsonl", "pair_ids.txt", "training_config.json", "checkpoints", ".adapter.tmp", "adapter_model.safetensors",
    "training_curve.png",
)  # fmt: skip
CHECKPOINT_PREFIX = "step-"


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. Incomplete ones never carry the final name."""
    if not checkpoints_dir.is_dir():
        return None
    found = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in checkpoints_dir.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX)
        and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        and (p / "state.json").exists()
    ]
    return max(found)[1] if found else None


def check_output_dir(out_dir: Path, *, resume: bool, clear: bool = True) -> None:
    """A new run (not `resume`) refuses an output directory that holds a trained adapter or a run it could resume
    (TrainingError); what an attempt that stopped before its first checkpoint left there is removed (with `clear`:
    of the processes of a data-parallel run, the main one alone), and the run starts again."""
    if resume:
        return
    if (out_dir / "adapter_config.json").exists():
        raise TrainingError(
            f"{out_dir} already holds a trained adapter; evaluate it (ssb eval --adapter {out_dir}), or train into a "
            "new output directory"
        )
    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    if checkpoint is not None:
        raise TrainingError(
            f"{out_dir} already holds a training run, stopped after its checkpoint {checkpoint.name}: resume it "
            "(--resume), or train into a new output directory"
        )
    for name in ATTEMPT_FILES if clear else ():
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
