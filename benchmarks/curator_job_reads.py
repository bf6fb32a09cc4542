"""Benchmark: what one curation job reads before it curates, on a large dataset.

A job curates a batch of a dataset's problems (8 by default). It used to read the dataset's whole problems file and
every problem's final state; it now reads its own lines of the file (their byte span travels with the job) and its
own problems' states. On a dataset of `--problems` arithmetic problems (the curator takes up to 100,000), each of
`--jobs` batches spread over the file is read both ways in the same run, on the same file and the same Redis:

- problems: `dataset_problems` with the job's span, against the whole file read and checked (`span=None`, what a job
  queued by an earlier version still does);
- final states: the job's own (`HMGET`), against the whole hash (`HGETALL`), with half the problems final;
- a dataset's status (`GET /v1/datasets/{id}`, and each dataset's line of `/metrics`): from the counts kept as
  problems end, against counting every problem's state (what a dataset of an earlier version still does);
- the same status once a quarter of the problems failed, listing 100 failures from a bounded read of the failures
  hash, against the read and sort of every failure that it used to add.

The last two need a Redis (`--redis`, default the machine's, database 15, under a key prefix of its own, deleted
after); left out without one.

    .venv/bin/python -m benchmarks.curator_job_reads [--problems 100000] [--jobs 20]   # -> runs/bench/*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from shared.storage import replace_atomically

RESULTS = Path("runs/bench/curator_job_reads.json")


def timed(function, repeats: int = 1) -> float:
    """The median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=20, help="Batches timed, spread evenly over the file.")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()

    from services.curator.jobs import PROBLEMS_FILE, batch_spans, dataset_problems
    from services.curator.ledger import DatasetLedger, DatasetMeta
    from services.curator.settings import CuratorSettings
    from shared.arithmetic import make_arithmetic_problems
    from shared.curator_api import DatasetOptions
    from shared.datasets import write_problems_jsonl

    problems = make_arithmetic_problems(args.problems, seed=0)
    ids = [p.id for p in problems]
    batches = [ids[start : start + args.batch_size] for start in range(0, len(ids), args.batch_size)]
    timed_batches = sorted({round(i * (len(batches) - 1) / max(args.jobs - 1, 1)) for i in range(args.jobs)})
    result: dict = {"problems": args.problems, "batch_size": args.batch_size, "jobs_timed": len(timed_batches)}

    with tempfile.TemporaryDirectory(prefix="ssb-bench-job-reads-") as directory:
        settings = CuratorSettings(data_dir=Path(directory))
        dataset_dir = settings.dataset_dir("ds-bench")
        dataset_dir.mkdir(parents=True)
        path = write_problems_jsonl(problems, dataset_dir / PROBLEMS_FILE)
        spans = batch_spans(path, [len(batch) for batch in batches])
        whole, own = [], []
        for index in timed_batches:
            batch, span = batches[index], spans[index]
            expected = problems[index * args.batch_size :][: len(batch)]
            assert dataset_problems(settings, "ds-bench", batch, span) == expected
            whole.append(timed(lambda: dataset_problems(settings, "ds-bench", batch)))
            own.append(timed(lambda: dataset_problems(settings, "ds-bench", batch, span), repeats=5))
        result["file_mb"] = path.stat().st_size / 2**20
        reads = {"whole_file_s": statistics.median(whole), "own_span_s": statistics.median(own)}
        result["problems_read"] = {**reads, "speedup": reads["whole_file_s"] / reads["own_span_s"]}

    try:
        import redis

        connection = redis.Redis.from_url(args.redis, socket_timeout=10)
        connection.ping()
    except Exception as exc:  # no Redis: the file half stands alone
        print(f"final states left out: no Redis at {args.redis} ({exc})")
        connection = None
    if connection is not None:
        ledger = DatasetLedger(connection, f"ssb-bench-{uuid.uuid4().hex[:8]}")
        try:
            meta = DatasetMeta(id="ds-bench", problems=len(ids), options=DatasetOptions(), created_at=time.time())
            with connection.pipeline() as pipe:
                ledger.create(meta, [], pipe)
                pipe.execute()
            for problem_id in ids[::2]:  # every other problem final, recorded as a job records it
                ledger.record_final("ds-bench", problem_id, "no_mix")
            ledger.mark_running("ds-bench", ids[1 : 4 * args.batch_size : 2])  # four jobs' problems in flight
            whole, own = [], []
            for index in timed_batches:
                batch = batches[index]
                assert ledger.final_states("ds-bench", batch) == {
                    i: state for i, state in ledger.final_states("ds-bench").items() if i in batch
                }
                whole.append(timed(lambda: ledger.final_states("ds-bench"), repeats=3))
                own.append(timed(lambda: ledger.final_states("ds-bench", batch), repeats=5))
            result["states_read"] = {"whole_hash_s": statistics.median(whole), "own_s": statistics.median(own)}
            counted = timed(lambda: ledger.status("ds-bench"), repeats=5)
            connection.delete(ledger.key("ds-bench", "counts"))  # as a dataset of an earlier version
            one_by_one = timed(lambda: ledger.status("ds-bench"), repeats=5)
            assert ledger.status("ds-bench").funnel.no_mix == len(ids[::2])
            failed = ids[1::4]  # a quarter of the problems failed, with their reasons (written in bulk)
            with connection.pipeline() as pipe:
                pipe.hset(ledger.key("ds-bench", "final"), mapping=dict.fromkeys(failed, "failed"))
                pipe.hset(ledger.key("ds-bench", "failures"), mapping={i: f"TeacherUnavailable: {i}" for i in failed})
                pipe.hset(ledger.key("ds-bench", "counts"), mapping={"no_mix": len(ids[::2]), "failed": len(failed)})
                pipe.execute()
            assert ledger.status("ds-bench").funnel.failed == len(failed)
            with_failures = timed(lambda: ledger.status("ds-bench"), repeats=5)
            every_failure = timed(lambda: sorted(connection.hgetall(ledger.key("ds-bench", "failures")).items()), 5)
        finally:
            ledger.delete("ds-bench")
        result["states_read"]["speedup"] = result["states_read"]["whole_hash_s"] / result["states_read"]["own_s"]
        result["status"] = {"every_state_s": one_by_one, "counts_s": counted, "speedup": one_by_one / counted}
        result["status_with_failures"] = {"failures": len(failed), "status_s": with_failures,
                                          "every_failure_read_and_sorted_s": every_failure}

    reads = result["problems_read"]
    print(f"{args.problems} problems ({result['file_mb']:.1f} MB), batches of {args.batch_size}, "
          f"median of {len(timed_batches)} jobs")
    print(f"problems: whole file {reads['whole_file_s'] * 1000:.1f} ms, own span {reads['own_span_s'] * 1000:.2f} ms "
          f"({reads['speedup']:.0f}x)")
    if "states_read" in result:
        states = result["states_read"]
        print(f"final states: whole hash {states['whole_hash_s'] * 1000:.1f} ms, own {states['own_s'] * 1000:.2f} ms "
              f"({states['speedup']:.0f}x)")
        status = result["status"]
        print(f"status: every state {status['every_state_s'] * 1000:.1f} ms, counts {status['counts_s'] * 1000:.2f} ms "
              f"({status['speedup']:.0f}x)")
        failing = result["status_with_failures"]
        print(f"status with {failing['failures']} failures: {failing['status_s'] * 1000:.2f} ms; every failure "
              f"read and sorted, as it was: {failing['every_failure_read_and_sorted_s'] * 1000:.1f} ms more")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(RESULTS, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
