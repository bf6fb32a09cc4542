"""Benchmark: one training step of this trainer against the reference approach, and how close top-k is to exact.

Part 1, cost. One LoRA step (forward, backward, gradient clipping, AdamW step; timed after one warm-up step) on the
same model with the same adapter (rank 32, alpha 32, all seven projections, float32), batch B, P prompt tokens and T
explanation tokens, synthetic token ids and a synthetic top-k teacher (cost does not depend on the values):

- ssb: `services.trainer.training.batch_losses` as `train` calls it: the decoder's hidden states, then T^2 * KL on the
  stored top-k (k = 20) with its tail bucket, the output layer applied 256 positions at a time.
- ssb + gradient checkpointing: the same, with the decoder's activations recomputed in backward
  (`--gradient-checkpointing` of `ssb train`): the decoder's saved activations, not the logits, are what grows with
  the sequence once the loss is chunked.
- ssb --teacher online: the exact full-vocabulary teacher computed in the step (the model with its adapter off, no
  gradient, on a hinted prompt three times the student's prompt plus the explanation): what exactness costs.
- reference: the collator builds a dense float32 (B, S, V) teacher tensor from the stored data (the top-k
  log-probabilities scattered into it, the remaining mass spread over the other tokens), the model computes its full
  (B, S, V) logits with a normal forward, and the loss is `F.kl_div` over the full vocabulary at T = 2, masked to the
  explanation positions.
- reference + gradient checkpointing: the same reference with the decoder recomputed in backward, so that each of
  our variants is also compared with the reference under the same decoder setting (what the loss and the teacher's
  representation cost, with the decoder's share equal on both sides).

Each measurement runs in its own process, so its peak resident memory (`ru_maxrss`, the whole process: weights,
data, activations) is its own, and a reference run that runs out of memory cannot take the others down: the child's
data segment is capped at the memory available when it starts (an allocation beyond it fails inside the child,
which reports "out of memory"), and a child killed by the kernel is reported as killed. The large reference run is
skipped when the smaller one predicts it will not fit. The model alone is measured the same way, in its own process.

Part 2, top-k fidelity. On one real batch (B pairs: the first B GSM8K train problems with their worked solution as
the correct hint, an explanation sampled from the base model on the hinted prompt at temperature 0.4; or the first B
pairs of `--pairs DIR`), the loss and the concatenated LoRA gradient with the top-k teacher for k in {8, 20, 64} are
compared with the exact online teacher (`teacher="online"`: the same model with the adapter disabled on the hinted
prompt, full vocabulary). The top-k are taken from the exact teacher's own log-softmax, so truncation (and the tail
bucket's estimate) is the only difference. LoRA B starts at N(0, 0.01^2) (seeded) instead of 0, so every LoRA weight
gets a gradient. k = V is a control: it must agree to float32 rounding. Each k is also scored with the teacher's
exact tempered tail mass in the bucket (the best any top-k-plus-bucket loss can do), and the whole comparison is
repeated at T = 1, where the bucket's weight is exact and only the KL inside the tail is lost.

On a busy machine pass `--threads 1`: two torch threads competing with other processes for two cores slow every
step down several times over, and unevenly.

    .venv/bin/python -m benchmarks.training                          # the full run: 1024 explanation tokens, and 512
    .venv/bin/python -m benchmarks.training --skip-reference-1024    # when the reference at 1024 cannot fit
    .venv/bin/python -m benchmarks.training --explanation-tokens 64 --comparison-tokens 32 --fidelity-tokens 48
    python3 -m benchmarks.training --shape qwen2.5-1.5b --device cuda --steps 3      # a GPU: bf16, adds MFU

s/step and tokens/s time the step (forward, backward, clipping, AdamW); `collate s` is the making of its batch before
it (for the reference, its dense teacher built on the CPU and copied to the device: about 2.8 GB a step for a
Qwen2.5 vocabulary at batch 4 and 1152 tokens); each speed ratio is given on the step alone and, in parentheses, with
collation. On a GPU (`--device cuda`) memory is `torch.cuda.max_memory_allocated` (weights included) and each step
is timed after synchronising; `--shape` builds a real model's configuration with random weights (no download), and
MFU is `step_flops` over the step time against the card's dense bf16 peak.

Prints one markdown table per part and writes everything to runs/bench/training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

GIB = 2**30
# Real models' shapes (Qwen2.5 configs), for `--shape`: random weights, the same cost per step as the real ones.
SHAPES = {
    "qwen2.5-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen2.5-3b": dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
}  # fmt: skip
RESULT_MARKER = "BENCHMARK-RESULT "
# Left to the rest of the machine when capping a child's memory.
MEMORY_MARGIN_GIB = 1.0
FIDELITY_KS = (8, 20, 64)
LORA_B_STD = 0.01
OUR_VARIANTS = ("ssb", "ssb-checkpointed", "ssb-online")
REFERENCE_VARIANTS = ("reference", "reference-checkpointed")
# Each of our variants against the reference with the same decoder setting (like for like).
BASELINE_OF = {"ssb": "reference", "ssb-checkpointed": "reference-checkpointed", "ssb-online": "reference"}
# The online teacher's hinted prompt: the question plus a correct and an incorrect response, against the bare question.
HINTED_PROMPT_FACTOR = 3
VARIANT_NAMES = {
    "ssb": "ssb (top-20, chunked loss)",
    "ssb-checkpointed": "ssb + gradient checkpointing",
    "ssb-online": "ssb --teacher online (exact, no stored signal)",
    "reference": "reference (dense teacher, full logits)",
    "reference-checkpointed": "reference + gradient checkpointing",
}


# --- Child processes: one measurement each ---------------------------------------------------------------------


def peak_gib(device: str = "cpu") -> float:
    """Peak memory so far: on the CPU this process's resident memory (Linux reports ru_maxrss in KiB), on a GPU the
    most memory torch has allocated on it (weights, activations, optimizer state; not the allocator's cache)."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def model_dtype(args):
    """The trainer's own rule (`--dtype auto`): bfloat16 on a GPU that supports it, float32 on the CPU."""
    import torch

    from services.trainer.modeling import resolve_dtype

    return resolve_dtype(args.dtype, torch.device(args.device))


def load_model(args):
    """The small real model from its checkpoint, or with `--shape` a real model's shape with random weights (a GPU box
    here reaches no network, and the cost of a step does not depend on the weights' values)."""
    import torch
    from transformers import AutoModelForCausalLM

    if args.shape is None:
        return AutoModelForCausalLM.from_pretrained(args.model_path, dtype=model_dtype(args)).to(args.device)
    from transformers import Qwen2Config

    torch.manual_seed(args.seed)
    config = Qwen2Config(**SHAPES[args.shape], rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
    with torch.device(args.device):
        return AutoModelForCausalLM.from_config(config, dtype=model_dtype(args))


def step_flops(model, batch: int, prompt_tokens: int, explanation_tokens: int, rank: int) -> float:
    """Model FLOPs of one LoRA step (for MFU): the forward, the backward's input gradients (the base weights are
    frozen, so they get none), and the LoRA weights' gradients; recomputation is not counted.

    Forward: 2 x (decoder matmul weights) per token, causal attention 2 x S^2 x H per layer and sequence (QK^T and
    AV, half the square), the output layer 2 x H x V per explanation token. Backward: the same again for the
    input gradients, plus 2 x r x (in + out) per adapted matrix and token for LoRA A and B.
    """
    config = model.config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)] + [
        (hidden, config.intermediate_size)
    ] * 2 + [(config.intermediate_size, hidden)]
    sequence = prompt_tokens + explanation_tokens
    tokens = batch * sequence
    forward = (
        2 * layers * sum(i * o for i, o in shapes) * tokens
        + 2 * layers * batch * sequence**2 * hidden
        + 2 * hidden * vocab * batch * explanation_tokens
    )
    lora_forward = 2 * layers * sum(rank * (i + o) for i, o in shapes) * tokens
    return 2 * forward + 3 * lora_forward  # LoRA: forward, input gradients, weight gradients


def device_peak_tflops(args) -> float | None:
    """Dense bfloat16 peak of the GPU, from `--peak-tflops` or its name (H100/H200 SXM: 989 TFLOP/s)."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    import torch

    name = torch.cuda.get_device_name() if args.device == "cuda" else ""
    return 989.0 if ("H100" in name or "H200" in name) else None


def add_lora(model, rank: int, seed: int):
    """The paper's adapter (alpha = rank, dropout 0, all seven projections), initialised from `seed`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from services.trainer.config import LORA_TARGET_MODULES

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(LORA_TARGET_MODULES), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def synthetic_examples(
    batch: int, prompt_tokens: int, explanation_tokens: int, k: int, vocab: int, seed: int, online: bool = False
):
    """B training examples of random ids with a random top-k teacher: k distinct ids per position, log-probabilities
    of a random distribution over k + 1 categories (the last one is the tail, so the top-k hold less than 1). With
    `online`, a hinted prompt as well (HINTED_PROMPT_FACTOR times the student's: the question plus two responses)."""
    import torch

    from services.trainer.data import TrainExample

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(batch):
        ids = torch.randint(0, vocab, (prompt_tokens + explanation_tokens,), generator=generator)
        topk_ids = torch.cat(
            [
                torch.rand(min(256, explanation_tokens - start), vocab, generator=generator).topk(k, dim=-1).indices
                for start in range(0, explanation_tokens, 256)
            ]
        )
        logits = 3 * torch.randn(explanation_tokens, k + 1, generator=generator)
        logprobs = torch.log_softmax(logits, dim=-1)[:, :k].sort(dim=-1, descending=True).values
        hinted = HINTED_PROMPT_FACTOR * prompt_tokens
        teacher_prompt = torch.randint(0, vocab, (hinted,), generator=generator)
        examples.append(
            TrainExample(
                problem_id=f"synthetic-{i}",
                input_ids=ids,
                prompt_length=prompt_tokens,
                topk_ids=topk_ids,
                topk_logprobs=logprobs,
                teacher_input_ids=torch.cat([teacher_prompt, ids[prompt_tokens:]]) if online else None,
                teacher_prompt_length=hinted if online else None,
            )
        )
    return examples


def collate_dense_teacher(examples, pad_id: int, vocab: int):
    """The reference collator: the batch plus a dense float32 (B, S, V) teacher log-probability tensor.

    At each explanation position the stored top-k log-probabilities are scattered into a row that spreads the
    remaining mass evenly over the other V - k tokens (a proper distribution); elsewhere the row is 0.
    """
    import torch

    from services.trainer.data import collate_examples
    from services.trainer.losses import log1mexp

    batch = collate_examples(examples, pad_id)
    dense = torch.zeros(*batch.input_ids.shape, vocab, dtype=torch.float32)  # (B, S, V)
    for row, e in enumerate(examples):
        k = e.topk_ids.shape[-1]
        tail = log1mexp(torch.logsumexp(e.topk_logprobs, dim=-1).clamp(max=0.0)) - math.log(vocab - k)  # (T,)
        positions = dense[row, e.prompt_length - 1 : e.input_ids.shape[0] - 1]  # (T, V) view, filled in place
        positions.copy_(tail[:, None].expand_as(positions))
        positions.scatter_(-1, e.topk_ids, e.topk_logprobs)
    return batch, dense


def reference_loss(model, batch, dense_teacher, temperature: float):
    """Full logits from a normal forward and full-vocabulary T^2 * KL(teacher || student), mean over positions."""
    import torch.nn.functional as F

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, S, V)
    student = F.log_softmax(logits / temperature, dim=-1)
    teacher = F.softmax(dense_teacher / temperature, dim=-1)
    per_position = F.kl_div(student, teacher, reduction="none").sum(-1)  # (B, S)
    mask = batch.loss_mask.float()
    return temperature**2 * (per_position * mask).sum() / mask.sum()


def measure_step(args) -> dict:
    """One variant's training step at one size; the warm-up step first, then `args.steps` timed steps."""
    import torch

    from services.trainer.config import TrainConfig
    from services.trainer.data import collate_examples
    from services.trainer.training import batch_losses

    torch.manual_seed(args.seed)
    model = load_model(args)
    after_load = peak_gib(args.device)
    if args.child.endswith("-checkpointed"):  # as `train` does with gradient_checkpointing=True
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, args.rank, args.seed)
    model.train()
    vocab = model.get_output_embeddings().weight.shape[0]
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    online = args.child == "ssb-online"
    examples = synthetic_examples(args.batch, args.prompt_tokens, args.tokens, args.topk, vocab, args.seed, online)
    on_gpu = args.device == "cuda"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    config = TrainConfig(
        rank=args.rank, alpha=args.rank, temperature=args.temperature, teacher="online" if online else "stored",
        **({"chunk_size": args.chunk_size} if args.chunk_size is not None else {}),
    )  # fmt: skip

    def one_step() -> tuple[float, float, float]:
        started = time.perf_counter()
        if args.child in REFERENCE_VARIANTS:
            batch, dense = collate_dense_teacher(examples, pad_id, vocab)
            batch, dense = batch.to(args.device), dense.to(args.device)
        else:
            batch = collate_examples(examples, pad_id).to(args.device)
        if on_gpu:
            torch.cuda.synchronize()
        collated = time.perf_counter()
        if args.child in REFERENCE_VARIANTS:
            loss = reference_loss(model, batch, dense, args.temperature)
        else:
            losses = batch_losses(model, batch, config)
            loss = losses.kl.total / losses.kl.count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss)  # waits for the GPU
        return collated - started, time.perf_counter() - collated, value

    one_step()  # warm-up: allocator, kernels, AdamW state
    timings = [one_step() for _ in range(args.steps)]
    tokens = args.batch * (args.prompt_tokens + args.tokens)
    step_s = sum(t[1] for t in timings) / len(timings)
    flops = step_flops(model, args.batch, args.prompt_tokens, args.tokens, args.rank)
    peak_tflops = device_peak_tflops(args)
    return {
        "status": "ok",
        "step_s": step_s,
        "collate_s": sum(t[0] for t in timings) / len(timings),
        "tokens_per_s": tokens / step_s,
        "peak_gib": peak_gib(args.device),
        "after_model_load_gib": after_load,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / (peak_tflops * 1e12) if peak_tflops else None,
        "loss": timings[-1][2],
        "tokens": tokens,
        "vocab": vocab,
        "dtype": str(model_dtype(args)).removeprefix("torch."),
        "device_name": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
    }


def measure_model_only(args) -> dict:
    load_model(args)
    return {"status": "ok", "peak_gib": peak_gib(args.device)}


def gsm8k_batch(tokenizer, model, batch: int, max_new_tokens: int, seed: int) -> list:
    """B online-teacher examples from the first GSM8K train problems: the worked solution as the correct hint, a wrong
    final answer as the incorrect one, and an explanation sampled from the base model on the hinted prompt."""
    import re

    import torch

    from services.trainer.data import TrainExample
    from shared.datasets import BENCHMARKS
    from shared.prompts import build_hinted_messages, build_student_messages, render_chat

    def render(messages) -> list[int]:
        return render_chat(tokenizer, messages).token_ids

    rows = [json.loads(line) for line in BENCHMARKS["gsm8k_train"].read_text().splitlines()[:batch]]
    students, teachers = [], []
    for row in rows:
        steps, gold = row["answer"].split("####")
        steps = re.sub(r"<<[^>]*>>", "", steps).strip()
        gold = gold.strip().replace(",", "")
        correct = f"{steps}\nThe answer is \\boxed{{{gold}}}."
        incorrect = f"{steps.splitlines()[0]}\nThe answer is \\boxed{{{int(gold) * 2 + 1}}}."
        students.append(render(build_student_messages(row["question"])))
        teachers.append(render(build_hinted_messages(row["question"], correct, incorrect)))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest = max(len(t) for t in teachers)
    input_ids = torch.tensor([[pad_id] * (longest - len(t)) + t for t in teachers])  # left padding for generation
    attention = torch.tensor([[0] * (longest - len(t)) + [1] * len(t) for t in teachers])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            temperature=0.4,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
        )
    examples = []
    for i, (student, teacher) in enumerate(zip(students, teachers)):
        generated = out[i, longest:].tolist()
        stops = {tokenizer.eos_token_id, pad_id}
        explanation = generated[: next((j for j, t in enumerate(generated) if t in stops), len(generated))]
        examples.append(
            TrainExample(
                problem_id=f"gsm8k-train-{i}",
                input_ids=torch.tensor(student + explanation),
                prompt_length=len(student),
                topk_ids=torch.zeros((len(explanation), 0), dtype=torch.int64),
                topk_logprobs=torch.zeros((len(explanation), 0)),
                teacher_input_ids=torch.tensor(teacher + explanation),
                teacher_prompt_length=len(teacher),
            )
        )
    return examples


def measure_fidelity(args) -> dict:
    """Loss and LoRA gradient with the top-k teacher at each k against the exact online teacher, on one batch."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    from services.trainer.config import TrainConfig
    from services.trainer.data import build_example, collate_examples
    from services.trainer.modeling import DecoderBody, output_layer_of
    from services.trainer.training import batch_losses
    from shared.storage import PairStore

    model = load_model(args).eval()
    if args.pairs is not None:
        store = PairStore(args.pairs)
        examples = [build_example(store.load_pair(i), teacher="online") for i in store.pair_ids()[: args.batch]]
        source = f"the first {len(examples)} pairs of {args.pairs}"
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
        examples = gsm8k_batch(tokenizer, model, args.batch, args.fidelity_tokens, args.seed)
        source = f"the first {len(examples)} GSM8K train problems, explanations sampled from the base model at T=0.4"
    model = add_lora(model, args.rank, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * LORA_B_STD)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batch = collate_examples(examples, pad_id)
    output_layer = output_layer_of(model)
    vocab = output_layer.weight.shape[0]

    with torch.no_grad(), model.disable_adapter():
        hidden = DecoderBody(model)(batch.teacher_input_ids, batch.teacher_attention_mask)
        teacher_logp = torch.log_softmax(output_layer.logits(hidden[batch.teacher_loss_mask]), dim=-1)  # (N, V)
    del hidden

    def gradient_of(loss: torch.Tensor) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).double()

    def compare(loss: float, grad: torch.Tensor, exact: tuple[float, torch.Tensor]) -> dict:
        return {
            "loss": loss,
            "loss_rel_error": abs(loss - exact[0]) / abs(exact[0]),
            "grad_rel_error": float((grad - exact[1]).norm() / exact[1].norm()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(grad, exact[1], dim=0)),
        }

    by_temperature = []
    for temperature in args.fidelity_temperatures:
        common = dict(rank=args.rank, alpha=args.rank, temperature=temperature, log_ce=False)
        exact = gradient_of(batch_losses(model, batch, TrainConfig(teacher="online", **common)).kl.mean())
        rows = []
        for k in [*args.fidelity_ks, vocab]:
            top = teacher_logp.topk(k, dim=-1)
            topk_ids = torch.zeros(*batch.loss_mask.shape, k, dtype=torch.int64)
            topk_logprobs = torch.zeros(*batch.loss_mask.shape, k)
            # The teacher's masked rows pair one to one, in order, with the student's (see services/trainer/data.py).
            topk_ids[batch.loss_mask] = top.indices
            topk_logprobs[batch.loss_mask] = top.values
            topk_batch = dataclasses.replace(batch, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
            stored = batch_losses(model, topk_batch, TrainConfig(teacher="stored", **common)).kl.mean()
            row = {
                "k": k,
                "control": k == vocab,
                "teacher_mass_in_topk": float(top.values.exp().sum(-1).mean()),
                "tempered_teacher_mass_in_topk": float(
                    torch.softmax(teacher_logp / temperature, dim=-1).gather(-1, top.indices).sum(-1).mean()
                ),
                **compare(*gradient_of(stored), exact),
            }
            if k < vocab and temperature != 1.0:  # at T = 1 the bucket's estimated weight is already exact
                merged = merged_kl(model, batch, teacher_logp, top.indices, temperature)
                row["exact_tail_weight"] = compare(*gradient_of(merged), exact)
            rows.append(row)
            del topk_ids, topk_logprobs, topk_batch, top
        by_temperature.append(
            {
                "temperature": temperature,
                "exact_loss": exact[0],
                "exact_grad_norm": float(exact[1].norm()),
                "rows": rows,
            }
        )
    return {
        "status": "ok",
        "source": source,
        "pairs": len(examples),
        "explanation_tokens": [e.explanation_length for e in examples],
        "positions": int(batch.loss_mask.sum()),
        "lora_parameters": int(exact[1].numel()),
        "by_temperature": by_temperature,
    }


def merged_kl(model, batch, teacher_logp, topk_ids, temperature: float):
    """T^2 * KL over the k teacher tokens plus one tail bucket, with the teacher's exact tempered tail weight.

    The best any top-k-plus-bucket loss can do: what it still misses is the KL inside the tail. Builds the full
    (N, V) logits (fine for one small batch). teacher_logp: (N, V) exact teacher log-probabilities at T = 1;
    topk_ids: (N, k). Returns the mean over the N explanation positions, with gradient.
    """
    import torch

    from services.trainer.modeling import DecoderBody, output_layer_of

    hidden = DecoderBody(model)(batch.input_ids, batch.attention_mask)[batch.loss_mask]  # (N, H)
    student = torch.log_softmax(output_layer_of(model).logits(hidden) / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logp / temperature, dim=-1)
    in_tail = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, topk_ids, False)

    def bucket(logp: torch.Tensor) -> torch.Tensor:  # (N, V) -> (N, k + 1)
        tail = torch.logsumexp(logp.masked_fill(~in_tail, -math.inf), dim=-1, keepdim=True)
        return torch.cat([logp.gather(-1, topk_ids), tail], dim=-1)

    teacher_b, student_b = bucket(teacher), bucket(student)
    return temperature**2 * (teacher_b.exp() * (teacher_b - student_b)).sum(-1).mean()


def run_child(args) -> None:
    """Measure one thing and print it as one JSON line; running out of memory is a result, not a crash."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.child == "model":
            result = measure_model_only(args)
        elif args.child == "fidelity":
            result = measure_fidelity(args)
        else:
            result = measure_step(args)
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and not any(
            m in str(exc) for m in ("can't allocate memory", "CUDA out of memory")
        ):
            raise
        result = {"status": "out of memory", "detail": str(exc).splitlines()[-1][:300], "peak_gib": peak_gib(args.device)}
    print(RESULT_MARKER + json.dumps(result), flush=True)


# --- The parent: runs the children and reports ---------------------------------------------------------------


def available_memory_gib() -> float:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return math.inf


def spawn(args, child: str, tokens: int | None = None) -> dict:
    """Run one measurement in a fresh process whose data segment is capped at the memory available now."""
    cap = available_memory_gib() - MEMORY_MARGIN_GIB
    command = [
        sys.executable, "-m", "benchmarks.training", "--child", child, "--device", args.device, "--dtype", args.dtype,
        "--batch", str(args.batch), "--prompt-tokens", str(args.prompt_tokens), "--rank", str(args.rank),
        "--topk", str(args.topk), "--temperature", str(args.temperature), "--steps", str(args.steps),
        "--seed", str(args.seed), "--fidelity-tokens", str(args.fidelity_tokens),
        "--fidelity-ks", *map(str, args.fidelity_ks), "--tokens", str(tokens or 0),
        "--fidelity-temperatures", *map(str, args.fidelity_temperatures),
    ]  # fmt: skip
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.model_path is not None:
        command += ["--model-path", args.model_path]
    if args.shape is not None:
        command += ["--shape", args.shape]
    if args.peak_tflops is not None:
        command += ["--peak-tflops", str(args.peak_tflops)]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    if args.pairs is not None:
        command += ["--pairs", str(args.pairs)]

    def cap_memory() -> None:  # not on a GPU: its driver maps more address space than any such cap allows
        if math.isfinite(cap) and args.device == "cpu":
            limit = max(int(cap * GIB), 2 * GIB)
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    label = child if tokens is None else f"{child}, {tokens} explanation tokens"
    print(f"measuring {label} (memory cap {cap:.1f} GiB) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=cap_memory, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1][len(RESULT_MARKER) :])
    elif done.returncode < 0:
        result = {"status": f"killed by signal {-done.returncode} (out of memory?)"}
    else:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        print(f"{label} failed (exit {done.returncode}):\n{tail}", file=sys.stderr)
        result = {"status": f"failed (exit {done.returncode})", "detail": tail[-2000:]}
    result["wall_s"] = time.perf_counter() - started
    result["memory_cap_gib"] = cap
    print(f"  {result['status']} in {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return result


def free_memory_gib(device: str) -> float:
    """What a measurement may still take: the GPU's free memory on a GPU (host memory is not where it runs out
    there), else the host's available memory less a margin for the rest of the machine."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0] / GIB
    return available_memory_gib() - MEMORY_MARGIN_GIB


def predicted_reference_gib(smaller: dict, model_gib: float, prompt: int, tokens_small: int, tokens: int) -> float:
    """The reference's peak at `tokens` from its peak at a smaller size (what lies above the model grows with B x S)."""
    return model_gib + (smaller["peak_gib"] - model_gib) * (prompt + tokens) / (prompt + tokens_small)


def measure_costs(args) -> dict:
    model_only = spawn(args, "model")
    sizes = sorted({args.comparison_tokens, args.explanation_tokens})
    by_size = {}
    for tokens in sizes:
        measured = {v: spawn(args, v, tokens) if v in args.variants else {"status": "not run"} for v in OUR_VARIANTS}
        large = tokens == args.explanation_tokens and tokens != args.comparison_tokens
        for variant in REFERENCE_VARIANTS:
            if variant not in args.variants:
                measured[variant] = {"status": "not run"}
                continue
            smaller = by_size.get(args.comparison_tokens, {}).get(variant, {})
            if large and args.skip_reference_1024:
                measured[variant] = {"status": "skipped (--skip-reference-1024)"}
            elif large and smaller.get("status") == "ok" and model_only.get("status") == "ok":
                needed = predicted_reference_gib(
                    smaller, model_only["peak_gib"], args.prompt_tokens, args.comparison_tokens, tokens
                )
                free = free_memory_gib(args.device)
                measured[variant] = (
                    spawn(args, variant, tokens)
                    if needed <= free
                    else {"status": f"skipped (predicted {needed:.1f} GiB, {free:.1f} GiB available)"}
                )
                measured[variant]["predicted_peak_gib"] = needed
            else:
                measured[variant] = spawn(args, variant, tokens)
        by_size[tokens] = measured
    return {"model_only": model_only, "by_explanation_tokens": by_size}


def ratio_cells(ours: dict, baseline: dict) -> list[str]:
    """Memory and speed of `ours` as fractions of `baseline` (memory: lower is better; speed: higher is better); speed
    on the step alone, then with the making of its batch (the reference's dense teacher is built there)."""
    if ours.get("status") != "ok" or baseline.get("status") != "ok":
        return ["-", "-"]
    with_collation = (baseline["step_s"] + baseline["collate_s"]) / (ours["step_s"] + ours["collate_s"])
    return [
        f"{ours['peak_gib'] / baseline['peak_gib']:.3f}",
        f"{ours['tokens_per_s'] / baseline['tokens_per_s']:.2f}x ({with_collation:.2f}x)",
    ]


def cost_table(costs: dict, args) -> str:
    model_gib = costs["model_only"].get("peak_gib", float("nan"))
    on_gpu = args.device == "cuda"
    first = next((r for m in costs["by_explanation_tokens"].values() for r in m.values() if "dtype" in r), {})
    where = f"{first.get('device_name', 'a GPU')}" if on_gpu else f"{os.cpu_count()} CPU cores"
    memory = "peak GPU GiB (allocated)" if on_gpu else "peak RSS GiB"
    lines = [
        f"One training step (forward, backward, AdamW): {args.shape or 'the small model'}, batch {args.batch}, "
        f"{args.prompt_tokens} prompt tokens, LoRA r={args.rank} on 7 projections, {first.get('dtype', args.dtype)}, "
        f"{where}; the model alone peaks at {model_gib:.2f} GiB. Ratios are ours / reference, first against the "
        "reference with the same decoder setting (gradient checkpointing on or off in both), then against the plain "
        "reference (memory: lower is better; speed: higher is better; in parentheses, the speed with collation, "
        "where the reference builds its dense teacher on the CPU and copies it to the device).",
        "",
        f"| explanation tokens | variant | s/step | tokens/s | {'MFU | ' if on_gpu else ''}collate s | {memory} "
        "| memory / speed vs same setting | memory / speed vs plain reference |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if on_gpu else ""),
    ]
    for tokens, measured in costs["by_explanation_tokens"].items():
        for variant in (*OUR_VARIANTS, *REFERENCE_VARIANTS):
            r = measured[variant]
            ok = r.get("status") == "ok"
            cells = [f"{r['step_s']:.2f}", f"{r['tokens_per_s']:,.0f}"] if ok else [r["status"], "-"]
            if on_gpu:
                cells.append(f"{r['mfu']:.1%}" if ok and r.get("mfu") is not None else "-")
            cells += [f"{r['collate_s']:.2f}", f"{r['peak_gib']:.2f}"] if ok else ["-", "-"]
            if variant in OUR_VARIANTS:
                cells += [
                    " / ".join(ratio_cells(r, measured[BASELINE_OF[variant]])),
                    " / ".join(ratio_cells(r, measured["reference"])),
                ]
            elif variant == "reference-checkpointed":
                cells += ["", " / ".join(ratio_cells(r, measured["reference"]))]
            else:
                cells += ["", ""]
            if r.get("status") != "not run":
                lines.append(f"| {tokens} | {VARIANT_NAMES[variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_table(fidelity: dict) -> str:
    if fidelity.get("status") != "ok":
        return f"Top-k fidelity: {fidelity.get('status')}"
    lines = [
        f"Top-k teacher against the exact online teacher: {fidelity['source']}; {fidelity['positions']} explanation "
        f"positions, {fidelity['lora_parameters']:,} LoRA weights. Errors are relative to the exact loss and gradient; "
        "'exact tail weight' is the same top-k plus one bucket with the teacher's true tempered tail mass (the best a "
        "bucket can do; what remains is the KL inside the tail).",
        "",
        "| T | k | teacher mass in top-k (T=1) | at T | loss | loss rel. error | gradient rel. error | gradient cosine "
        "| exact tail weight: loss / gradient rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for block in fidelity["by_temperature"]:
        t = f"{block['temperature']:g}"
        lines.append(f"| {t} | exact | 1 | 1 | {block['exact_loss']:.4f} | | | | |")
        for r in block["rows"]:
            k = f"{r['k']} (= V, control)" if r["control"] else str(r["k"])
            oracle = r.get("exact_tail_weight")
            oracle_cell = f"{oracle['loss_rel_error']:.2e} / {oracle['grad_rel_error']:.2e}" if oracle else ""
            lines.append(
                f"| {t} | {k} | {r['teacher_mass_in_topk']:.4f} | {r['tempered_teacher_mass_in_topk']:.4f} | "
                f"{r['loss']:.4f} | {r['loss_rel_error']:.2e} | {r['grad_rel_error']:.2e} | {r['grad_cosine']:.4f} | "
                f"{oracle_cell} |"
            )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--explanation-tokens", type=int, default=1024, help="The issue's size (default 1024).")
    parser.add_argument(
        "--comparison-tokens", type=int, default=512, help="Also measured, where the reference surely fits (512)."
    )
    parser.add_argument(
        "--skip-reference-1024", action="store_true", help="Skip the reference at --explanation-tokens."
    )
    parser.add_argument(
        "--variants", nargs="+", choices=[*OUR_VARIANTS, *REFERENCE_VARIANTS], default=[*OUR_VARIANTS, *REFERENCE_VARIANTS],
        help="Part 1's variants (default: all).",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha equal to it).")
    parser.add_argument("--topk", type=int, default=20, help="Stored top-k width of this trainer's step.")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="Positions per chunk of the loss (default: the trainer's, 256)."
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=1, help="Timed steps per variant, after one warm-up step.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fidelity-tokens", type=int, default=256, help="Longest sampled explanation in part 2.")
    parser.add_argument("--fidelity-ks", type=int, nargs="+", default=list(FIDELITY_KS))
    parser.add_argument(
        "--fidelity-temperatures",
        type=float,
        nargs="+",
        default=[2.0, 1.0],
        help="Part 2's temperatures: the paper's 2, and 1 (where the tail bucket's weight is exact).",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in each measurement (default: torch's)."
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="Set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in every measurement: larger blocks are mapped and returned "
        "to the system when freed (default: glibc's own, which keeps much of the freed memory resident).",
    )
    parser.add_argument("--skip-costs", action="store_true")
    parser.add_argument("--pairs", type=Path, default=None, help="Take part 2's batch from these curated pairs.")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--model", default=None, help="Model (default: the small default model).")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="A real model's shape with random weights, instead."
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on the CPU) or a torch dtype.")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="The GPU's dense peak for MFU (default: 989 on an H100/H200)."
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/training.json"))
    parser.add_argument("--child", choices=["model", *VARIANT_NAMES, "fidelity"], help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error(f"--chunk-size must be at least 1 (got {args.chunk_size})")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU on this machine")
    if args.shape is None:
        from cli.runtime import ensure_model
        from shared.settings import Settings

        args.model_path = ensure_model(args.model, Settings())
    else:
        args.skip_fidelity = True  # the fidelity part needs the real model's weights and tokenizer
    started = time.perf_counter()
    machine = {
        "cpus": os.cpu_count(),
        "memory_available_gib_at_start": available_memory_gib(),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    costs = {"status": "skipped"} if args.skip_costs else measure_costs(args)
    fidelity = {"status": "skipped"} if args.skip_fidelity else spawn(args, "fidelity")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.training", *sys.argv[1:]]),
        "model": args.model_path or f"{args.shape} (random weights)",
        "device": args.device,
        "dtype": args.dtype,
        "settings": {
            "batch": args.batch,
            "prompt_tokens": args.prompt_tokens,
            "explanation_tokens": args.explanation_tokens,
            "comparison_tokens": args.comparison_tokens,
            "lora_rank": args.rank,
            "chunk_size": args.chunk_size,
            "topk": args.topk,
            "temperature": args.temperature,
            "variants": args.variants,
            "timed_steps": args.steps,
            "seed": args.seed,
            "threads": args.threads,
            "malloc_mmap_threshold": args.malloc_mmap_threshold,
            "fidelity_ks": args.fidelity_ks,
            "fidelity_temperatures": args.fidelity_temperatures,
            "fidelity_tokens": args.fidelity_tokens,
            "fidelity_pairs": str(args.pairs) if args.pairs else None,
        },
        "machine": machine,
        "costs": costs,
        "fidelity": fidelity,
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(f".{args.out.name}.partial")  # whole or not at all (runs without the project, too)
    partial.write_text(json.dumps(report, indent=1) + "\n")
    partial.replace(args.out)
    print(cost_table(costs, args) if "by_explanation_tokens" in costs else "Training step: skipped")
    print()
    print(fidelity_table(fidelity))
    print(f"\nwritten to {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
