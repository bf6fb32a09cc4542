"""A training run's inputs, checked before anything heavy loads: a curation output directory with pairs in it, and an
output directory free for a new run. Nothing here imports torch, so `ssb train` given a wrong path says so at once
instead of after torch, transformers and peft have loaded (about 5 s on a 2-core machine).

    store = pair_store("runs/demo")                      # PairDataError: no pairs/ directory, or no pair in it
    check_output_dir(Path("runs/demo/adapter"), resume=False)   # TrainingError: it already holds a run
"""

from __future__ import annotations

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


def holds_a_run(out_dir: Path) -> bool:
    """True when `out_dir` already has an adapter, metrics or checkpoints."""
    return any((out_dir / name).exists() for name in ("adapter_config.json", "metrics.jsonl", "checkpoints"))


def check_output_dir(out_dir: Path, *, resume: bool) -> None:
    """A new run (not `resume`) refuses an output directory that holds an earlier one: TrainingError."""
    if not resume and holds_a_run(out_dir):
        raise TrainingError(
            f"{out_dir} already holds a training run; resume it (--resume) if it saved a checkpoint, or choose a new "
            "output directory"
        )
