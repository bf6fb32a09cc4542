"""Benchmark: the KV cache's block size on a CPU, for prompts that share a prefix.

Every prompt of curation and evaluation opens with the same system turn and worked example; vLLM's prefix cache
shares whole blocks only. Each variant builds a fresh engine (in a process of its own) and answers the demo's earlier
400 held-out arithmetic problems (seed 1) greedily with at most 192 tokens, the worked example on, as `make demo`
evaluates the base model; the figure is the time of that evaluation on the fresh engine, against vLLM's CPU default
block size (128) in the same run, and whether the answers are the same.

    .venv/bin/python -m benchmarks.kv_block_size [--problems 400] [--block-sizes 128,32]   # -> runs/bench/*.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from shared.storage import replace_atomically

RESULTS = Path("runs/bench/kv_block_size.json")


def measure(block_size: int, problems: int) -> dict:
    """In the child process: a fresh engine with this block size, one evaluation pass."""
    from cli.runtime import ensure_model
    from services.evaluation.evaluation import EvalConfig, answer_problems
    from services.teacher.engine import EngineOptions, TeacherEngine
    from shared.arithmetic import make_arithmetic_problems
    from shared.settings import Settings

    options = EngineOptions(model=ensure_model(None, Settings()), enable_lora=False, kv_block_tokens=block_size)
    held_out = make_arithmetic_problems(problems, seed=1)
    with TeacherEngine(options) as engine:
        started = time.perf_counter()
        answers = answer_problems(held_out, engine, EvalConfig(max_tokens=192, worked_example=True), None)
        seconds = time.perf_counter() - started
    return {"block_size": block_size, "seconds": seconds, "responses": [a.response for a in answers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=400)
    parser.add_argument("--block-sizes", default="128,32", help="Comma-separated; the first is the baseline.")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return

    runs = []
    for block_size in (int(b) for b in args.block_sizes.split(",")):
        command = [sys.executable, "-m", "benchmarks.kv_block_size", "--child", str(block_size), str(args.problems)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"block size {block_size} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"block size {block_size}: {runs[-1]['seconds']:.1f} s", flush=True)
    base = runs[0]
    rows = [
        {
            "block_size": run["block_size"],
            "seconds": run["seconds"],
            "speedup": base["seconds"] / run["seconds"],
            "same_responses": sum(a == b for a, b in zip(run["responses"], base["responses"], strict=True)),
        }
        for run in runs
    ]
    for row in rows:
        print(
            f"block {row['block_size']:>4}: {row['seconds']:6.1f} s  {row['speedup']:.2f}x  "
            f"same greedy response for {row['same_responses']} of {args.problems}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(RESULTS, json.dumps({"problems": args.problems, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
