"""What a training run keeps on disk besides its adapter: resumable checkpoints, RNG states, and its records.

    checkpoints/step-<N>/      adapter, optimizer and scheduler states, each process's RNG states, state.json
    training_config.json       the TrainConfig (teacher resolved), model, pairs directory and number of pairs
    pair_ids.txt               the ids of the pairs the run trains on, one a line
    metrics.jsonl              one line per logged step (written by the loop; trimmed here on resume)

A checkpoint is written into a hidden temporary directory, flushed to disk and renamed when complete, so neither a run
killed mid-write nor a machine that lost its power leaves one that looks complete. A resumed run trains on the pairs in
`pair_ids.txt`, not on what the directory holds now (a run started while curation still wrote pairs resumes as it
began). `load_checkpoint` refuses to continue a run whose settings (other than `RESUMABLE_CHANGES`), pairs, base model
(`model_fingerprint`) or number of processes changed (pairs by their ids and contents: `digest_of_examples`): the
resumed run would not compute the same thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from services.trainer.config import RESUMABLE_CHANGES, TrainConfig, TrainingError
from services.trainer.inputs import ADAPTER_WEIGHTS_FILE, CHECKPOINT_PREFIX, PAIR_IDS_FILE, TRAINING_CONFIG_FILE
from services.trainer.plots import read_metrics
from shared.storage import replace_atomically, sync_directory, sync_tree


def write_pair_ids(out_dir: Path, problem_ids: Sequence[str]) -> None:
    """Record the pairs a run trains on, for its resumes."""
    replace_atomically(out_dir / PAIR_IDS_FILE, "".join(f"{problem_id}\n" for problem_id in problem_ids))


def read_pair_ids(out_dir: Path) -> list[str] | None:
    """The pairs a run started on, or None for a run that did not record them (one of an earlier version)."""
    path = out_dir / PAIR_IDS_FILE
    return path.read_text().split() if path.exists() else None


def digest_of(problem_ids: Sequence[str]) -> str:
    """A short fingerprint of the ordered pair ids, so a resume notices changed data."""
    return hashlib.sha256("\n".join(problem_ids).encode()).hexdigest()[:16]


def digest_of_examples(examples) -> str:
    """A short fingerprint of what the run trains on: each example's id, tokens and teacher signal, so a resume on a
    directory whose pairs kept their ids (another curation of the same problems) notices."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(f"{example.problem_id}\0{example.prompt_length}\0{example.teacher_prompt_length}\0".encode())
        for tensor in (example.input_ids, example.topk_ids, example.topk_logprobs, example.teacher_input_ids):
            if tensor is not None:
                digest.update(f"{tuple(tensor.shape)}".encode() + tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A short fingerprint of a base model's weights (before any adapter), the same wherever and in whatever dtype it
    is loaded: the name, shape and first 16 values of every weight, rounded to bfloat16. Another model, or another
    fine-tune of this one, differs, unless its changes miss every weight's first values or vanish at that precision."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        first = parameter.detach().reshape(-1)[:16].to(device="cpu", dtype=torch.bfloat16)
        digest.update(f"{name}:{tuple(parameter.shape)}:".encode() + first.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def write_training_config(
    out_dir: Path,
    config: TrainConfig,
    model_path: str,
    pairs_dir: str | Path,
    num_pairs: int,
    total_steps: int,
    num_processes: int,
) -> Path:
    """Write `training_config.json`: what was trained, on what, with which settings. Returns its path."""
    record = {
        "config": config.model_dump(mode="json"),
        "model": model_path,
        "pairs_dir": str(Path(pairs_dir).resolve()),
        "num_pairs": num_pairs,
        "total_steps": total_steps,
        "num_processes": num_processes,
    }
    return replace_atomically(out_dir / TRAINING_CONFIG_FILE, json.dumps(record, indent=1) + "\n")


def last_logged_loss(metrics_path: Path) -> float | None:
    """The loss of the last logged step (a resumed run that had nothing left to do reports it)."""
    logged = read_metrics(metrics_path)
    return logged[-1]["loss"] if logged else None


def keep_metrics_through(metrics_path: Path, step: int) -> None:
    """Drop metric lines after `step` (logged by the interrupted run after its last checkpoint)."""
    kept = [m for m in read_metrics(metrics_path) if m["step"] <= step]
    replace_atomically(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))


def save_checkpoint(
    checkpoints_dir: Path, step: int, peft_model, optimizer, scheduler, state: dict, accelerator, *, keep: int
) -> Path:
    """Write `checkpoints/step-<step>/` atomically: into a hidden temporary directory, renamed when complete.

    Holds the adapter, the optimizer and scheduler states, each process's RNG states, and `state.json` (the position
    and what must not change on resume). Older checkpoints beyond the newest `keep` are removed.
    """
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = checkpoints_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        torch.save(rng_states(), tmp / f"rng-{accelerator.process_index}.pt")
        if main:
            peft_model.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        accelerator.wait_for_everyone()
        if main:
            sync_tree(tmp)  # on disk before its complete name, and before older checkpoints go
            shutil.rmtree(final, ignore_errors=True)  # the same step written again after a resume
            os.replace(tmp, final)
    except BaseException:  # a full disk, Ctrl-C, SIGTERM (`ssb train`): no half-written checkpoint is left
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        sync_directory(checkpoints_dir)
        names = [p.name[len(CHECKPOINT_PREFIX) :] for p in checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*")]
        steps = sorted(int(name) for name in names if name.isdigit())  # a folder someone put there is not pruned
        for old in steps[:-keep]:
            shutil.rmtree(checkpoints_dir / f"{CHECKPOINT_PREFIX}{old}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_same_settings(checkpoint: Path, written: dict | None, config: dict) -> None:
    """TrainingError when `config` (a `TrainConfig` as JSON) differs from the settings the checkpoint was written with
    (`written`; read from it when None) in more than `RESUMABLE_CHANGES`. Commands ask before anything heavy runs."""
    if written is None:
        written = json.loads((checkpoint / "state.json").read_bytes())["config"]
    changed = sorted(
        name
        for name in set(written) | set(config)
        if name not in RESUMABLE_CHANGES and written.get(name) != config.get(name)
    )
    if changed:
        raise TrainingError(
            f"cannot resume from {checkpoint}: settings changed since it was written: {', '.join(changed)}"
        )


def load_checkpoint(checkpoint: Path, peft_model, optimizer, scheduler, run_state: dict, accelerator) -> int:
    """Restore adapter, optimizer, scheduler and RNG states from a checkpoint; return its step.

    Raises TrainingError when the checkpoint was written with other settings, other pairs, another base model or
    another number of processes (the resumed run would not continue the same computation).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((checkpoint / "state.json").read_bytes())
    check_same_settings(checkpoint, state["config"], run_state["config"])
    content = state.get("pairs_content", run_state["pairs_content"])  # none in an earlier version's: the ids only
    if state["pairs_digest"] != run_state["pairs_digest"] or content != run_state["pairs_content"]:
        raise TrainingError(
            f"cannot resume from {checkpoint}: the pairs directory holds other pairs than it was trained on"
        )
    if state.get("model", run_state["model"]) != run_state["model"]:  # a checkpoint of an earlier version has none
        raise TrainingError(
            f"cannot resume from {checkpoint}: it was trained on another base model (weights {state['model']}, "
            f"this one's {run_state['model']})"
        )
    if state["num_processes"] != run_state["num_processes"]:
        raise TrainingError(
            f"cannot resume from {checkpoint}: written by {state['num_processes']} processes, resuming with "
            f"{run_state['num_processes']} (the data order depends on it)"
        )
    device = accelerator.device
    set_peft_model_state_dict(peft_model, load_file(str(checkpoint / ADAPTER_WEIGHTS_FILE), device=str(device)))
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    rng_path = checkpoint / f"rng-{accelerator.process_index}.pt"
    set_rng_states(torch.load(rng_path, weights_only=True))
    return int(state["step"])


def rng_states() -> dict:
    """This process's torch RNG states (CPU, and CUDA when present); dropout is the only consumer during training."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
