"""Step 6 of SSB: LoRA distillation of the hinted teacher into the bare-question student, as one program.

`train` reads top to bottom: setup (process group, data, model with LoRA, optimizer, schedule, resume), the training
loop, save (a standard PEFT adapter with its config, metrics and curve), cleanup. The same code runs on the CPU, on one
GPU, and on several through data parallelism:

    ssb train --pairs runs/demo/pairs --out runs/demo/adapter                           # one process
    accelerate launch --num_processes 4 -m cli.main train --pairs P --out O             # DDP, one GPU each
    torchrun --nproc_per_node 4 -m cli.main train --pairs P --out O                     # the same, with torchrun

What one step computes: the decoder body gives the student's final hidden states on prompt + explanation (the
(batch, sequence, vocabulary) logits are never built), and `services.trainer.losses` turns them into
T^2 * KL(teacher || student) on the explanation positions, chunk by chunk, against the stored top-k teacher (with its
tail bucket) or, with `teacher="online"`, against the same model with the adapter disabled on the hinted prompt.
Every explanation position of a step weighs the same: the sums of all micro-batches and processes are divided by
their total count once (the count is known before the forward pass, from the masks).

Data order: epoch e visits the pairs in a permutation drawn from (seed, e) alone, so a resumed run sees exactly the
batches the uninterrupted one would have. With P processes each takes every P-th pair of the permutation (padded by
wrapping around, so all processes run the same number of micro-batches). Only the main process writes files and
calls `on_step`.

Output directory:

    adapter_config.json, adapter_model.safetensors    the LoRA adapter (peft `save_pretrained`; vLLM loads it too)
    training_config.json                              the TrainConfig, model, pairs directory and number of pairs
    metrics.jsonl                                     one line per optimizer step (see StepMetrics)
    training_curve.png                                loss, gradient norm and explanation length against step
    checkpoints/step-<N>/                             adapter, optimizer, scheduler, RNG states and position
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from services.trainer.config import RESUMABLE_CHANGES, TrainConfig
from services.trainer.data import Batch, check_vocabulary, collate_examples, load_examples
from services.trainer.losses import LossSum, ce_chunked, kl_dense_chunked, kl_on_topk_chunked
from services.trainer.plots import plot_training_curve, read_metrics

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHECKPOINT_PREFIX = "step-"


class TrainingError(RuntimeError):
    """The run cannot start or resume as asked (occupied output directory, no checkpoint, changed settings)."""


class StepMetrics(BaseModel):
    """What one optimizer step logs to `metrics.jsonl` (all processes together)."""

    step: int = Field(description="Optimizer steps done, 1-based.")
    total_steps: int = Field(description="Optimizer steps the run will take.")
    epoch: float = Field(description="Epochs done, fractional: step / steps per epoch.")
    loss: float = Field(description="kd_weight * kl + ce_weight * ce, what the gradient was taken of.")
    kl: float = Field(description="T^2 * KL(teacher || student), mean over explanation positions.")
    ce: float | None = Field(
        description="Cross-entropy of the explanation tokens, nats per token; None when not computed."
    )
    grad_norm: float = Field(description="Global gradient norm of the LoRA weights before clipping.")
    lr: float = Field(description="Learning rate this step used.")
    explanation_tokens: float = Field(description="Mean explanation length, in tokens, of the step's pairs.")
    tokens_per_s: float = Field(description="Non-padding student tokens trained on per second (forward and backward).")


class TrainResult(BaseModel):
    """Where a finished run put things, and how it ended."""

    out_dir: Path = Field(description="The adapter directory (load it with peft or as a vLLM LoRA).")
    metrics_path: Path
    curve_path: Path
    config_path: Path
    steps: int = Field(description="Optimizer steps taken in total (including those before a resume).")
    num_pairs: int
    final_loss: float | None = Field(description="Loss of the last logged step; None when none was logged.")
    seconds: float = Field(description="Wall time of this call.")


class BatchLosses(NamedTuple):
    """The summed losses of one batch: the KL (always) and the CE (None when neither trained on nor logged)."""

    kl: LossSum
    ce: LossSum | None


class DecoderBody(nn.Module):
    """A causal LM's decoder without its output layer: (B, S) ids -> (B, S, H) hidden states after the final norm.

    The module that data parallelism wraps: gradients flow through its forward to the LoRA weights. The output
    layer's weight is frozen, so the losses may use it outside.
    """

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.decoder = causal_lm.get_decoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def train(
    pairs_dir: str | Path,
    out_dir: str | Path,
    model_path: str,
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[StepMetrics], None] | None = None,
    model: nn.Module | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the pairs in `pairs_dir`; write it and its records to `out_dir`.

    model_path: the base model (a local checkpoint or a Hugging Face id), loaded in `config.dtype`.
    resume: continue from the newest complete checkpoint in `out_dir/checkpoints` (the result equals the
        uninterrupted run's). Without it, `out_dir` must not hold an earlier run.
    on_step: called on the main process with each logged step's metrics (every `config.log_every` steps).
    model: the already loaded base model of `model_path`, used instead of loading one; LoRA layers are injected
        into it in place and stay there (the caller can inspect the trained weights), and `config.dtype` is not applied.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    # --- Setup: processes, output directory, data ---------------------------------------------------------------
    started = time.perf_counter()
    # On a machine without an accelerator, `cpu=True` makes torchrun / accelerate launch processes join one gloo
    # process group; without it each would train alone and all would write the same files.
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    main = accelerator.is_main_process
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    checkpoints_dir = out_dir / "checkpoints"
    if not resume and holds_a_run(out_dir):
        raise TrainingError(
            f"{out_dir} already holds a training run; resume it (--resume), or choose a new output directory"
        )
    checkpoint = latest_checkpoint(checkpoints_dir) if resume else None
    if resume and checkpoint is None:
        raise TrainingError(f"nothing to resume: no complete checkpoint in {checkpoints_dir}")
    examples = load_examples(pairs_dir, teacher=config.teacher)
    pairs_digest = digest_of([e.problem_id for e in examples])
    steps_per_epoch = count_steps_per_epoch(len(examples), config, accelerator.num_processes)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # --- Setup: model with LoRA, optimizer, schedule ------------------------------------------------------------
    set_seed(config.seed)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(config.dtype, accelerator.device))
    check_vocabulary(examples, model.get_output_embeddings().weight.shape[0])
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora).to(accelerator.device)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        "constant_with_warmup" if config.scheduler == "constant" else config.scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    body, optimizer = accelerator.prepare(DecoderBody(peft_model), optimizer)
    run_state = {
        "config": config.model_dump(mode="json"),
        "pairs_digest": pairs_digest,
        "num_processes": accelerator.num_processes,
    }

    step = 0
    if checkpoint is not None:
        step = load_checkpoint(checkpoint, peft_model, optimizer, scheduler, run_state, accelerator)
        if main:
            keep_metrics_through(metrics_path, step)
    if main:
        write_training_config(out_dir, config, model_path, pairs_dir, len(examples), total_steps, accelerator)
    accelerator.wait_for_everyone()

    # --- Train -------------------------------------------------------------------------------------------------
    peft_model.train()
    last: StepMetrics | None = None
    while step < total_steps:
        step_started = time.perf_counter()
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        indices = micro_batch_indices(
            len(examples),
            config,
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
        batches = [collate_examples([examples[i] for i in micro], pad_id).to(accelerator.device) for micro in indices]
        # The step's explanation positions over all micro-batches and processes: every one weighs 1 / count.
        count = reduce_sum(accelerator, float(sum(b.num_explanation_tokens for b in batches)))
        kl_sum = torch.zeros((), device=accelerator.device)
        ce_sum = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(body):
                losses = batch_losses(peft_model, batch, config, body=body)
                loss = config.kd_weight * losses.kl.total
                if config.ce_weight > 0:
                    loss = loss + config.ce_weight * losses.ce.total
                # Data parallelism averages gradients over processes; scaling by their number makes it a sum.
                accelerator.backward(loss * (accelerator.num_processes / max(count, 1.0)))
            kl_sum += losses.kl.total.detach()
            if losses.ce is not None:
                ce_sum += losses.ce.total.detach()
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        kl = reduce_sum(accelerator, kl_sum) / max(count, 1.0)
        ce = reduce_sum(accelerator, ce_sum) / max(count, 1.0) if losses.ce is not None else None
        pairs_in_step = reduce_sum(accelerator, float(sum(b.input_ids.shape[0] for b in batches)))
        tokens = reduce_sum(accelerator, float(sum(b.num_tokens for b in batches)))
        last = StepMetrics(
            step=step,
            total_steps=total_steps,
            epoch=step / steps_per_epoch,
            loss=config.kd_weight * kl + (config.ce_weight * ce if ce is not None else 0.0),
            kl=kl,
            ce=ce,
            grad_norm=float(grad_norm),
            lr=lr,
            explanation_tokens=count / pairs_in_step,
            tokens_per_s=tokens / (time.perf_counter() - step_started),
        )
        logged = step % config.log_every == 0 or step == total_steps
        if main and logged:
            with open(metrics_path, "a") as f:
                f.write(last.model_dump_json() + "\n")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            next_epoch, next_in_epoch = divmod(step, steps_per_epoch)
            position = {"step": step, "epoch": next_epoch, "step_in_epoch": next_in_epoch}
            save_checkpoint(
                checkpoints_dir,
                step,
                peft_model,
                optimizer,
                scheduler,
                {**run_state, **position},
                accelerator,
                keep=config.keep_checkpoints,
            )
        if main and logged and on_step is not None:
            on_step(last)

    # --- Save --------------------------------------------------------------------------------------------------
    peft_model.eval()
    accelerator.wait_for_everyone()
    curve_path = out_dir / "training_curve.png"
    if main:
        peft_model.save_pretrained(out_dir)
        plot_training_curve(read_metrics(metrics_path), curve_path)
    accelerator.wait_for_everyone()
    result = TrainResult(
        out_dir=out_dir,
        metrics_path=metrics_path,
        curve_path=curve_path,
        config_path=out_dir / "training_config.json",
        steps=step,
        num_pairs=len(examples),
        final_loss=last.loss if last is not None else last_logged_loss(metrics_path),
        seconds=time.perf_counter() - started,
    )

    # --- Cleanup: release the optimizer state and the device memory (a caller may start an engine next) --------
    del body, optimizer, scheduler, trainable
    accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def batch_losses(model: nn.Module, batch: Batch, config: TrainConfig, *, body: nn.Module | None = None) -> BatchLosses:
    """The summed KL (and CE) of one batch, on the explanation positions only.

    model: the causal LM (peft-wrapped in training; a plain one gives the base model's loss). Its output layer's
        weight forms the logits chunk by chunk; with `config.teacher == "online"` it is also the teacher, with its
        adapter disabled (a plain model is its own teacher).
    body: the decoder as training calls it (data-parallel wrapped); default `DecoderBody(model)`.
    """
    body = DecoderBody(model) if body is None else body
    lm_head_weight = model.get_output_embeddings().weight
    hidden = body(batch.input_ids, batch.attention_mask)
    if config.teacher == "online":
        disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with torch.no_grad(), disabled:
            teacher_hidden = DecoderBody(model)(batch.teacher_input_ids, batch.teacher_attention_mask)
        kl = kl_dense_chunked(
            hidden,
            teacher_hidden,
            lm_head_weight,
            batch.loss_mask,
            temperature=config.temperature,
            chunk_size=config.chunk_size,
            teacher_mask=batch.teacher_loss_mask,
        )
    else:
        kl = kl_on_topk_chunked(
            hidden,
            lm_head_weight,
            batch.topk_ids,
            batch.topk_logprobs,
            batch.loss_mask,
            temperature=config.temperature,
            chunk_size=config.chunk_size,
        )
    ce = None
    if config.ce_weight > 0:
        ce = ce_chunked(hidden, lm_head_weight, batch.target_ids, batch.loss_mask, chunk_size=config.chunk_size)
    elif config.log_ce:
        with torch.no_grad():
            ce = ce_chunked(
                hidden.detach(), lm_head_weight, batch.target_ids, batch.loss_mask, chunk_size=config.chunk_size
            )
    return BatchLosses(kl, ce)


def count_steps_per_epoch(num_examples: int, config: TrainConfig, num_processes: int = 1) -> int:
    """Optimizer steps in one pass over the pairs (the last step of an epoch may be smaller)."""
    per_process = math.ceil(num_examples / num_processes)
    return math.ceil(per_process / (config.batch_size * config.grad_accum))


def micro_batch_indices(
    num_examples: int,
    config: TrainConfig,
    *,
    epoch: int,
    step_in_epoch: int,
    process_index: int = 0,
    num_processes: int = 1,
) -> list[list[int]]:
    """The example indices of one optimizer step's micro-batches on one process.

    Epoch e's order is a permutation drawn from (seed, e) alone; it is wrapped around to a multiple of the number
    of processes, and process p takes every num_processes-th index starting at p.
    """
    order = np.random.default_rng([config.seed, epoch]).permutation(num_examples).tolist()
    per_process = math.ceil(num_examples / num_processes)
    order = [order[i % num_examples] for i in range(per_process * num_processes)]
    mine = order[process_index::num_processes]
    per_step = config.batch_size * config.grad_accum
    chunk = mine[step_in_epoch * per_step : (step_in_epoch + 1) * per_step]
    return [chunk[i : i + config.batch_size] for i in range(0, len(chunk), config.batch_size)]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it and float32 elsewhere."""
    if dtype == "auto":
        on_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, dtype)


def reduce_sum(accelerator, value: float | torch.Tensor) -> float:
    """The sum of a scalar over all processes, as a Python float (the value itself with one process)."""
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).reshape(1)
    return float(accelerator.reduce(tensor, reduction="sum"))


def digest_of(problem_ids: Sequence[str]) -> str:
    """A short fingerprint of the ordered pair ids, so a resume notices changed data."""
    return hashlib.sha256("\n".join(problem_ids).encode()).hexdigest()[:16]


def holds_a_run(out_dir: Path) -> bool:
    """True when `out_dir` already has an adapter, metrics or checkpoints."""
    return any((out_dir / name).exists() for name in ("adapter_config.json", "metrics.jsonl", "checkpoints"))


def write_training_config(
    out_dir: Path,
    config: TrainConfig,
    model_path: str,
    pairs_dir: str | Path,
    num_pairs: int,
    total_steps: int,
    accelerator,
) -> None:
    record = {
        "config": config.model_dump(mode="json"),
        "model": model_path,
        "pairs_dir": str(Path(pairs_dir).resolve()),
        "num_pairs": num_pairs,
        "total_steps": total_steps,
        "num_processes": accelerator.num_processes,
    }
    (out_dir / "training_config.json").write_text(json.dumps(record, indent=1) + "\n")


def last_logged_loss(metrics_path: Path) -> float | None:
    """The loss of the last logged step (a resumed run that had nothing left to do reports it)."""
    logged = read_metrics(metrics_path)
    return logged[-1]["loss"] if logged else None


def keep_metrics_through(metrics_path: Path, step: int) -> None:
    """Drop metric lines after `step` (logged by the interrupted run after its last checkpoint)."""
    kept = [m for m in read_metrics(metrics_path) if m["step"] <= step]
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))


# --- Checkpoints -----------------------------------------------------------------------------------------------


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
    torch.save(rng_states(), tmp / f"rng-{accelerator.process_index}.pt")
    if main:
        peft_model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)  # the same step written again after a resume
        os.replace(tmp, final)
        steps = sorted(int(p.name[len(CHECKPOINT_PREFIX) :]) for p in checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"))
        for old in steps[:-keep]:
            shutil.rmtree(checkpoints_dir / f"{CHECKPOINT_PREFIX}{old}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(checkpoint: Path, peft_model, optimizer, scheduler, run_state: dict, accelerator) -> int:
    """Restore adapter, optimizer, scheduler and RNG states from a checkpoint; return its step.

    Raises TrainingError when the checkpoint was written with other settings, other pairs or another number of
    processes (the resumed run would not continue the same computation).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((checkpoint / "state.json").read_text())
    changed = sorted(
        name
        for name in set(state["config"]) | set(run_state["config"])
        if name not in RESUMABLE_CHANGES and state["config"].get(name) != run_state["config"].get(name)
    )
    if changed:
        raise TrainingError(
            f"cannot resume from {checkpoint}: settings changed since it was written: {', '.join(changed)}"
        )
    if state["pairs_digest"] != run_state["pairs_digest"]:
        raise TrainingError(
            f"cannot resume from {checkpoint}: the pairs directory holds other pairs than it was trained on"
        )
    if state["num_processes"] != run_state["num_processes"]:
        raise TrainingError(
            f"cannot resume from {checkpoint}: written by {state['num_processes']} processes, resuming with "
            f"{run_state['num_processes']} (the data order depends on it)"
        )
    device = accelerator.device
    set_peft_model_state_dict(peft_model, load_file(str(checkpoint / "adapter_model.safetensors"), device=str(device)))
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
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
