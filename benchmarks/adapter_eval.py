"""Benchmark: evaluating an adapter as a LoRA inside the engine against merging it into a copy of the base weights.

The same held-out problems (arithmetic, seed 1, the worked example, greedy, the demo's answer limit) are answered by:
the base model, the adapter served as a LoRA beside the base weights (one engine), and the adapter merged into a copy
of the weights and served by an engine of its own (the merge and that engine's start are counted). Also reported:
how many greedy answers the two ways of serving the adapter agree on.

    .venv/bin/python -m benchmarks.adapter_eval [--problems 60] [--max-tokens 256] [--adapter DIR]

Without `--adapter`, a rank-32 LoRA on every projection (the paper's shape) with small random weights stands in for a
trained one. Run in one process, so every number comes from the same machine at the same time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cli.runtime import ensure_model
from services.evaluation.evaluation import EvalConfig, evaluate
from services.teacher.engine import EngineOptions, TeacherEngine
from services.teacher.merging import merge_adapter
from shared.arithmetic import make_arithmetic_problems
from shared.settings import Settings

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stand_in_adapter(model_path: str, out: Path) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.02)
    peft_model.save_pretrained(out)
    return str(out)


def timed_evaluation(problems, engine, config, adapter) -> tuple[float, list]:
    started = time.perf_counter()
    report = evaluate(problems, engine, config, adapters=[adapter])
    return time.perf_counter() - started, [p.answers[report.rows[0].name] for p in report.problems]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/adapter_eval.json"))
    args = parser.parse_args()

    settings = Settings()
    model_path = ensure_model(None, settings)
    problems = make_arithmetic_problems(args.problems, seed=1)
    config = EvalConfig(max_tokens=args.max_tokens, worked_example=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = str(args.adapter) if args.adapter else stand_in_adapter(model_path, Path(tmp) / "adapter")
        options = EngineOptions(model=model_path, kv_cache_gib=settings.kv_cache_gib)
        with TeacherEngine(options) as engine:
            base_seconds, base = timed_evaluation(problems, engine, config, None)
            print(f"base: {base_seconds:.1f} s", flush=True)
            lora_seconds, with_lora = timed_evaluation(problems, engine, config, adapter)
            print(f"LoRA in the engine: {lora_seconds:.1f} s", flush=True)

        started = time.perf_counter()
        merged_dir = merge_adapter(adapter, model_path, Path(tmp) / "merged")
        merge_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with TeacherEngine(EngineOptions(model=str(merged_dir), kv_cache_gib=settings.kv_cache_gib, enable_lora=False)) as merged_engine:
            start_seconds = time.perf_counter() - started
            merged_seconds, merged = timed_evaluation(problems, merged_engine, config, None)
    print(f"merged: merge {merge_seconds:.1f} s, engine start {start_seconds:.1f} s, evaluation {merged_seconds:.1f} s")

    merged_total = merge_seconds + start_seconds + merged_seconds
    result = {
        "problems": len(problems),
        "max_tokens": args.max_tokens,
        "seconds": {
            "base": base_seconds,
            "lora": lora_seconds,
            "merge": merge_seconds,
            "merged_engine_start": start_seconds,
            "merged_evaluation": merged_seconds,
            "merged_total": merged_total,
        },
        "lora_over_merged_total": lora_seconds / merged_total,
        "lora_over_base": lora_seconds / base_seconds,
        "merged_evaluation_over_base": merged_seconds / base_seconds,
        "greedy_answers_identical": sum(a.response == b.response for a, b in zip(with_lora, merged)),
        "greedy_verdicts_identical": sum(a.correct == b.correct for a, b in zip(with_lora, merged)),
        "adapter_tokens": {
            "lora": sum(a.num_tokens for a in with_lora),
            "merged": sum(a.num_tokens for a in merged),
            "base": sum(a.num_tokens for a in base),
        },
    }
    print(json.dumps(result, indent=2))
    print(
        f"adapter evaluation of {len(problems)} problems: LoRA {lora_seconds:.0f} s ({result['lora_over_base']:.1f}x the "
        f"base model's {base_seconds:.0f} s); merged {merged_total:.0f} s in all "
        f"(the LoRA takes {result['lora_over_merged_total']:.1f}x as long); "
        f"{result['greedy_answers_identical']}/{len(problems)} greedy answers identical"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
