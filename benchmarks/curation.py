"""Benchmark: rollout throughput of `ssb curate` against the reference approach, and bytes stored per explanation token.

Both sides generate the same rollouts: the same model, the same problems (arithmetic, seed 0), K samples each at
temperature 0.8 and top-k 50, the same token limit. SSB sends every problem of a batch to vLLM in one call; the reference
calls transformers `generate` once per sample. Storage compares the pair files written by the same run with the
reference's full-vocabulary float32 logits per explanation token.

    .venv/bin/python -m benchmarks.curation [--problems 32] [--reference-problems 4] [--k 4] [--max-tokens 256]

Run in one process, so both numbers come from the same machine at the same time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cli.runtime import ensure_model
from services.curator.curation import curate
from services.teacher.engine import EngineOptions, TeacherEngine
from shared.arithmetic import make_arithmetic_problems
from shared.prompts import build_student_messages
from shared.settings import CurationConfig, Settings
from shared.storage import PairStore


def reference_rollouts(model_path: str, questions: list[str], k: int, max_tokens: int, worked_example: bool) -> dict:
    """The reference way: transformers `generate`, one sample per call, in float32 (its fastest dtype on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # float32: on a CPU without bf16 arithmetic, bf16 `generate` runs at about 1 token/s; float32 is the reference's best.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    tokens = 0
    started = time.perf_counter()
    for question in questions:
        messages = [m.model_dump() for m in build_student_messages(question, worked_example=worked_example)]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        for _ in range(k):
            with torch.no_grad():
                out = model.generate(
                    **ids, do_sample=True, temperature=0.8, top_k=50, max_new_tokens=max_tokens,
                    pad_token_id=tokenizer.eos_token_id,
                )
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    seconds = time.perf_counter() - started
    return {"problems": len(questions), "tokens": tokens, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--reference-problems", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/curation.json"))
    args = parser.parse_args()

    settings = Settings()
    model_path = ensure_model(None, settings)
    problems = make_arithmetic_problems(args.problems, seed=0)
    config = CurationConfig(k=args.k, rollout_max_tokens=args.max_tokens, worked_example=True, batch_size=args.problems)

    engine = TeacherEngine(EngineOptions(model=model_path, kv_cache_gib=settings.kv_cache_gib))
    vocab = len(engine.tokenizer)
    with engine, tempfile.TemporaryDirectory() as tmp:
        store = PairStore(tmp)
        print(f"curating {len(problems)} problems with K={args.k}...", flush=True)
        funnel = curate(problems, engine, store, config)
        pair_bytes = sum(p.stat().st_size for p in store.pairs_dir.glob("*.safetensors"))
        pair_tokens = sum(len(p.token_ids) for p in store.iter_pairs())
    ssb = {"problems": len(problems), "tokens": funnel.rollout_tokens, "seconds": funnel.rollout_seconds}
    print(f"reference: {args.reference_problems} problems, one sample per generate call...", flush=True)
    reference = reference_rollouts(
        model_path, [p.question for p in problems[: args.reference_problems]], args.k, args.max_tokens, True
    )
    result = {
        "ssb": ssb,
        "reference": reference,
        "tokens_per_s": {name: r["tokens"] / r["seconds"] for name, r in (("ssb", ssb), ("reference", reference))},
        "problems_per_min": {
            name: 60 * r["problems"] / r["seconds"] for name, r in (("ssb", ssb), ("reference", reference))
        },
        "pairs": funnel.pairs,
        "explanation_tokens": pair_tokens,
        "bytes_per_token": pair_bytes / pair_tokens if pair_tokens else None,
        "reference_bytes_per_token": 4 * vocab,
        "vocab": vocab,
        "topk": config.topk,
    }
    speedup = result["tokens_per_s"]["ssb"] / result["tokens_per_s"]["reference"]
    print(json.dumps(result, indent=2))
    print(
        f"rollouts: ssb {result['tokens_per_s']['ssb']:.0f} tok/s, {result['problems_per_min']['ssb']:.1f} problems/min; "
        f"reference {result['tokens_per_s']['reference']:.0f} tok/s, "
        f"{result['problems_per_min']['reference']:.1f} problems/min; speed-up {speedup:.1f}x"
    )
    if pair_tokens:
        print(
            f"storage: {result['bytes_per_token']:.0f} bytes/token vs {4 * vocab:,} (float32 logits): "
            f"{4 * vocab / result['bytes_per_token']:.0f}x smaller"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
