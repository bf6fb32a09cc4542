"""Benchmark: curation's throughput against its ceiling and the reference approach, its yield, and bytes stored per
explanation token.

Every side generates the same rollouts: the same model, the same problems (arithmetic, seed 0), K samples each at
temperature 0.8 and top-k 50, the same token limit, the worked example. `ssb curate` sends a batch of problems to vLLM
per call, together with the explanations of the batch before, and grades, picks hints and stores pairs; the ceiling is
plain vLLM generating the same rollouts in one call and nothing else; the reference calls transformers `generate` once
per sample. Storage compares the pair files written by the same run with the reference's full-vocabulary float32
logits per token.
The run also holds the yield yardstick: 200 problems with the demo's limits keep at least 10 verified pairs.

    .venv/bin/python -m benchmarks.curation [--problems 200] [--reference-problems 4] [--k 4]

Run in one process, so both numbers come from the same machine at the same time. The shares of the ceiling compare
unlike work: `ssb curate`'s engine calls generate rollouts and explanations (long hinted prompts, the top-20 of every
token), the ceiling rollouts alone, so they understate how close curation's own batching comes to it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cli.runtime import ensure_model
from services.curator.curation import curate, seeded_sampling
from services.teacher.engine import EngineOptions, TeacherEngine
from shared.arithmetic import make_arithmetic_problems
from shared.prompts import build_student_messages, render_chat
from shared.settings import CurationConfig, Settings
from shared.storage import PairStore, replace_atomically


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
        prompt = render_chat(tokenizer, build_student_messages(question, worked_example=worked_example)).token_ids
        ids = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.int64)}
        for _ in range(k):
            with torch.no_grad():
                out = model.generate(
                    **ids, do_sample=True, temperature=0.8, top_k=50, max_new_tokens=max_tokens,
                    pad_token_id=tokenizer.eos_token_id,
                )
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    seconds = time.perf_counter() - started
    return {"problems": len(questions), "tokens": tokens, "seconds": seconds}


def plain_vllm_rollouts(engine: TeacherEngine, problems, config: CurationConfig) -> dict:
    """The ceiling: vLLM alone generating the same rollouts (same prompts, sampling, per-problem seeds and limits) in
    one call, with nothing else: no grading, no hints, no explanations, no storage."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, params = [], []
    for problem in problems:
        rendered = engine.render(build_student_messages(problem.question, worked_example=config.worked_example))
        sampling = seeded_sampling(config.rollout_sampling(), config.seed, problem)
        prompts.append(TokensPrompt(prompt_token_ids=rendered.token_ids))
        params.append(
            SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                max_tokens=sampling.max_tokens, seed=sampling.seed,
            )
        )
    started = time.perf_counter()
    outputs = engine.llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    return {"problems": len(problems), "tokens": tokens, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=200, help="Arithmetic problems (seed 0) to curate.")
    parser.add_argument("--reference-problems", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rollout-max-tokens", type=int, default=192)
    parser.add_argument("--explanation-max-tokens", type=int, default=256)
    parser.add_argument("--min-pairs", type=int, default=10, help="The yield yardstick: fail below this many pairs.")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/curation.json"))
    args = parser.parse_args()

    settings = Settings()
    model_path = ensure_model(None, settings)
    problems = make_arithmetic_problems(args.problems, seed=0)
    config = CurationConfig(
        k=args.k, seed=0, worked_example=True, rollout_max_tokens=args.rollout_max_tokens,
        explanation_max_tokens=args.explanation_max_tokens, topk=20,
    )

    engine = TeacherEngine(EngineOptions(model=model_path, kv_cache_gib=settings.kv_cache_gib, enable_lora=False))
    vocab = len(engine.tokenizer)
    with engine, tempfile.TemporaryDirectory() as tmp:
        # Both sides warm (the first calls compile) and with an empty prefix cache (the ceiling would find curation's
        # rollout prompts there).
        curate(make_arithmetic_problems(4, seed=1), engine, PairStore(Path(tmp) / "warm-up"), config)
        engine.llm.reset_prefix_cache()
        store = PairStore(Path(tmp) / "curated")
        print(f"curating {len(problems)} problems with K={args.k}...", flush=True)
        started = time.perf_counter()
        funnel = curate(problems, engine, store, config)
        curate_seconds = time.perf_counter() - started
        pair_bytes = sum(p.stat().st_size for p in store.pairs_dir.glob("*.safetensors"))
        pair_tokens = sum(len(p.token_ids) for p in store.iter_pairs())
        print("the ceiling: plain vLLM, the same rollouts in one call...", flush=True)
        engine.llm.reset_prefix_cache()
        ceiling = plain_vllm_rollouts(engine, problems, config)
    # The engine's calls while curating: rollouts and explanations batched together (curation is pipelined).
    ssb = {"problems": len(problems), "tokens": funnel.generated_tokens, "seconds": funnel.engine_seconds}
    print(f"reference: {args.reference_problems} problems, one sample per generate call...", flush=True)
    reference = reference_rollouts(
        model_path, [p.question for p in problems[: args.reference_problems]], args.k, args.rollout_max_tokens, True
    )
    runs = (("ssb", ssb), ("reference", reference), ("plain_vllm", ceiling))
    result = {
        "ssb": ssb,
        "reference": reference,
        "plain_vllm": ceiling,
        "tokens_per_s": {name: r["tokens"] / r["seconds"] for name, r in runs},
        "problems_per_min": {name: 60 * r["problems"] / r["seconds"] for name, r in runs},
        "curation_seconds": curate_seconds,
        "curation_tokens_per_s": funnel.generated_tokens / curate_seconds,
        "funnel": {
            "problems": funnel.problems, "with_mix": funnel.with_mix, "explained": funnel.explained,
            "pairs": funnel.pairs, "dropped": funnel.dropped,
        },
        "pairs": funnel.pairs,
        "explanation_tokens": pair_tokens,
        "bytes_per_token": pair_bytes / pair_tokens if pair_tokens else None,
        "reference_bytes_per_token": 4 * vocab,
        "vocab": vocab,
        "topk": config.topk,
    }
    tokens_per_s = result["tokens_per_s"]
    print(json.dumps(result, indent=2))
    print(
        f"engine calls: ssb {tokens_per_s['ssb']:.0f} tok/s (rollouts and explanations) = "
        f"{tokens_per_s['ssb'] / tokens_per_s['plain_vllm']:.2f} of plain vLLM's {tokens_per_s['plain_vllm']:.0f} "
        "on the rollouts alone, "
        f"{tokens_per_s['ssb'] / tokens_per_s['reference']:.1f}x the reference's {tokens_per_s['reference']:.0f}; "
        f"all of curation (rollouts, grading, explanations, storage): {result['curation_tokens_per_s']:.0f} "
        f"generated tok/s = {result['curation_tokens_per_s'] / tokens_per_s['plain_vllm']:.2f} of the ceiling"
    )
    print(f"yield: {funnel.pairs} pairs from {funnel.problems} problems ({funnel.with_mix} with a mix; {funnel.dropped})")
    if pair_tokens:
        print(
            f"storage: {result['bytes_per_token']:.0f} bytes/token vs {4 * vocab:,} (float32 logits): "
            f"{4 * vocab / result['bytes_per_token']:.0f}x smaller"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(args.out, json.dumps(result, indent=2))
    if funnel.pairs < args.min_pairs:
        raise SystemExit(f"yield yardstick missed: {funnel.pairs} pairs < {args.min_pairs}")


if __name__ == "__main__":
    main()
