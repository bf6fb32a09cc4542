"""Benchmark: how many problems `curate()` sends to the engine together (`CurationConfig.batch_size`).

Each engine call carries one batch's rollouts and the previous batch's explanations, and lasts until its longest
answer ends: the last few steps of every call decode a handful of sequences on an engine that could take hundreds. A
larger batch makes fewer calls, so fewer such tails; a smaller one reports progress and keeps finished work sooner.
Every batch size curates the same problems (the demo's: arithmetic, seed 0, its token limits, the worked example) on
one engine in one process, one after the other, the baseline (`--baseline`, the previous default) first and again
last, so a machine that drifts shows it; the prefix cache is emptied before each, so no run reuses another's. Outcomes should agree (every request has its own seed; the engine's
batch-dependent rounding may flip a near tie).

    .venv/bin/python -m benchmarks.curation_batch [--sizes 32,64,96,160] [--dtype float32]   # runs/bench/curation_batch.json
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
from shared.settings import CurationConfig, Settings
from shared.storage import PairStore, replace_atomically


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--problems", type=int, default=160, help="Arithmetic problems (seed 0): the demo's earlier 160 (now 100)."
    )
    parser.add_argument("--baseline", type=int, default=32, help="The batch size every other one is compared with.")
    parser.add_argument("--sizes", default="64,96,128,160", help="Batch sizes measured against the baseline.")
    parser.add_argument("--dtype", default="auto", help="The engine's dtype (float32: a stand-in for CPUs without BF16).")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/curation_batch.json"))
    args = parser.parse_args()

    settings = Settings()
    problems = make_arithmetic_problems(args.problems, seed=0)
    sizes = [args.baseline, *(int(size) for size in args.sizes.split(",")), args.baseline]
    engine = TeacherEngine(
        EngineOptions(
            model=ensure_model(None, settings), dtype=args.dtype, kv_cache_gib=settings.kv_cache_gib, enable_lora=False
        )
    )
    runs = []
    with engine, tempfile.TemporaryDirectory() as tmp:
        for index, size in enumerate(sizes):
            config = CurationConfig(
                k=4, seed=0, worked_example=True, rollout_max_tokens=192, explanation_max_tokens=256, topk=20,
                batch_size=size,
            )
            store = PairStore(Path(tmp) / f"{index}-{size}")
            engine.llm.reset_prefix_cache()
            print(f"batch size {size}: curating {len(problems)} problems...", flush=True)
            started = time.perf_counter()
            funnel = curate(problems, engine, store, config)
            seconds = time.perf_counter() - started
            runs.append({
                "batch_size": size, "seconds": seconds, "pairs": funnel.pairs, "with_mix": funnel.with_mix,
                "generated_tokens": funnel.generated_tokens, "tokens_per_s": funnel.generated_tokens / seconds,
                "outcomes": {p.id: store.outcome(p.id) for p in problems},
            })
            print(f"  {seconds:.1f} s, {funnel.pairs} pairs, {funnel.generated_tokens:,} tokens", flush=True)
    baseline = (runs[0]["seconds"] + runs[-1]["seconds"]) / 2
    for run in runs:
        run["speedup"] = baseline / run["seconds"]
        run["same_outcomes"] = sum(run["outcomes"][p.id] == runs[0]["outcomes"][p.id] for p in problems)
    result = {
        "problems": len(problems), "dtype": args.dtype, "baseline_seconds": baseline,
        "runs": [{k: v for k, v in run.items() if k != "outcomes"} for run in runs],
    }
    print(json.dumps(result, indent=2))
    for run in runs:
        print(
            f"batch {run['batch_size']:>4}: {run['seconds']:6.1f} s, {run['speedup']:.2f}x the baseline's mean, "
            f"{run['pairs']} pairs, the same outcome for {run['same_outcomes']} of {len(problems)}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
