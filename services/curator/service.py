"""The curator's logic behind its routes (services/curator/app.py wires them; nothing here imports FastAPI).

A dataset is accepted whole or not at all: the routes validate every row first (`shared.datasets`), then
`create_dataset` writes its directory under a temporary name and renames it into place, records it in the ledger and
enqueues its jobs in one Redis transaction; if that fails the directory is removed again. So a rejected or failed
upload leaves nothing in Redis or on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from redis import ConnectionError as RedisConnectionError
from redis import Redis, RedisError, WatchError
from rq import Worker
from rq.job import Job

from services.curator.jobs import (
    META_FILE,
    PROBLEMS_FILE,
    batch_spans,
    curation_queue,
    end_problems,
    enqueue_data,
    redis_connection,
)
from services.curator.ledger import DatasetLedger, DatasetMeta, UnreadableDataset
from services.curator.settings import CuratorSettings
from services.errors import ServiceError
from shared.curator_api import DATASET_ID_PATTERN, DatasetCreated, DatasetList, DatasetOptions, DatasetStatus
from shared.datasets import write_problems_jsonl
from shared.schemas import Problem
from shared.storage import PairStore, make_directories, replace_atomically, sync_directory
from shared.workers import cancel_unstarted, redis_location

log = logging.getLogger("ssb.curator")
T = TypeVar("T")
UPLOAD_KEY_TTL_SECONDS = 24 * 3600  # how long an upload sent again with its Idempotency-Key answers as the first


@dataclass
class UploadKey:
    """An upload's idempotency key (the client's `Idempotency-Key`), kept `UPLOAD_KEY_TTL_SECONDS` with the answer it
    got and a fingerprint of the upload it came with."""

    key: str
    fingerprint: str

    @classmethod
    def of(cls, prefix: str, key: str, problems: list[Problem], options: DatasetOptions, name: str | None) -> UploadKey:
        upload = [[p.model_dump(mode="json") for p in problems], options.model_dump(mode="json"), name]
        return cls(
            key=f"{prefix}:upload:{hashlib.sha256(key.encode()).hexdigest()[:32]}",
            fingerprint=hashlib.sha256(json.dumps(upload, sort_keys=True).encode()).hexdigest(),
        )

    def earlier(self, redis: Redis) -> DatasetCreated | None:
        """What the key's first upload was answered, None for a key not seen; a 422 for a key sent with another."""
        raw = redis.get(self.key)
        if raw is None:
            return None
        stored = json.loads(raw)
        if stored["fingerprint"] != self.fingerprint:
            raise ServiceError(
                422, "this Idempotency-Key came with another upload: send a new key with each new upload",
                "invalid_request", "Idempotency-Key",
            )
        return DatasetCreated.model_validate(stored["created"])

    def record(self, created: DatasetCreated, pipe) -> None:
        answer = {"fingerprint": self.fingerprint, "created": created.model_dump(mode="json")}
        pipe.set(self.key, json.dumps(answer), ex=UPLOAD_KEY_TTL_SECONDS)


def is_dataset_id(text: str) -> bool:
    """Whether `text` has the form of the ids this service gives (`ds-` and 12 hex digits): anything else names no
    dataset, and never reaches a Redis key (where `<id>:jobs` would name another key of a real dataset)."""
    return re.fullmatch(DATASET_ID_PATTERN, text) is not None


@dataclass
class CurationOverview:
    datasets: list[DatasetStatus]
    queued_jobs: int
    workers: int


class CuratorService:
    """Datasets in, jobs out, status back."""

    def __init__(self, settings: CuratorSettings, redis: Redis | None = None):
        self.settings = settings
        self.redis = redis if redis is not None else redis_connection(settings)
        self.ledger = DatasetLedger(self.redis, settings.key_prefix)
        self.queue = curation_queue(settings, self.redis)

    def readiness_problem(self) -> str | None:
        try:
            self.redis.ping()
        except Exception as exc:  # any connection or auth error means the same to a probe
            return f"Redis at {redis_location(self.settings.redis_url)} does not answer: {type(exc).__name__}"
        return None

    def create_dataset(
        self, problems: list[Problem], options: DatasetOptions, name: str | None, idempotency_key: str | None = None
    ) -> DatasetCreated:
        """Store the problems and queue their jobs. With an `idempotency_key`, an upload sent again (its answer lost)
        answers as the first did, and creates nothing; the same key with another upload is a 422."""
        upload = None
        if idempotency_key is not None:
            upload = UploadKey.of(self.settings.key_prefix, idempotency_key, problems, options, name)
        if upload is not None and (earlier := upload.earlier(self.redis)) is not None:
            return earlier
        if options.limit is not None:
            problems = problems[: options.limit]
        if len(problems) > self.settings.max_problems:
            raise ServiceError(
                413, f"{len(problems)} problems; at most {self.settings.max_problems} per dataset", "too_large"
            )
        dataset_id = f"ds-{uuid.uuid4().hex[:12]}"
        meta = DatasetMeta(id=dataset_id, name=name, problems=len(problems), options=options, created_at=time.time())
        directory = self.settings.dataset_dir(dataset_id)
        self.write_directory(meta, problems)
        ids = [p.id for p in problems]
        batches = [ids[start : start + options.batch_size] for start in range(0, len(ids), options.batch_size)]
        created = DatasetCreated(id=dataset_id, problems=len(problems), jobs=len(batches))
        try:
            spans = batch_spans(directory / PROBLEMS_FILE, [len(batch) for batch in batches])
            job_data = enqueue_data(self.settings, dataset_id, batches, spans)
            with self.redis.pipeline() as pipe:
                if upload is not None:  # sent twice at once: one creates the dataset, the other answers as it did
                    pipe.watch(upload.key)
                    if pipe.exists(upload.key):
                        raise WatchError(f"{upload.key} was recorded meanwhile")
                    pipe.multi()
                    upload.record(created, pipe)
                self.ledger.create(meta, [d.job_id for d in job_data], pipe)
                self.queue.enqueue_many(job_data, pipeline=pipe)
                pipe.execute()
        except WatchError as exc:
            # Another request with the key recorded it first; or the connection dropped while the key was watched,
            # which redis-py also says with a WatchError, before the transaction ran or after (its answer lost).
            recorded = self.recorded(dataset_id)
            if recorded:
                return created
            if recorded is None:  # nothing can be told: the files stay, and the upload may be sent again
                raise RedisConnectionError(f"Redis did not answer whether dataset {dataset_id} was recorded") from exc
            shutil.rmtree(directory, ignore_errors=True)
            if (earlier := upload.earlier(self.redis)) is None:  # the connection dropped before the transaction
                raise RedisConnectionError("the connection to Redis dropped before the upload was recorded") from exc
            return earlier
        except BaseException as exc:
            # A transaction whose answer was lost (the connection dropped after Redis ran it) recorded the dataset
            # and queued its jobs: its files stay, and it was created. Where that cannot be told, they stay too.
            recorded = self.recorded(dataset_id)
            if recorded and isinstance(exc, RedisError):
                return created
            if recorded is False:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return created

    def recorded(self, dataset_id: str) -> bool | None:
        """Whether the ledger holds the dataset; None when Redis cannot say."""
        try:
            return bool(self.redis.exists(self.ledger.key(dataset_id)))
        except RedisError:
            return None

    def write_directory(self, meta: DatasetMeta, problems: list[Problem]) -> None:
        """The dataset's problems and metadata, appearing complete under their final name or not at all."""
        final = self.settings.dataset_dir(meta.id)
        staging = final.parent / f".{meta.id}.tmp"
        try:
            make_directories(final.parent)  # a new data directory, durable in its parents
            staging.mkdir()
            write_problems_jsonl(problems, staging / PROBLEMS_FILE)
            replace_atomically(staging / META_FILE, meta.model_dump_json(indent=1))
            os.rename(staging, final)
            sync_directory(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def status(self, dataset_id: str) -> DatasetStatus:
        """The dataset's status; one not finished first has the problems of its jobs RQ failed for good, where nothing
        recorded them, ended (`end_failed_jobs`)."""
        status = self.found(dataset_id, self.ledger.status)
        if status.state in ("queued", "running") and self.end_failed_jobs(dataset_id):
            status = self.found(dataset_id, self.ledger.status)
        return status

    def end_failed_jobs(self, dataset_id: str) -> bool:
        """End `failed` the unfinished problems of the dataset's jobs that RQ failed for good without their failure
        callback recording them (it raised partway: Redis lost again, a stale shared volume; or RQ failed the job
        without calling it: a worker that died between taking a job and starting it). Their problems stayed queued
        for ever, and the dataset never finished. Read from the queue's failed registry, which holds only the jobs
        that failed for good; True if any problem was ended here."""
        prefix = f"{self.settings.key_prefix}-{dataset_id}-"
        job_ids = [job_id for job_id in self.queue.failed_job_registry.get_job_ids() if job_id.startswith(prefix)]
        meta = self.ledger.meta(dataset_id) if job_ids else None
        ended = False
        for job in Job.fetch_many(job_ids, connection=self.redis, serializer=self.queue.serializer):
            if job is None or meta is None:
                continue
            problem_ids = job.args[1]
            if len(self.ledger.final_states(dataset_id, problem_ids)) == len(problem_ids):
                continue
            result = job.latest_result()
            lines = (result.exc_string or "").strip().splitlines() if result is not None else []
            error = lines[-1] if lines else "its job failed"
            log.warning("dataset %s: job %s failed with %d problems unrecorded; ending them failed", dataset_id,
                        job.id, len(problem_ids))
            # The call that records a dataset's last problem sends its training request (`finish_problem`).
            end_problems(self.settings, self.ledger, meta, problem_ids, "failed", f"{error} (the job failed for good)")
            ended = True
        return ended

    def found(self, dataset_id: str, read: Callable[[str], T | None]) -> T:
        """What `read` (the ledger's `meta` or `status`) says of a dataset this service holds; 404 for an id it never
        gave or does not know, 500 for one stored with values this version refuses."""
        try:
            found = read(dataset_id) if is_dataset_id(dataset_id) else None
        except UnreadableDataset as exc:
            raise ServiceError(500, str(exc), "unreadable_dataset", "dataset_id") from exc
        if found is None:
            raise ServiceError(404, f"no dataset {dataset_id!r}", "not_found", "dataset_id")
        return found

    def list_datasets(self) -> DatasetList:
        """Every dataset this version can read (one it cannot is left out, with a warning in the log)."""
        statuses = []
        for dataset_id in self.ledger.ids():
            try:
                status = self.ledger.status(dataset_id)
            except UnreadableDataset as exc:
                log.warning("%s; left out of the listing", exc)
                continue
            if status is not None:
                statuses.append(status)
        return DatasetList(datasets=statuses)

    def overview(self) -> CurationOverview:
        """Every dataset's status, the jobs waiting in the queue, and the workers listening to it (for `/metrics`)."""
        return CurationOverview(
            datasets=self.list_datasets().datasets,
            queued_jobs=self.queue.count,
            # Worker.all drops the workers whose key expired (they died); Worker.count would still count them.
            workers=len(Worker.all(queue=self.queue, serializer=self.queue.serializer)),
        )

    def store(self, dataset_id: str) -> PairStore:
        self.status(dataset_id)  # 404 for an unknown id
        return PairStore(self.settings.dataset_dir(dataset_id))

    def pair_lines(self, dataset_id: str) -> Iterator[str]:
        """The dataset's pairs so far, one JSON line each (the format of `ssb pairs export`)."""
        store = self.store(dataset_id)
        return (line + "\n" for line in store.export_jsonl_lines())

    def dropped_lines(self, dataset_id: str) -> Iterator[str]:
        store = self.store(dataset_id)
        return (dropped.model_dump_json() + "\n" for dropped in store.iter_dropped())

    def cancel(self, dataset_id: str) -> DatasetStatus:
        """Cancel what has not started: queued jobs leave the queue and their problems end `cancelled` (or as a
        previous run stored them); a job already running finishes its problems; a job that starts later finds the
        dataset cancelled. A cancelled dataset starts no training."""
        meta = self.found(dataset_id, self.ledger.meta)
        self.ledger.cancel(dataset_id)
        job_ids = self.ledger.job_ids(dataset_id)

        def end_its_problems(job: Job) -> None:  # before the job goes: a DELETE that fails midway can be sent again
            end_problems(self.settings, self.ledger, meta, job.args[1], "cancelled")

        for job in Job.fetch_many(job_ids, connection=self.redis, serializer=self.queue.serializer):
            if job is not None:
                cancel_unstarted(job, then=end_its_problems)
        return self.status(dataset_id)
