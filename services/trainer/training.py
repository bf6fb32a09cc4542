"""Step 6 of SSB: LoRA distillation of the hinted teacher into the bare-question student, as one program.

`train` reads top to bottom: setup (process group, data, model with LoRA, optimizer, schedule, resume), the training
loop (one `optimizer_step` at a time), save (a standard PEFT adapter with its config, metrics and curve), cleanup.
Checkpoints, RNG states and the run's records live in `services/trainer/checkpoints.py`; the model's decoder body and
output step in `services/trainer/modeling.py`; the losses in `services/trainer/losses.py`. The same code runs on the
CPU, on one GPU, and on several through data parallelism:

    ssb train --pairs runs/demo/pairs --out runs/demo/adapter                           # one process
    accelerate launch --num_processes 4 -m cli.main train --pairs P --out O             # DDP, one GPU each
    torchrun --nproc_per_node 4 -m cli.main train --pairs P --out O                     # the same, with torchrun

What one step computes: the decoder body gives the student's final hidden states on prompt + explanation (the
(batch, sequence, vocabulary) logits are never built), and `services.trainer.losses` turns them, through the model's
own output step, into T^2 * KL(teacher || student) on the explanation positions, chunk by chunk, against the same
model with the adapter disabled on the hinted prompt (`teacher="online"`, the default at T != 1) or the stored top-k
teacher with its tail bucket (`teacher="stored"`, the default at T = 1). Every explanation position of a step weighs
the same: the sums of all micro-batches and processes are divided by their total count once (the count is known
before the forward pass, from the masks).

Learning rate: `learning_rate_factor`, HF transformers' warm-up schedules with the warm-up's zero dropped, so every
optimizer step moves the weights.

Data order: epoch e visits the pairs in a permutation drawn from (seed, e) alone, so a resumed run sees exactly the
batches the uninterrupted one would have. With P processes each takes every P-th pair of the permutation (padded by
wrapping around, so all processes run the same number of micro-batches). Only the main process writes files and
calls `on_step`.

Output directory:

    adapter_config.json, adapter_model.safetensors    the LoRA adapter (peft `save_pretrained`; vLLM loads it too)
    training_config.json                              the TrainConfig, model, pairs directory and number of pairs
    pair_ids.txt                                      the pairs trained on (a resume trains on these)
    metrics.jsonl                                     one line per optimizer step (see StepMetrics)
    training_curve.png                                loss, gradient norm and explanation length against step
    checkpoints/step-<N>/                             adapter, optimizer, scheduler, RNG states and position
"""

from __future__ import annotations

import contextlib
import functools
import gc
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

from services.trainer.checkpoints import (
    digest_of,
    digest_of_examples,
    keep_metrics_through,
    last_logged_loss,
    load_checkpoint,
    model_fingerprint,
    read_pair_ids,
    save_checkpoint,
    write_pair_ids,
    write_training_config,
)
from services.trainer.config import TrainConfig, TrainingError  # TrainingError: callers import it from here too
from services.trainer.data import Batch, check_vocabulary, collate_examples, load_examples
from services.trainer.inputs import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_STAGING_DIR,
    CHECKPOINTS_DIR,
    CURVE_FILE,
    METRICS_FILE,
    TRAINING_CONFIG_FILE,
    check_output_dir,
    claimed_output_dir,
    clear_stopped_attempt,
    latest_checkpoint,
    pair_store,
)
from services.trainer.losses import LossSum, ce_chunked, kl_dense_chunked, kl_on_topk_chunked
from services.trainer.modeling import (
    DecoderBody,
    check_output_layer,
    output_layer_of,
    resolve_dtype,
    switch_off_dropout,
)
from services.trainer.plots import plot_training_curve, read_metrics
from shared.storage import sync_directory, sync_tree


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
    resumed_from_step: int | None = Field(
        default=None, description="The step of the checkpoint a resumed run went on from (None: from the start)."
    )
    num_pairs: int
    final_loss: float | None = Field(description="Loss of the last logged step; None when none was logged.")
    seconds: float = Field(description="Wall time of this call.")


class BatchLosses(NamedTuple):
    """The summed losses of one batch: the KL (always) and the CE (None when neither trained on nor logged)."""

    kl: LossSum
    ce: LossSum | None


def train(
    pairs_dir: str | Path,
    out_dir: str | Path,
    model_path: str,
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[StepMetrics], None] | None = None,
    before_write: Callable[[], None] | None = None,
    model: nn.Module | None = None,
    hold_output_dir: bool = True,
) -> TrainResult:
    """Train a LoRA adapter on the pairs in `pairs_dir`; write it and its records to `out_dir`.

    model_path: the base model (a local checkpoint or a Hugging Face id), loaded in `config.dtype`.
    resume: continue from the newest complete checkpoint in `out_dir/checkpoints` (the result equals the
        uninterrupted run's). Without it, `out_dir` must not hold an earlier run.
    on_step: called on the main process with each logged step's metrics (every `config.log_every` steps).
    before_write: called on the main process before a step writes its metrics line or a checkpoint, and before the
        adapter is saved; what it raises stops the run (the trainer service's attempt that a later one took over).
        For one process: with several, the others would wait for a checkpoint the main process never joins.
    model: the already loaded base model of `model_path`, used instead of loading one; LoRA layers are injected
        into it in place and stay there (the caller can inspect the trained weights), and `config.dtype` is not applied.
    hold_output_dir: hold `out_dir` (`claimed_output_dir`) until it returns, so that a second run there is refused;
        False where something else keeps the attempts at a run apart (the trainer service's records: an attempt that
        takes a stalled one over resumes while the stalled one runs on until its next write, then stops).
    Raises TrainingError (an occupied `out_dir`, nothing to resume, changed settings, a model whose logits the
    trainer cannot reproduce) and PairDataError (pairs that cannot be trained on) before the first step. Clears what
    an attempt that stopped before its first checkpoint left in `out_dir`.
    """
    with contextlib.ExitStack() as claims:
        return train_holding(
            claims if hold_output_dir else None, pairs_dir, out_dir, model_path, config, resume=resume,
            on_step=on_step, before_write=before_write, model=model,
        )


def train_holding(
    claims: contextlib.ExitStack | None,
    pairs_dir: str | Path,
    out_dir: str | Path,
    model_path: str,
    config: TrainConfig,
    *,
    resume: bool,
    on_step: Callable[[StepMetrics], None] | None,
    before_write: Callable[[], None] | None,
    model: nn.Module | None,
) -> TrainResult:
    """`train`, with what it holds until it returns (the output directory's lock) entered into `claims` (None: no
    lock)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # --- Setup: processes, output directory, data ---------------------------------------------------------------
    started = time.perf_counter()
    # On a machine without an accelerator, `cpu=True` makes torchrun / accelerate launch processes join one gloo
    # process group; without it each would train alone and all would write the same files.
    # Mixed precision and gradient accumulation are set here, not by `accelerate launch` or ACCELERATE_* variables:
    # the model computes in `config.dtype` throughout (teacher pass and loss included), and the micro-batches of a
    # step are accumulated by `optimizer_step` with weights of its own.
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision="no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
    )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise TrainingError(
            f"{accelerator.distributed_type.value} is not supported: launch plain data parallelism "
            "(torchrun, or `accelerate launch` without DeepSpeed, FSDP or Megatron)"
        )
    main = accelerator.is_main_process
    out_dir = Path(out_dir)
    metrics_path = out_dir / METRICS_FILE
    checkpoints_dir = out_dir / CHECKPOINTS_DIR
    left = check_output_dir(out_dir, resume=resume)  # in every process: a refusal stops them all alike
    checkpoint = latest_checkpoint(checkpoints_dir) if resume else None
    if resume and checkpoint is None:
        raise TrainingError(
            f"nothing to resume: no complete checkpoint in {checkpoints_dir}; train without resuming (what the run "
            "left there is cleared, and it starts over)"
        )
    # The pairs of the run, fixed when it starts (curation may still be writing): the main process lists them, and
    # every process, now and on a resume, trains on that list.
    started_on = read_pair_ids(out_dir) if checkpoint is not None else None
    store = pair_store(pairs_dir) if started_on is None else None  # a directory without pairs: all processes stop
    accelerator.wait_for_everyone()  # every process has checked before the main one clears
    if main:
        if claims is not None:
            claims.enter_context(claimed_output_dir(out_dir))
            left = check_output_dir(out_dir, resume=resume)  # again: another run may have ended there meanwhile
        clear_stopped_attempt(out_dir, left)
        if store is not None:
            write_pair_ids(out_dir, store.pair_ids())
    accelerator.wait_for_everyone()  # cleared and listed before any process reads or writes there
    if started_on is None:
        started_on = read_pair_ids(out_dir)
    examples = load_examples(pairs_dir, teacher=config.teacher, problem_ids=started_on)
    steps_per_epoch = count_steps_per_epoch(len(examples), config, accelerator.num_processes)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    # --- Setup: model with LoRA, optimizer, schedule ------------------------------------------------------------
    set_seed(config.seed)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(config.dtype, accelerator.device))
    model.to(accelerator.device)
    base_model = model_fingerprint(model)  # before the adapter's layers join it
    switch_off_dropout(model)
    check_vocabulary(examples, model.get_output_embeddings().weight.shape[0])
    check_output_layer(model, examples[0].input_ids)  # the losses form the logits as the model does, or refuse
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
    try:
        peft_model = get_peft_model(model, lora).to(accelerator.device)
    except ValueError as exc:  # target modules the model does not have: no retry changes that
        raise TrainingError(f"the LoRA adapter cannot be built on {model_path}: {exc}") from exc
    output_layer_of(peft_model)  # refuses an adapter on the output layer, which the losses would not apply
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = learning_rate_scheduler(optimizer, config, total_steps)
    body, optimizer = accelerator.prepare(DecoderBody(peft_model), optimizer)
    run_state = {
        "config": config.model_dump(mode="json"),
        "pairs_digest": digest_of([e.problem_id for e in examples]),
        "pairs_content": digest_of_examples(examples),
        "model": base_model,
        "num_processes": accelerator.num_processes,
    }

    step, resumed_from = 0, None
    if checkpoint is not None:
        step = resumed_from = load_checkpoint(checkpoint, peft_model, optimizer, scheduler, run_state, accelerator)
        if main:
            keep_metrics_through(metrics_path, step)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_training_config(
            out_dir, config, model_path, pairs_dir, len(examples), total_steps, accelerator.num_processes
        )
    accelerator.wait_for_everyone()

    # --- Train -------------------------------------------------------------------------------------------------
    peft_model.train()
    last: StepMetrics | None = None
    while step < total_steps:
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
        last = optimizer_step(peft_model, body, batches, config, optimizer, scheduler, trainable, accelerator)
        step += 1
        last = last.model_copy(update={"step": step, "total_steps": total_steps, "epoch": step / steps_per_epoch})

        logged = step % config.log_every == 0 or step == total_steps
        checkpointing = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
        if main and (logged or checkpointing) and before_write is not None:
            before_write()
        if main and logged:
            with open(metrics_path, "a") as f:
                f.write(last.model_dump_json() + "\n")
        if checkpointing:
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
    curve_path = out_dir / CURVE_FILE
    if main:
        if before_write is not None:
            before_write()
        save_adapter(peft_model, out_dir)
        plot_training_curve(read_metrics(metrics_path), curve_path)
    accelerator.wait_for_everyone()
    result = TrainResult(
        out_dir=out_dir,
        metrics_path=metrics_path,
        curve_path=curve_path,
        config_path=out_dir / TRAINING_CONFIG_FILE,
        steps=step,
        resumed_from_step=resumed_from,
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


def save_adapter(peft_model, out_dir: Path) -> None:
    """The adapter's files into `out_dir`, its config last: a directory with `adapter_config.json` holds whole weights
    (a run killed while saving leaves no adapter that looks finished). Not peft's model card (`README.md`): it would
    replace a README of the user's in `out_dir`."""
    staging = out_dir / ADAPTER_STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    try:
        peft_model.save_pretrained(staging)
        sync_tree(staging)  # on disk before the config names the weights whole, after a power loss too
        files = sorted(staging.iterdir(), key=lambda path: path.name == ADAPTER_CONFIG_FILE)
        for path in files:
            if path.name != "README.md":
                os.replace(path, out_dir / path.name)
        sync_directory(out_dir)
    finally:  # a save cut short (a signal, a full disk) leaves no staging directory either
        shutil.rmtree(staging, ignore_errors=True)


def optimizer_step(
    peft_model: nn.Module,
    body: nn.Module,
    batches: Sequence[Batch],
    config: TrainConfig,
    optimizer,
    scheduler,
    trainable: Sequence[torch.Tensor],
    accelerator,
) -> StepMetrics:
    """One optimizer step over this process's micro-batches; returns its metrics (all processes together).

    The step's position (step, total_steps, epoch) is left at 0 for the caller to fill in.
    """
    step_started = time.perf_counter()
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
    if not math.isfinite(float(grad_norm)):  # the same global norm on every process: all stop together
        raise TrainingError(
            f"the gradient is not finite (norm {float(grad_norm)}, KL {float(kl_sum)}): nothing was applied. A pair "
            "with non-finite log-probabilities, or a learning rate too high; the last checkpoint is intact"
        )
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    kl = reduce_sum(accelerator, kl_sum) / max(count, 1.0)
    ce = reduce_sum(accelerator, ce_sum) / max(count, 1.0) if losses.ce is not None else None
    pairs_in_step = reduce_sum(accelerator, float(sum(b.input_ids.shape[0] for b in batches)))
    tokens = reduce_sum(accelerator, float(sum(b.num_tokens for b in batches)))
    return StepMetrics(
        step=0,
        total_steps=0,
        epoch=0.0,
        loss=config.kd_weight * kl + (config.ce_weight * ce if ce is not None else 0.0),
        kl=kl,
        ce=ce,
        grad_norm=float(grad_norm),
        lr=lr,
        explanation_tokens=count / pairs_in_step,
        tokens_per_s=tokens / (time.perf_counter() - step_started),
    )


def batch_losses(model: nn.Module, batch: Batch, config: TrainConfig, *, body: nn.Module | None = None) -> BatchLosses:
    """The summed KL (and CE) of one batch, on the explanation positions only.

    model: the causal LM (peft-wrapped in training; a plain one gives the base model's loss). Its output step
        (`modeling.output_layer_of`) forms the logits chunk by chunk; with `config.teacher == "online"` it is also
        the teacher, with its adapter disabled (a plain model is its own teacher).
    body: the decoder as training calls it (data-parallel wrapped); default `DecoderBody(model)`.
    """
    body = DecoderBody(model) if body is None else body
    output_layer = output_layer_of(model)
    hidden = body(batch.input_ids, batch.attention_mask)
    if config.teacher == "online":
        disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with torch.no_grad(), disabled:
            teacher_hidden = DecoderBody(model)(batch.teacher_input_ids, batch.teacher_attention_mask)
        kl = kl_dense_chunked(
            hidden,
            teacher_hidden,
            output_layer,
            batch.loss_mask,
            temperature=config.temperature,
            chunk_size=config.chunk_size,
            teacher_mask=batch.teacher_loss_mask,
        )
    else:
        kl = kl_on_topk_chunked(
            hidden,
            output_layer,
            batch.topk_ids,
            batch.topk_logprobs,
            batch.loss_mask,
            temperature=config.temperature,
            chunk_size=config.chunk_size,
        )
    ce = None
    if config.ce_weight > 0:
        ce = ce_chunked(hidden, output_layer, batch.target_ids, batch.loss_mask, chunk_size=config.chunk_size)
    elif config.log_ce:
        with torch.no_grad():
            ce = ce_chunked(
                hidden.detach(), output_layer, batch.target_ids, batch.loss_mask, chunk_size=config.chunk_size
            )
    return BatchLosses(kl, ce)


def learning_rate_factor(step_index: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """The fraction of the peak learning rate that optimizer step `step_index` (0-based) uses.

    After the W = warmup_steps warm-up steps this is HF transformers' schedule exactly
    (`get_{cosine,linear,constant}_schedule_with_warmup`): with progress p = (i - W) / (total_steps - W), cosine
    0.5 * (1 + cos(pi * p)), linear 1 - p, constant 1; the last step (p < 1) still moves the weights. During the
    warm-up HF uses i / W, which makes the first step's rate exactly 0: an optimizer step that changes no weight but
    still feeds Adam's moment estimates (the first of 15 steps, at 10% warm-up). Here step i of the warm-up uses
    (i + 1) / (W + 1): the same straight line to the peak, without its zero.
    """
    if step_index < warmup_steps:
        return (step_index + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step_index - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate schedule {kind!r}: cosine, linear or constant")


def learning_rate_scheduler(optimizer, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`learning_rate_factor` for this run, stepped once per optimizer step (its state is saved in checkpoints)."""
    factor = functools.partial(
        learning_rate_factor,
        warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        total_steps=total_steps,
        kind=config.scheduler,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def reduce_sum(accelerator, value: float | torch.Tensor) -> float:
    """The sum of a scalar over all processes, as a Python float (the value itself with one process)."""
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).reshape(1)
    return float(accelerator.reduce(tensor, reduction="sum"))
