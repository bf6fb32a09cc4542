"""How the CPU build of vLLM should use a small machine's cores: generated tokens/s under each thread binding.

vLLM's CPU build binds its model threads to all cores but the ones it reserves for the engine-core (scheduler)
process, which busy-polls; on 2 cores that leaves the model one thread. Each variant below runs in a fresh process
(the binding is read when the engine starts) and generates the same rollouts: the demo's arithmetic prompts with the
worked example, n samples each, a fixed number of tokens (end of turn ignored, so every variant generates exactly as
many tokens). Figures are ratios against vLLM's default binding, measured in the same run.

    python -m benchmarks.engine_threads                      # every variant, results in runs/bench/engine_threads.json
    python -m benchmarks.engine_threads --variants default,ssb --repeats 2

Variants: `default` (vLLM's binding: one core reserved for the engine core), `all-cores` (the model's threads on every
core, none reserved), `in-process` (the engine core in the calling process, VLLM_ENABLE_V1_MULTIPROCESSING=0), both of
those together, `nobind` (no thread binding at all), and `ssb` (what the engine chooses on this machine: on a CPU, its
core in the calling process). Each of those engines is built for LoRA adapters, as the teacher service's is;
`ssb-no-lora` is `ssb` without LoRA support, as `ssb curate`, `ssb run` and `ssb eval` start it (on a CPU, LoRA support
slows plain requests too), and `ssb-processes-no-lora` the same with the engine core and the model in processes of
their own (vLLM's default). Each row also gives the seconds from building the engine to its being ready (`start_s`).
The variants named after vLLM's own settings (`default`, `all-cores`, `in-process*`, `nobind`) run the model where
vLLM's CPU build puts it, in a process of its own beside the engine core's; the project's run it in the core's
process (`services.teacher.engine.executor_kwargs`), and `ssb-processes-worker-no-lora` is `ssb-processes-no-lora`
with the model in that third process, as the project ran it before. Every LoRA engine above is built for ranks up to
32 (the teacher's default, `SSB_MAX_LORA_RANK`); `ssb-rank16` and `ssb-rank8` are `ssb` built for 16 and 8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shared.storage import replace_atomically

RESULTS = Path("runs/bench/engine_threads.json")


NO_LORA = {"ssb-no-lora", "ssb-processes-no-lora", "ssb-processes-worker-no-lora"}  # built without LoRA support
VLLM_EXECUTOR = "BENCH_VLLM_EXECUTOR"  # set: the model where vLLM's CPU build puts it (a process of its own)
LORA_RANK = "BENCH_MAX_LORA_RANK"  # the largest LoRA rank the engine is built for (the teacher's default: 32)


def variants(cores: int) -> dict[str, dict[str, str]]:
    """Environment of each variant; `ssb` is what `services.teacher.engine.cpu_thread_environment` chooses here."""
    from services.teacher.engine import cpu_thread_environment

    every_core = f"0-{cores - 1}"
    processes = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the engine core in a process of its own
    vllm = {VLLM_EXECUTOR: "1"}
    return {
        "default": {**processes, **vllm},
        "all-cores": {
            **processes, **vllm, "VLLM_CPU_OMP_THREADS_BIND": every_core, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"
        },
        "in-process": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **vllm},
        "in-process-all-cores": {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            **vllm,
            "VLLM_CPU_OMP_THREADS_BIND": every_core,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        },
        "nobind": {**processes, **vllm, "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
        "ssb": cpu_thread_environment(cores),
        "ssb-no-lora": cpu_thread_environment(cores),
        "ssb-processes-no-lora": {**processes, **cpu_thread_environment(cores)},
        "ssb-processes-worker-no-lora": {**processes, **vllm, **cpu_thread_environment(cores)},
        "ssb-rank16": {**cpu_thread_environment(cores), LORA_RANK: "16"},
        "ssb-rank8": {**cpu_thread_environment(cores), LORA_RANK: "8"},
    }


def measure(prompts: int, n: int, tokens: int, lora: int) -> dict:
    """Run in the child process: start the engine as the project does, generate, report tokens/s."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from services.teacher.engine import EngineOptions, TeacherEngine
    from shared.arithmetic import make_arithmetic_problems
    from shared.models import resolve_model
    from shared.prompts import build_student_messages
    from shared.settings import Settings

    if os.environ.get(VLLM_EXECUTOR):
        import services.teacher.engine

        services.teacher.engine.executor_kwargs = lambda **_: {}
    problems = make_arithmetic_problems(prompts, seed=0)
    started = time.perf_counter()
    rank = int(os.environ.get(LORA_RANK, 32))
    options = EngineOptions(
        model=resolve_model(None, Settings()), cpu_threads="vllm", enable_lora=bool(lora), max_lora_rank=rank
    )
    with TeacherEngine(options) as engine:
        start_seconds = time.perf_counter() - started
        prompts_ = [
            TokensPrompt(prompt_token_ids=engine.render(build_student_messages(p.question, worked_example=True)).token_ids)
            for p in problems
        ]
        sampling = SamplingParams(n=n, temperature=0.8, top_k=50, max_tokens=tokens, seed=0, ignore_eos=True)
        engine.llm.generate(prompts_[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
        started = time.perf_counter()
        outputs = engine.llm.generate(prompts_, sampling, use_tqdm=False)
        seconds = time.perf_counter() - started
    generated = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    return {"tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds, "start_s": start_seconds}


def run_variant(name: str, env: dict[str, str], args) -> dict:
    ours = ("VLLM_CPU_OMP", "VLLM_CPU_NUM_OF", "VLLM_ENABLE_V1", VLLM_EXECUTOR, LORA_RANK)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    child_env.update(env)
    lora = "0" if name in NO_LORA else "1"
    command = [sys.executable, "-m", "benchmarks.engine_threads", "--child"]
    command += [str(args.prompts), str(args.n), str(args.tokens), lora]
    done = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"variant": name, "env": env, "error": done.stderr.strip().splitlines()[-1:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"variant": name, "env": env, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="Rounds over the variants (interleaved).")
    parser.add_argument("--variants", default="", help="Comma-separated names (default: all).")
    parser.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return

    cores = len(os.sched_getaffinity(0))
    table = variants(cores)
    chosen = [v for v in args.variants.split(",") if v] or list(table)
    rows = []
    for round_ in range(args.repeats):
        for name in chosen:
            row = run_variant(name, table[name], args) | {"round": round_}
            rows.append(row)
            print(json.dumps(row), flush=True)
    baseline = [r["tokens_per_s"] for r in rows if r["variant"] == "default" and "tokens_per_s" in r]
    if baseline:
        base = sum(baseline) / len(baseline)
        print(f"\n{cores} cores; {args.prompts} prompts x n={args.n} x {args.tokens} tokens; tokens/s (x default):")
        for name in chosen:
            speeds = [r["tokens_per_s"] for r in rows if r["variant"] == name and "tokens_per_s" in r]
            if speeds:
                mean = sum(speeds) / len(speeds)
                starts = [r["start_s"] for r in rows if r["variant"] == name and "start_s" in r]
                start = sum(starts) / len(starts)
                print(f"  {name:32s} {mean:8.1f}  ({mean / base:.2f}x)   engine start {start:5.1f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(RESULTS, json.dumps({"cores": cores, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
