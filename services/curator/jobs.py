"""The curator's RQ jobs: a batch of one dataset's problems, curated through the teacher service into the dataset's
pair store, each problem's final state recorded once in the ledger.

    ssb worker curate            (cli/worker_command.py runs `run_worker`)

Jobs take ids, not objects (`curate_problems(dataset_id, problem_ids, span)`: `span` is where the batch's lines lie in
the dataset's problems file, so a job reads its own problems, not the whole file), travel with RQ's JSON serializer,
and carry a timeout and `Retry` (at once, then with backoff). Delivery is at least once, so every write is safe to
repeat: pair files are write-once (`shared.storage`), final states set-if-absent (`services.curator.ledger`), and a
job that finds a problem already in the store (its previous run died after writing) records what the store holds
instead of curating it again.

A worker that dies mid-job (SIGKILL, a lost machine) stops sending heartbeats; after `3 x SSB_WORKER_HEARTBEAT_SECONDS`
its job counts as abandoned, and the next maintenance pass of any worker (every `SSB_MAINTENANCE_INTERVAL_SECONDS`)
puts it back on the queue: with the defaults (5 s, 10 s) another worker takes it over within about 25 s. A job that
fails through every retry marks its unfinished problems `failed`, with the last error, through `record_job_failure`
(also when its process died on the last attempt: `shared.workers`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from redis import Redis
from rq import Callback, Queue, Retry
from rq.serializers import JSONSerializer

from services.curator.curation import Funnel, curate
from services.curator.ledger import DatasetLedger, DatasetMeta
from services.curator.settings import CuratorSettings
from shared.curator_api import dataset_run_id
from shared.datasets import load_problems, parse_problem_file
from shared.engine import ConcurrentCalls, Engine
from shared.schemas import Problem
from shared.settings import CurationConfig
from shared.storage import PairStore
from shared.teacher_client import TeacherPool, TeacherRejected, retry_after_seconds
from shared.workers import JobProcessWorker, connect_redis, started_elsewhere

log = logging.getLogger("ssb.curator")

PROBLEMS_FILE = "problems.jsonl"
META_FILE = "dataset.json"
# The first retry goes straight back on the queue: a job scheduled for later waits for RQ's scheduler, and when the
# worker that died held the scheduler's lock, no other worker can take it for a minute (its TTL is hard-wired in RQ).
# The teacher's client already retries an unreachable or busy teacher with its own backoff.
RETRY_BACKOFF_SECONDS = (0, 30, 120)


def redis_connection(settings: CuratorSettings) -> Redis:
    return connect_redis(settings.redis_url)


def curation_queue(settings: CuratorSettings, connection: Redis) -> Queue:
    return Queue(
        f"{settings.key_prefix}:curate",
        connection=connection,
        serializer=JSONSerializer,
        default_timeout=settings.job_timeout_seconds,
    )


def job_retry(settings: CuratorSettings) -> Retry:
    return Retry(max=settings.job_retries, interval=list(RETRY_BACKOFF_SECONDS[: settings.job_retries]))


def batch_spans(problems_file: Path, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """The byte range of each batch's lines in a problems file of one problem a line, batches in file order."""
    ends = list(itertools.accumulate(len(line) for line in problems_file.read_bytes().splitlines(keepends=True)))
    spans, first = [], 0
    for size in sizes:
        start = ends[first - 1] if first else 0
        spans.append((start, ends[first + size - 1]))
        first += size
    return spans


def enqueue_data(
    settings: CuratorSettings, dataset_id: str, batches: Sequence[list[str]], spans: Sequence[tuple[int, int]]
) -> list:
    """One RQ job per batch of problem ids (and its lines' span), with the deployment's timeout, retries and failure
    callback."""
    return [
        Queue.prepare_data(
            curate_problems,
            args=(dataset_id, batch, list(span)),
            job_id=f"{settings.key_prefix}-{dataset_id}-{index}",
            timeout=settings.job_timeout_seconds,
            retry=job_retry(settings),
            on_failure=Callback(record_job_failure),
            description=f"curate {len(batch)} problems of dataset {dataset_id}",
            meta={"attempts": settings.job_retries + 1},  # RQ keeps only the retries left; a failure names them all
            result_ttl=24 * 3600,
            failure_ttl=7 * 24 * 3600,
        )
        for index, (batch, span) in enumerate(zip(batches, spans, strict=True))
    ]


def curate_problems(dataset_id: str, problem_ids: list[str], span: list[int] | None = None) -> dict:
    """The job: curate these problems of the dataset (their lines at `span` of its problems file; None: a job queued
    by an earlier version, which reads the whole file); return what became of them."""
    settings = CuratorSettings()
    ledger = DatasetLedger(redis_connection(settings), settings.key_prefix)
    meta = ledger.meta(dataset_id)
    if meta is None:
        return {"dataset": dataset_id, "skipped": "the dataset no longer exists"}
    store = PairStore(settings.dataset_dir(dataset_id))
    finished = ledger.final_states(dataset_id, problem_ids)
    todo = [p for p in problem_ids if p not in finished]
    if ledger.is_cancelled(dataset_id):
        end_problems(settings, ledger, meta, todo, "cancelled")
        return {"dataset": dataset_id, "cancelled": len(todo)}
    # A previous run of this job may have written some problems and died before recording them.
    stored = {problem_id: store.outcome(problem_id) for problem_id in todo}
    for problem_id, outcome in stored.items():
        if outcome is not None:
            finish_problem(settings, ledger, meta, problem_id, outcome)
    todo = [problem_id for problem_id, outcome in stored.items() if outcome is None]
    if not todo:
        start_training_if_owed(settings, ledger, meta)
        return {"dataset": dataset_id, "curated": 0}
    problems = dataset_problems(settings, dataset_id, todo, span)
    ledger.mark_running(dataset_id, todo)
    with TeacherPool(settings.teacher_urls, api_key=settings.teacher_key()) as teacher:
        engine = teacher if meta.options.rollout_adapter is None else AdapterRollouts(teacher, meta.options.rollout_adapter)
        config = meta.options.curation_config(teacher.model_name)
        # Every explanation would be refused: no problem's fault (not one at a time), nor one a retry mends.
        if config.topk > teacher.max_logprobs:
            reason = (f"top-k {config.topk} is above the teacher's max_logprobs {teacher.max_logprobs} "
                      "(SSB_MAX_LOGPROBS): no explanation of this dataset can be scored there")
            end_problems(settings, ledger, meta, todo, "failed", reason)
            return {"dataset": dataset_id, "curated": 0, "failed": len(todo)}
        funnel, failures = curate_with_rejections(problems, engine, store, config)
    ledger.add_generation(dataset_id, funnel.generated_tokens)
    for problem in problems:
        if problem.id in failures:
            finish_problem(settings, ledger, meta, problem.id, "failed", failures[problem.id])
        else:
            outcome = store.outcome(problem.id)
            if outcome is None:  # curate() writes one file per problem; a missing one is a bug, not a state
                raise RuntimeError(f"problem {problem.id} of dataset {dataset_id} has no outcome in the store")
            finish_problem(settings, ledger, meta, problem.id, outcome)
    return {"dataset": dataset_id, "curated": len(problems), "pairs": funnel.pairs, "failed": len(failures)}


def curate_with_rejections(
    problems: list[Problem], engine: Engine, store: PairStore, config: CurationConfig
) -> tuple[Funnel, dict[str, str]]:
    """`curate()`, except that a request the teacher refuses for what it holds (`refused_for_its_content`: e.g. a
    question longer than its context) fails only the problem it came from: the batch is retried one problem at a time.
    Other errors (the teacher unreachable, or refusing the deployment rather than the problem) propagate, so RQ
    retries the whole job."""
    try:
        return curate(problems, engine, store, config), {}
    except TeacherRejected as exc:
        if not refused_for_its_content(exc):
            raise
        if len(problems) == 1:  # the refusal is this problem's: another attempt would be refused alike
            return Funnel(problems=1), {problems[0].id: f"the teacher refused the request: {exc.message}"}
    total, failures = Funnel(problems=len(problems)), {}
    for problem in problems:
        try:
            one = curate([problem], engine, store, config)
        except TeacherRejected as exc:
            if not refused_for_its_content(exc):
                raise
            failures[problem.id] = f"the teacher refused the request: {exc.message}"
            continue
        total.pairs += one.pairs
        total.rollout_tokens += one.rollout_tokens
        total.explanation_tokens += one.explanation_tokens
        total.engine_seconds += one.engine_seconds
    return total, failures


def refused_for_its_content(exc: TeacherRejected) -> bool:
    """Whether the teacher refused what a request holds (400: e.g. a question longer than its context; 413: a body
    over its `SSB_MAX_REQUEST_BYTES` or a gateway's limit in front of it; 422: a field out of range), which the batch
    one problem at a time gets past, or the same problem would meet again. Any other refusal says nothing of the
    problems: a key the teacher no longer takes (401, 403, during a key rotation), an adapter it cannot find or no
    teacher at that URL (404, a gateway during a redeploy), a conflict (409); failing each problem for it would
    finish the dataset early, all `failed`, and start its training on what little was curated."""
    return exc.status in (400, 413, 422)


def finish_problem(
    settings: CuratorSettings, ledger: DatasetLedger, meta: DatasetMeta, problem_id: str, state: str, reason=None
) -> None:
    """Record a problem's final state; the call that finishes the dataset starts its training request, if any, unless
    the dataset was cancelled."""
    if ledger.record_final(meta.id, problem_id, state, reason) and meta.options.train is not None:
        if not ledger.is_cancelled(meta.id):
            start_training(settings, ledger, meta)


def end_problems(
    settings: CuratorSettings, ledger: DatasetLedger, meta: DatasetMeta, problem_ids: Sequence[str], state: str,
    reason: str | None = None,
) -> None:
    """End these problems `state` (`failed` with `reason`, or `cancelled`), except those whose result a previous run
    of their job stored before it died: they end as the pair store holds them."""
    store = PairStore(settings.dataset_dir(meta.id))
    for problem_id in problem_ids:
        outcome = store.outcome(problem_id)
        if outcome is not None:
            finish_problem(settings, ledger, meta, problem_id, outcome)
        else:
            finish_problem(settings, ledger, meta, problem_id, state, reason)


def training_run_id(meta: DatasetMeta) -> str:
    """The run a finished dataset asks the trainer for: the `run_id` of its training request, else one named after
    the dataset. A request sent twice (by a job retried after it died waiting for the answer) starts one run."""
    return (meta.options.train or {}).get("run_id") or dataset_run_id(meta.id)


def start_training(settings: CuratorSettings, ledger: DatasetLedger, meta: DatasetMeta) -> None:
    """Ask the trainer service to train on the finished dataset; record the run id, or why it could not start (the
    request sent again while the trainer restarts or is busy: `post_training_request`)."""
    headers = {"Authorization": f"Bearer {settings.trainer_key()}"} if settings.trainer_api_key else {}
    run_id = training_run_id(meta)
    body = {**(meta.options.train or {}), "dataset_id": meta.id, "run_id": run_id}
    by_hand = f"; to train on it, POST this training request to the trainer's /v1/runs with run_id {run_id!r}"
    try:
        response = post_training_request(f"{settings.trainer_url.rstrip('/')}/v1/runs", body, headers)
    except httpx.HTTPError as exc:
        error = f"the trainer at {settings.trainer_url} could not be reached ({TRAINING_REQUEST_TRIES} tries): {exc}"
        ledger.set_training(meta.id, error=error + by_hand)
        return
    if response.status_code >= 400:
        error = f"the trainer refused the request ({response.status_code}): {response.text[:1000]}"
        ledger.set_training(meta.id, error=error + by_hand)
        return
    ledger.set_training(meta.id, run_id=run_id)
    log.info("dataset %s done; training run %s started", meta.id, run_id)


# The training request is sent again while the trainer cannot take it (unreachable, restarting: 502-504, busy: 429),
# which is safe since its run id names one run: up to this many tries, each given the timeout, waiting the backoff,
# doubling (or the Retry-After), at most 8 s in between. All of them stay inside RQ's 60 s for a failure callback,
# which may be what sends it.
TRAINING_REQUEST_TRIES = 4
TRAINING_REQUEST_TIMEOUT_SECONDS = 8.0
TRAINING_REQUEST_BACKOFF_SECONDS = 1.0
TRANSIENT_STATUSES = (429, 502, 503, 504)


def post_training_request(url: str, body: dict, headers: dict) -> httpx.Response:
    """POST `body` to the trainer's `url`, tried again as the constants above say; the last answer, or the last
    transport error raised."""
    tries = 0
    while True:
        tries += 1
        try:
            response = httpx.post(url, json=body, headers=headers, timeout=TRAINING_REQUEST_TIMEOUT_SECONDS)
        except httpx.TransportError:
            if tries == TRAINING_REQUEST_TRIES:
                raise
            retry_after = 0.0
        else:
            if response.status_code not in TRANSIENT_STATUSES or tries == TRAINING_REQUEST_TRIES:
                return response
            retry_after = retry_after_seconds(response)
        time.sleep(min(max(TRAINING_REQUEST_BACKOFF_SECONDS * 2 ** (tries - 1), retry_after), 8.0))


def start_training_if_owed(settings: CuratorSettings, ledger: DatasetLedger, meta: DatasetMeta) -> None:
    """Send the training request of a finished dataset that has neither a run nor an error recorded: the job that
    finished it died before the trainer answered, and RQ runs it again."""
    if meta.options.train is None or ledger.is_cancelled(meta.id):
        return
    status = ledger.status(meta.id)
    if status is not None and status.state == "done" and not status.training_run and not status.training_error:
        start_training(settings, ledger, meta)


def record_job_failure(job, connection, exc_type, exc_value, traceback) -> None:
    """RQ's failure callback. It also runs for a failure that will be retried: only the last one is final, and it
    marks each problem of the job that has no outcome `failed`, with the error. The late failure of a stalled run
    whose job another worker has taken up since (`started_elsewhere`) records nothing."""
    if job.should_retry or started_elsewhere(job, connection, job.worker_name):
        return
    dataset_id, problem_ids = job.args[:2]
    settings = CuratorSettings()
    ledger = DatasetLedger(connection, settings.key_prefix)
    meta = ledger.meta(dataset_id)
    if meta is None:
        return
    error = f"{exc_type.__name__}: {exc_value}".strip().rstrip(":")
    attempts = job.meta.get("attempts", settings.job_retries + 1)  # as queued: the workers' settings may differ
    end_problems(settings, ledger, meta, problem_ids, "failed", f"{error} (after {attempts} attempts)")
    start_training_if_owed(settings, ledger, meta)  # the job may have finished the dataset, then died on the request


def dataset_problems(
    settings: CuratorSettings, dataset_id: str, problem_ids: Sequence[str], span: Sequence[int] | None = None
) -> list[Problem]:
    """These problems of the dataset, in the order given, read from its problems file on the shared volume: the lines
    at `span` (bytes from, to) when given, else the whole file."""
    path = settings.dataset_dir(dataset_id) / PROBLEMS_FILE
    if span is None:  # the file as accepted at upload (perhaps by a version that did not compare ids' case)
        problems = load_problems(path, case_blind_ids=False)
    else:
        with open(path, "rb") as file:
            file.seek(span[0])
            problems = parse_problem_file(file.read(span[1] - span[0]), str(path), case_blind_ids=False)
    by_id = {p.id: p for p in problems}
    missing = [i for i in problem_ids if i not in by_id]
    if missing:
        raise LookupError(f"dataset {dataset_id} has no problems {missing[:5]} (is the data volume shared?)")
    return [by_id[i] for i in problem_ids]


class AdapterRollouts(ConcurrentCalls):
    """An engine whose rollouts come from a LoRA adapter loaded in the teacher (the previous round's student), while
    hinted explanations come from the base model, as in the first round. Pairs record `model` as `base+adapter`."""

    def __init__(self, engine, adapter: str):
        self.engine = engine
        self.adapter = adapter

    @property
    def model_name(self) -> str:
        return f"{self.engine.model_name}+{self.adapter}"

    @property
    def dtype(self) -> str | None:
        """The teacher's: the adapter runs in its engine."""
        return self.engine.dtype

    def sharing_the_bound(self, calls: int = 2):
        return self.engine.sharing_the_bound(calls)

    def rollouts(self, questions, sampling, *, worked_example=False, adapter=None):
        return self.engine.rollouts(questions, sampling, worked_example=worked_example, adapter=adapter or self.adapter)

    def explanations(self, items, sampling, *, worked_example=False):
        return self.engine.explanations(items, sampling, worked_example=worked_example)


class CurationWorker(JobProcessWorker):
    """RQ's forking worker with a short heartbeat: RQ's own is the monitoring interval plus 60 s, which leaves a
    killed worker's job unclaimed for a minute and a half. (An idle worker wakes for maintenance every
    `worker_ttl - 15` s, so `run_worker` sets that to the maintenance interval too.) A job whose process dies on its
    last attempt still marks its problems `failed`, a killed worker's job process dies with it, so the worker that
    takes the job over does not curate its problems beside it, and a worker stopped (SIGTERM) while it works hands its
    job back at once, spending no retry: its problems not yet finished are curated by the next worker
    (`JobProcessWorker`)."""

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return 3 * self.job_monitoring_interval


def run_worker(settings: CuratorSettings, *, burst: bool = False, name: str | None = None) -> None:
    """Serve the curation queue until SIGTERM (or, with `burst`, until it is empty)."""
    connection = redis_connection(settings)
    worker = CurationWorker(
        [curation_queue(settings, connection)],
        connection=connection,
        serializer=JSONSerializer,
        name=name,
        job_monitoring_interval=settings.worker_heartbeat_seconds,
        maintenance_interval=settings.maintenance_interval_seconds,
        worker_ttl=settings.maintenance_interval_seconds + 15,
    )
    started = time.time()
    worker.work(with_scheduler=True, burst=burst)
    log.info("worker %s stopped after %.0f s", worker.name, time.time() - started)
