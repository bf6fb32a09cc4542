"""Benchmark: pipelined curation against curation that waits for each batch's explanations.

`curate()` sends the rollouts of one batch and the hinted explanations of the batch before in one engine call. The
baseline is the same `curate()` on an engine that makes those two calls one after the other (what curation did
before: a batch's rollouts, then its explanations alone, a small batch that leaves the engine mostly idle). Both
curate the same problems (the demo's: arithmetic, seed 0, its token limits, the worked example) on one engine in one
process, after a warm-up on other problems, each with the prefix cache emptied first (the second would otherwise find
the first's prompts there); the baseline runs first and last, and its time is the mean of the two (the machine may
speed up or slow down meanwhile). Both should write the same outcomes (every request has its own seed; the engine's
batch-dependent rounding may flip a near tie).

    .venv/bin/python -m benchmarks.pipelining [--problems 160] [--batch-size 32]    # runs/bench/pipelining.json
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


class OneCallAtATime:
    """The baseline: an engine's rollouts and explanations as two calls, the second after the first."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def rollouts_and_explanations(self, questions, rollout_sampling, items, explanation_sampling, *, worked_example):
        answered = self.engine.rollouts(questions, rollout_sampling, worked_example=worked_example) if questions else []
        if not items:
            return answered, []
        return answered, self.engine.explanations(items, explanation_sampling, worked_example=worked_example)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--problems", type=int, default=160, help="Arithmetic problems (seed 0): the demo's earlier 160 (now 100)."
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/pipelining.json"))
    args = parser.parse_args()

    settings = Settings()
    problems = make_arithmetic_problems(args.problems, seed=0)
    config = CurationConfig(
        k=4, seed=0, worked_example=True, rollout_max_tokens=192, explanation_max_tokens=256, topk=20,
        batch_size=args.batch_size,
    )
    engine = TeacherEngine(
        EngineOptions(model=ensure_model(None, settings), kv_cache_gib=settings.kv_cache_gib, enable_lora=False)
    )
    runs = {}
    with engine, tempfile.TemporaryDirectory() as tmp:
        curate(make_arithmetic_problems(4, seed=1), engine, PairStore(Path(tmp) / "warm-up"), config)
        order = (("one_call_at_a_time", OneCallAtATime(engine)), ("pipelined", engine),
                 ("one_call_at_a_time_again", OneCallAtATime(engine)))
        for name, curating_engine in order:
            engine.llm.reset_prefix_cache()
            store = PairStore(Path(tmp) / name)
            print(f"{name}: curating {len(problems)} problems...", flush=True)
            started = time.perf_counter()
            funnel = curate(problems, curating_engine, store, config)
            seconds = time.perf_counter() - started
            runs[name] = {
                "seconds": seconds, "pairs": funnel.pairs, "with_mix": funnel.with_mix,
                "generated_tokens": funnel.generated_tokens, "outcomes": {p.id: store.outcome(p.id) for p in problems},
            }
            print(f"  {seconds:.1f} s, {funnel.pairs} pairs, {funnel.generated_tokens:,} tokens", flush=True)
    base, piped = runs["one_call_at_a_time"], runs["pipelined"]
    base_seconds = (base["seconds"] + runs["one_call_at_a_time_again"]["seconds"]) / 2
    same = sum(base["outcomes"][p.id] == piped["outcomes"][p.id] for p in problems)
    result = {
        "problems": len(problems), "batch_size": args.batch_size,
        **{name: {k: v for k, v in run.items() if k != "outcomes"} for name, run in runs.items()},
        "baseline_seconds": base_seconds, "speedup": base_seconds / piped["seconds"], "same_outcomes": same,
    }
    print(json.dumps(result, indent=2))
    print(
        f"pipelined {piped['seconds']:.1f} s vs one call at a time {base_seconds:.1f} s (mean of two): "
        f"{result['speedup']:.2f}x; the same outcome for {same} of {len(problems)} problems"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
