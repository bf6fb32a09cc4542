"""What vLLM's one torch.compile'd sampler helper costs an engine on a CPU: compiled (vLLM's way) against eager.

vLLM's sampler compiles `batched_count_greater_than` (each sampled token's rank among the log-probabilities) with
torch.compile even when the engine runs eagerly: the first request that asks for log-probabilities in a process traces
it and, the first time on a machine, builds C++ kernels (`/tmp/torchinductor_<user>`). Running it eagerly
(`TORCHDYNAMO_DISABLE=1`) saves that, at a cost in every engine step that asks for log-probabilities, which grows with
the batch. Two measures, the variants alternated within each repeat:

- the helper alone, in this process, on rows of the small model's vocabulary (49,152) as many as a batch's sequences
  (64 and 256): milliseconds per call, compiled and eager (`helper` rows);
- an engine per variant, each in a fresh process, built as the commands build it (no LoRA support, the machine's
  dtype), sending curation's shape of request twice: arithmetic prompts with the worked example, n seeded samples each
  at temperature 0.8, up to a number of tokens, with the top-20 log-probabilities of each (the same tokens in every
  variant). `first_s` is the first request (the compile, if any, is in it), `second_s` the second, whose tokens/s is
  the steady speed.

    python -m benchmarks.compiled_helper                 # results in runs/bench/compiled_helper.json
    python -m benchmarks.compiled_helper --repeats 2 --variants eager,compiled --prompts 16

Engine variants: `compiled` (vLLM's way, what the project runs; the kernels already built on this machine),
`compiled-cold` (the same with an empty inductor cache: a fresh machine's first engine), `eager`
(`TORCHDYNAMO_DISABLE=1`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.storage import replace_atomically

RESULTS = Path("runs/bench/compiled_helper.json")
VARIANTS = ("compiled", "compiled-cold", "eager")
VOCABULARY = 49152  # the small model's
HELPER_ROWS = (64, 256)


def measure(prompts: int, n: int, tokens: int) -> dict:
    """Run in the child process: build the engine, send the same request with log-probabilities twice."""
    from services.teacher.engine import EngineOptions, TeacherEngine
    from shared.arithmetic import make_arithmetic_problems
    from shared.models import resolve_model
    from shared.prompts import build_student_messages
    from shared.schemas import SamplingSettings
    from shared.settings import Settings

    settings = Settings()
    options = EngineOptions(model=resolve_model(None, settings), dtype=settings.dtype, enable_lora=False)
    started = time.perf_counter()
    with TeacherEngine(options) as engine:
        start_seconds = time.perf_counter() - started
        rendered = [
            engine.render(build_student_messages(p.question, worked_example=True))
            for p in make_arithmetic_problems(prompts, seed=0)
        ]
        sampling = SamplingSettings(n=n, temperature=0.8, top_k=50, max_tokens=tokens, seed=0, logprobs=20)
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            results = engine.generate(rendered, sampling)
            seconds.append(time.perf_counter() - started)
    generated = sum(len(g.token_ids) for gens in results for g in gens)
    return {
        "start_s": start_seconds, "first_s": seconds[0], "second_s": seconds[1], "tokens": generated,
        "tokens_per_s": generated / seconds[1], "dynamo_disabled": os.environ.get("TORCHDYNAMO_DISABLE"),
    }


def helper_milliseconds(rows: int, compiled: bool, calls: int = 50) -> float:
    """Milliseconds per call of the helper on `rows` rows of the vocabulary, compiled or eager."""
    import torch
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than

    logprobs = torch.randn(rows, VOCABULARY)
    sampled = logprobs[:, :1].clone()
    torch.compiler.set_stance("default" if compiled else "force_eager")
    try:
        for _ in range(3):  # the compile, and warm caches
            batched_count_greater_than(logprobs, sampled)
        started = time.perf_counter()
        for _ in range(calls):
            batched_count_greater_than(logprobs, sampled)
        return (time.perf_counter() - started) / calls * 1000
    finally:
        torch.compiler.set_stance("default")


def run_variant(name: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHDYNAMO_DISABLE", "TORCHINDUCTOR_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="inductor-") as empty_cache:
        env["TORCHDYNAMO_DISABLE"] = "1" if name == "eager" else "0"
        if name == "compiled-cold":
            env["TORCHINDUCTOR_CACHE_DIR"] = empty_cache
        command = [sys.executable, "-m", "benchmarks.compiled_helper", "--child"]
        command += [str(args.prompts), str(args.n), str(args.tokens)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"variant": name, "error": done.stderr.strip().splitlines()[-1:]}
    return {"variant": name, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        prompts, n, tokens = (int(value) for value in sys.argv[2:5])
        print(json.dumps(measure(prompts, n, tokens)), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    names = args.variants.split(",")
    if unknown := [name for name in names if name not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    rows = []
    for repeat in range(args.repeats):
        for count in HELPER_ROWS:
            for compiled in (True, False):
                milliseconds = helper_milliseconds(count, compiled)
                helper = "compiled" if compiled else "eager"
                row = {"repeat": repeat, "helper": helper, "rows": count, "ms": milliseconds}
                print(json.dumps(row), flush=True)
                rows.append(row)
        for name in names:
            row = {"repeat": repeat, **run_variant(name, args)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(RESULTS, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
