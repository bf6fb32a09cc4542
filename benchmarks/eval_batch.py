"""Benchmark: how many problems an evaluation sends to the engine together (`EvalConfig.batch_size`).

An engine call lasts until its longest answer ends, so each call ends with a few steps that decode a handful of
sequences; fewer calls, fewer such tails. Every batch size answers the demo's earlier 400 held-out arithmetic problems
(seed 1) greedily with at most 192 tokens, the worked example on, as `make demo` evaluates, on one engine in one
process: the baseline (`--baseline`, the previous default) first and again last, the prefix cache emptied before each,
and whether the answers are the baseline's.

    .venv/bin/python -m benchmarks.eval_batch [--sizes 400] [--dtype float32]    # runs/bench/eval_batch.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cli.runtime import ensure_model
from services.evaluation.evaluation import EvalConfig, answer_problems
from services.teacher.engine import EngineOptions, TeacherEngine
from shared.arithmetic import make_arithmetic_problems
from shared.settings import Settings
from shared.storage import replace_atomically


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--problems", type=int, default=400, help="Held-out problems (seed 1): the demo's earlier 400 (now 200)."
    )
    parser.add_argument("--baseline", type=int, default=256, help="The batch size every other one is compared with.")
    parser.add_argument("--sizes", default="400", help="Batch sizes measured against the baseline.")
    parser.add_argument("--dtype", default="auto", help="The engine's dtype (float32: a stand-in for CPUs without BF16).")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/eval_batch.json"))
    args = parser.parse_args()

    settings = Settings()
    held_out = make_arithmetic_problems(args.problems, seed=1)
    sizes = [args.baseline, *(int(size) for size in args.sizes.split(",")), args.baseline]
    options = EngineOptions(
        model=ensure_model(None, settings), dtype=args.dtype, kv_cache_gib=settings.kv_cache_gib, enable_lora=False
    )
    runs = []
    with TeacherEngine(options) as engine:
        for size in sizes:
            engine.llm.reset_prefix_cache()
            config = EvalConfig(max_tokens=192, worked_example=True, batch_size=size)
            started = time.perf_counter()
            answers = answer_problems(held_out, engine, config, None)
            seconds = time.perf_counter() - started
            runs.append({"batch_size": size, "seconds": seconds, "responses": [a.response for a in answers]})
            print(f"batch size {size}: {seconds:.1f} s", flush=True)
    baseline = (runs[0]["seconds"] + runs[-1]["seconds"]) / 2
    rows = [
        {
            "batch_size": run["batch_size"],
            "seconds": run["seconds"],
            "speedup": baseline / run["seconds"],
            "same_responses": sum(a == b for a, b in zip(run["responses"], runs[0]["responses"], strict=True)),
        }
        for run in runs
    ]
    for row in rows:
        print(
            f"batch {row['batch_size']:>4}: {row['seconds']:6.1f} s, {row['speedup']:.2f}x the baseline's mean, "
            f"the same greedy response for {row['same_responses']} of {args.problems}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"problems": args.problems, "dtype": args.dtype, "rows": rows}
    replace_atomically(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
