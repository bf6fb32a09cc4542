"""Benchmark: evaluating an adapter as a LoRA inside the engine against merging it into a copy of the base weights.

The same held-out problems (arithmetic, seed 1, the worked example, greedy, the demo's answer limit) are answered by:
the base model (an engine without LoRA support); the adapter merged into a copy of the weights and loaded in place of
that engine's own (what `ssb eval` and `ssb run` do on a CPU; the merge and the load are counted); the same merged
copy served by an engine started on it (the way before, its start counted); and the adapter served as a LoRA beside
the base weights (an engine built for LoRA, in the machine's own dtype, as `--adapter-serving lora` serves it). Also
reported: how many greedy answers the ways of serving agree on. The base model and the merged copies compute in
`--dtype`, by default the one `ssb eval` picks for them (`cli.eval_command.resolve_adapter_serving`: float32 on a
CPU, so that a merged update is not lost to bfloat16 rounding).

    .venv/bin/python -m benchmarks.adapter_eval [--problems 60] [--max-tokens 256] [--adapter DIR] [--dtype auto]

Without `--adapter`, a rank-32 LoRA on every projection (the paper's shape) with small random weights stands in for a
trained one. Run in one process, so every number comes from the same machine at the same time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from cli.eval_command import resolve_adapter_serving
from cli.runtime import ensure_model
from services.evaluation.evaluation import EvalConfig, evaluate
from services.teacher.engine import EngineOptions, TeacherEngine, resolved_dtype
from services.teacher.merging import merge_adapter
from shared.arithmetic import make_arithmetic_problems
from shared.settings import Settings
from shared.storage import replace_atomically

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
    parser.add_argument("--dtype", default=None, help="The base model's and merged copies' dtype (default: ssb eval's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/adapter_eval.json"))
    args = parser.parse_args()

    settings = Settings()
    dtype = args.dtype or resolve_adapter_serving("auto", settings.dtype).dtype
    model_path = ensure_model(None, settings)
    problems = make_arithmetic_problems(args.problems, seed=1)
    config = EvalConfig(max_tokens=args.max_tokens, worked_example=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = str(args.adapter) if args.adapter else stand_in_adapter(model_path, Path(tmp) / "adapter")
        plain = EngineOptions(model=model_path, kv_cache_gib=settings.kv_cache_gib, enable_lora=False, dtype=dtype)
        with TeacherEngine(plain) as engine:
            base_seconds, base = timed_evaluation(problems, engine, config, None)
            print(f"base: {base_seconds:.1f} s", flush=True)
            started = time.perf_counter()
            merged_dir = merge_adapter(adapter, model_path, Path(tmp) / "merged", resolved_dtype(dtype)).path
            merge_seconds = time.perf_counter() - started
            started = time.perf_counter()
            engine.load_weights(merged_dir)
            load_seconds = time.perf_counter() - started
            in_place_seconds, in_place = timed_evaluation(problems, engine, config, None)
        print(f"merged, loaded in place: merge {merge_seconds:.1f} s, load {load_seconds:.1f} s, "
              f"evaluation {in_place_seconds:.1f} s", flush=True)

        started = time.perf_counter()
        with TeacherEngine(replace(plain, model=str(merged_dir))) as merged_engine:
            start_seconds = time.perf_counter() - started
            merged_seconds, merged = timed_evaluation(problems, merged_engine, config, None)
        print(f"merged, an engine of its own: start {start_seconds:.1f} s, evaluation {merged_seconds:.1f} s")

        with TeacherEngine(replace(plain, enable_lora=True, dtype=settings.dtype)) as lora_engine:
            lora_seconds, with_lora = timed_evaluation(problems, lora_engine, config, adapter)
        print(f"LoRA in the engine: {lora_seconds:.1f} s", flush=True)

    in_place_total = merge_seconds + load_seconds + in_place_seconds
    own_engine_total = merge_seconds + start_seconds + merged_seconds
    result = {
        "problems": len(problems),
        "max_tokens": args.max_tokens,
        "dtype": {"base_and_merged": dtype, "lora": settings.dtype},
        "seconds": {
            "base": base_seconds,
            "merge": merge_seconds,
            "load_in_place": load_seconds,
            "in_place_evaluation": in_place_seconds,
            "in_place_total": in_place_total,
            "merged_engine_start": start_seconds,
            "merged_evaluation": merged_seconds,
            "merged_engine_total": own_engine_total,
            "lora": lora_seconds,
        },
        "in_place_total_over_merged_engine_total": in_place_total / own_engine_total,
        "lora_over_in_place_total": lora_seconds / in_place_total,
        "lora_over_base": lora_seconds / base_seconds,
        "in_place_evaluation_over_base": in_place_seconds / base_seconds,
        "in_place_answers_identical_to_merged_engine": sum(a.response == b.response for a, b in zip(in_place, merged)),
        "greedy_answers_identical_lora_merged": sum(a.response == b.response for a, b in zip(with_lora, in_place)),
        "greedy_verdicts_identical_lora_merged": sum(a.correct == b.correct for a, b in zip(with_lora, in_place)),
        "adapter_tokens": {
            "lora": sum(a.num_tokens for a in with_lora),
            "merged": sum(a.num_tokens for a in in_place),
            "base": sum(a.num_tokens for a in base),
        },
    }
    print(json.dumps(result, indent=2))
    print(
        f"adapter evaluation of {len(problems)} problems: merged and loaded in place {in_place_total:.0f} s in all "
        f"({result['in_place_total_over_merged_engine_total']:.2f}x the {own_engine_total:.0f} s of an engine of its "
        f"own; {result['in_place_answers_identical_to_merged_engine']}/{len(problems)} answers identical to it); "
        f"LoRA {lora_seconds:.0f} s ({result['lora_over_base']:.1f}x the base model's {base_seconds:.0f} s, "
        f"{result['lora_over_in_place_total']:.1f}x merged in place); "
        f"{result['greedy_answers_identical_lora_merged']}/{len(problems)} greedy answers identical to the LoRA's"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
