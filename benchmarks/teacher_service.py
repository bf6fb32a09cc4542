"""Benchmark: generated tokens/s through the teacher service over HTTP against the same requests sent straight to the
engine in-process, with W = 1, 4 and 16 concurrent clients.

Both sides run vLLM's async engine built the same way (`TeacherService.start`), one after the other in one run, on the
same requests: `--requests` rollout requests of one arithmetic question each (n=1, temperature 0.8, a fixed seed per
request, `--max-tokens` tokens at most), shared out among W clients that each send theirs one after another. In-process,
a client is a coroutine awaiting the engine directly; through the service, it is an `httpx.AsyncClient` posting
`/v1/rollouts` to `ssb serve teacher` on loopback (JSON, parsing and all). The ratio is service over in-process.

    .venv/bin/python -m benchmarks.teacher_service [--requests 32] [--max-tokens 64] [--clients 1 4 16]
                                                   [--service-first]

It also measures the top-k encodings: bytes and encode+decode time of a 1,000-token explanation's top-20 as JSON
lists and as base64 (no engine needed). Writes runs/bench/teacher_service.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.runtime import ensure_model
from services.teacher.service import TeacherService
from services.teacher.settings import TeacherSettings
from shared.arithmetic import make_arithmetic_problems
from shared.prompts import build_student_messages
from shared.schemas import SamplingSettings
from shared.storage import replace_atomically
from shared.teacher_client import TeacherClient


def workload(requests: int, max_tokens: int) -> list[tuple[str, SamplingSettings]]:
    problems = make_arithmetic_problems(requests, seed=3)
    return [
        (p.question, SamplingSettings(n=1, temperature=0.8, top_k=50, max_tokens=max_tokens, seed=1000 + i))
        for i, p in enumerate(problems)
    ]


async def run_clients(clients: int, work: list, ask) -> dict:
    """W clients, each sending its share of the requests one after another; tokens generated and wall time."""
    shares = [work[i::clients] for i in range(clients)]

    async def client(share) -> int:
        tokens = 0
        for question, sampling in share:
            tokens += await ask(question, sampling)
        return tokens

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(client(share) for share in shares)))
    seconds = time.perf_counter() - started
    return {"clients": clients, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


async def in_process(settings: TeacherSettings, work: list, client_counts: list[int]) -> list[dict]:
    service = await asyncio.to_thread(TeacherService.start, settings)
    try:

        async def ask(question: str, sampling: SamplingSettings) -> int:
            prompt = service.render(build_student_messages(question))
            (generation,) = await service.generate_one(prompt, sampling, None)
            return len(generation.token_ids)

        await run_clients(4, work[:4], ask)  # warm-up
        return [await run_clients(w, work, ask) for w in client_counts]
    finally:
        service.close()


async def through_service(url: str, work: list, client_counts: list[int]) -> list[dict]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def ask(question: str, sampling: SamplingSettings) -> int:
            body = {"questions": [{"question": question}], "sampling": sampling.model_dump(exclude_none=True)}
            response = await http.post("/v1/rollouts", json=body)
            response.raise_for_status()
            return len(response.json()["results"][0]["samples"][0]["token_ids"])

        await run_clients(4, work[:4], ask)
        return [await run_clients(w, work, ask) for w in client_counts]


def measure_topk_encodings(tokens: int = 1000, k: int = 20, repeats: int = 20) -> dict:
    """Bytes on the wire and encode+decode seconds (to and from the response model's JSON) of one explanation's top-k,
    as JSON lists and as base64 of little-endian int32/float32."""
    import numpy as np

    from shared.teacher_api import TopKBase64, TopKJson, decode_topk, encode_topk

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49_152, size=(tokens, k)).tolist()
    logprobs = np.sort(-rng.exponential(3.0, size=(tokens, k)).astype(np.float32), axis=1)[:, ::-1].tolist()
    results = {}
    for encoding, model in (("json", TopKJson), ("base64", TopKBase64)):
        started = time.perf_counter()
        for _ in range(repeats):
            text = encode_topk(ids, logprobs, encoding).model_dump_json()
            decoded = decode_topk(model.model_validate_json(text))
        assert decoded == (ids, logprobs)
        results[encoding] = {"bytes": len(text), "seconds": (time.perf_counter() - started) / repeats}
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log_path = Path("runs/bench/teacher_service.log")
    command = [sys.executable, "-m", "cli.main", "serve", "teacher", "--model", model, "--port", str(port)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command + ["--log-level", "warning"], stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    with TeacherClient(url) as client:
        client.wait_ready(timeout_seconds=300)
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--service-first", action="store_true", help="Measure the service first (order effects).")
    args = parser.parse_args()

    Path("runs/bench").mkdir(parents=True, exist_ok=True)
    settings = TeacherSettings()
    model = ensure_model(settings.model, settings)
    work = workload(args.requests, args.max_tokens)

    encodings = measure_topk_encodings()
    for name, figures in encodings.items():
        print(f"top-k of 1,000 tokens at k=20 as {name}: {figures['bytes']:,} bytes, {1e3 * figures['seconds']:.1f} ms")
    if not args.service_first:
        direct = asyncio.run(in_process(settings, work, args.clients))
    process, url = start_service(model)
    try:
        served = asyncio.run(through_service(url, work, args.clients))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    if args.service_first:
        direct = asyncio.run(in_process(settings, work, args.clients))

    rows = []
    cores = len(os.sched_getaffinity(0))
    print(f"{args.requests} requests x 1 question, n=1, max_tokens {args.max_tokens}; {cores} cores")
    print(f"{'W':>3} {'in-process tok/s':>17} {'service tok/s':>14} {'ratio':>6}")
    for d, s in zip(direct, served, strict=True):
        ratio = s["tokens_per_second"] / d["tokens_per_second"]
        rows.append({"clients": d["clients"], "in_process": d, "service": s, "ratio": ratio})
        print(f"{d['clients']:>3} {d['tokens_per_second']:>17.1f} {s['tokens_per_second']:>14.1f} {ratio:>6.2f}")
    out = Path("runs/bench/teacher_service" + ("-service-first" if args.service_first else "") + ".json")
    replace_atomically(out, json.dumps(
        {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "service_first": args.service_first,
            "rows": rows,
            "topk_encodings": encodings,
        },
        indent=2,
    ))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
