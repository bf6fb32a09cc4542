"""The curator's record of datasets in Redis: what each dataset is, and where each of its problems stands.

Keys, under the deployment's prefix P (`SSB_KEY_PREFIX`) and a dataset id D:

    P:datasets                 sorted set of dataset ids by upload time
    P:dataset:D                the dataset's metadata (JSON: name, problem count, options, upload time)
    P:dataset:D:final          hash problem id -> final state; set if absent, so a problem is counted once
    P:dataset:D:counts         hash final state -> how many problems ended so (kept with `final`, in one step)
    P:dataset:D:failures       hash problem id -> why it failed
    P:dataset:D:running        set of problem ids a job has started and not finished
    P:dataset:D:stats          hash: tokens generated, started_at, finished_at, training_run, training_error
    P:dataset:D:cancelled      present once the dataset was cancelled
    P:dataset:D:jobs           set of the dataset's RQ job ids

Every write is safe to repeat: a job that runs twice (a retry, or a worker killed after writing) records nothing
twice, because final states are set-if-absent and a count goes up only when a problem's final state is first set.
The exceptions match the pair store: `paired` replaces another final state (two runs of a problem at once that ended
differently leave its pair, and the pair wins), and a drop replaces `failed` or `cancelled` (a run that went on after
its job was failed or cancelled stored it), moving one count, still without counting the problem twice. So the counts
add up to the final states; where they do not (a dataset created, or some of its problems recorded, by an earlier
version, which kept no counts), a status counts the final states one by one instead.
The funnel's `queued` is what is neither final nor running, so the funnel always adds up to the problems.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, ValidationError
from redis import Redis

from shared.curator_api import FINAL_STATES, DatasetOptions, DatasetStatus, Failure, Funnel

MAX_LISTED_FAILURES = 100
# A status lists failures from one bounded scan of the failures hash, not all of it (a dataset of 100,000 problems may
# fail as many): about this many are read (every one where there are at most MAX_LISTED_FAILURES, whose table has 128
# slots), and the first MAX_LISTED_FAILURES of those by id listed.
FAILURES_SCANNED = 256

# KEYS: final, failures, running, stats, counts. ARGV: problem id, state, has reason (1/0), reason, problems (-1:
# unknown), now. Set the final state if absent, with its failure reason; over another state only a result the pair
# store holds replaces one it does not: `paired` any other, a drop `failed` or `cancelled` (a run of the job that
# overlapped the one that failed or cancelled it), dropping the failure reason. Keep the count of problems in each
# final state; stamp `finished_at` when that made every problem final; 1 when it did.
RECORD_FINAL = """
local newly = redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2])
if newly == 1 then
  redis.call('hincrby', KEYS[5], ARGV[2], 1)
  if ARGV[3] == '1' then
    redis.call('hsetnx', KEYS[2], ARGV[1], ARGV[4])
  end
else
  local before = redis.call('hget', KEYS[1], ARGV[1])
  local unstored = {failed = true, cancelled = true}
  if before ~= ARGV[2] and not unstored[ARGV[2]] and (ARGV[2] == 'paired' or unstored[before]) then
    redis.call('hincrby', KEYS[5], before, -1)
    redis.call('hincrby', KEYS[5], ARGV[2], 1)
    redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
    redis.call('hdel', KEYS[2], ARGV[1])
  end
end
redis.call('srem', KEYS[3], ARGV[1])
local problems = tonumber(ARGV[5])
if newly == 1 and problems >= 0 and redis.call('hlen', KEYS[1]) >= problems then
  return redis.call('hsetnx', KEYS[4], 'finished_at', ARGV[6])
end
return 0
"""

# KEYS: running, final. How many of the running problems have no final state yet (a job marks its problems running
# before it curates them, and another run of the job may have finished one meanwhile).
RUNNING_COUNT = """
local count = 0
for _, problem_id in ipairs(redis.call('smembers', KEYS[1])) do
  if redis.call('hexists', KEYS[2], problem_id) == 0 then
    count = count + 1
  end
end
return count
"""


class DatasetMeta(BaseModel):
    """What a dataset is; written once at upload."""

    id: str
    name: str | None = None
    problems: int
    options: DatasetOptions
    created_at: float


class UnreadableDataset(ValueError):
    """A dataset's stored record does not validate any more."""


class DatasetLedger:
    """Datasets and their problems' states in one Redis, under one key prefix."""

    def __init__(self, redis: Redis, prefix: str):
        self.redis = redis
        self.prefix = prefix
        self._record_final = redis.register_script(RECORD_FINAL)
        self._running_count = redis.register_script(RUNNING_COUNT)

    def key(self, dataset_id: str, part: str | None = None) -> str:
        base = f"{self.prefix}:dataset:{dataset_id}"
        return f"{base}:{part}" if part else base

    # --- datasets ---

    def create(self, meta: DatasetMeta, job_ids: list[str], pipeline) -> None:
        """Record a new dataset in `pipeline` (executed by the caller together with the enqueueing of its jobs)."""
        pipeline.set(self.key(meta.id), meta.model_dump_json())
        pipeline.zadd(f"{self.prefix}:datasets", {meta.id: meta.created_at})
        if job_ids:
            pipeline.sadd(self.key(meta.id, "jobs"), *job_ids)

    def meta(self, dataset_id: str) -> DatasetMeta | None:
        """The dataset's record, None for an unknown id; `UnreadableDataset` for one stored by an earlier version with
        options this version refuses (e.g. a `rollout_max_tokens` above the engine's limit)."""
        raw = self.redis.get(self.key(dataset_id))
        if not raw:
            return None
        try:
            return DatasetMeta.model_validate_json(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise UnreadableDataset(
                f"dataset {dataset_id} was stored with a value this version refuses ({where}: {error['msg']})"
            ) from exc

    def ids(self) -> list[str]:
        return [i.decode() if isinstance(i, bytes) else i for i in self.redis.zrange(f"{self.prefix}:datasets", 0, -1)]

    def job_ids(self, dataset_id: str) -> list[str]:
        return sorted(i.decode() if isinstance(i, bytes) else i for i in self.redis.smembers(self.key(dataset_id, "jobs")))

    def cancel(self, dataset_id: str) -> None:
        self.redis.set(self.key(dataset_id, "cancelled"), time.time())

    def is_cancelled(self, dataset_id: str) -> bool:
        return bool(self.redis.exists(self.key(dataset_id, "cancelled")))

    # --- problems ---

    def final_states(self, dataset_id: str, problem_ids: Sequence[str] | None = None) -> dict[str, str]:
        """The final state of every problem that has one; with `problem_ids`, of those only (a job's few, without
        reading the whole dataset's)."""
        key = self.key(dataset_id, "final")
        if problem_ids is None:
            return {_text(k): _text(v) for k, v in self.redis.hgetall(key).items()}
        states = self.redis.hmget(key, list(problem_ids)) if problem_ids else []
        return {problem_id: _text(state) for problem_id, state in zip(problem_ids, states) if state is not None}

    def mark_running(self, dataset_id: str, problem_ids: list[str]) -> None:
        """A job has started these problems (and the dataset, if it is the first)."""
        with self.redis.pipeline() as pipe:
            pipe.hsetnx(self.key(dataset_id, "stats"), "started_at", time.time())
            if problem_ids:
                pipe.sadd(self.key(dataset_id, "running"), *problem_ids)
            pipe.execute()

    def record_final(self, dataset_id: str, problem_id: str, state: str, reason: str | None = None) -> bool:
        """Record how a problem ended, unless it already has a final state (the pair store's result wins: `paired`
        replaces any other, a drop replaces `failed` or `cancelled`). True when this call finished the dataset (its last
        problem reached a final state): exactly one caller sees True. One atomic step, so a reader never sees every
        problem final without the dataset's `finished_at`."""
        if state not in FINAL_STATES:
            raise ValueError(f"unknown final state {state!r}; one of {', '.join(FINAL_STATES)}")
        meta = self.meta(dataset_id)
        keys = [self.key(dataset_id, part) for part in ("final", "failures", "running", "stats", "counts")]
        flag, text = ("1", reason[:2000]) if reason is not None else ("0", "")
        problems = meta.problems if meta is not None else -1
        return bool(self._record_final(keys=keys, args=[problem_id, state, flag, text, problems, repr(time.time())]))

    def add_generation(self, dataset_id: str, tokens: int) -> None:
        """Tokens the teacher generated for a job (throughput, not a count of problems: a rerun job's tokens were
        really generated)."""
        self.redis.hincrby(self.key(dataset_id, "stats"), "tokens", tokens)

    def set_training(self, dataset_id: str, *, run_id: str | None = None, error: str | None = None) -> None:
        field, value = ("training_run", run_id) if run_id else ("training_error", error or "")
        self.redis.hset(self.key(dataset_id, "stats"), field, value)

    # --- status ---

    def status(self, dataset_id: str, now: float | None = None) -> DatasetStatus | None:
        meta = self.meta(dataset_id)
        if meta is None:
            return None
        now = time.time() if now is None else now
        final_key, running_key = self.key(dataset_id, "final"), self.key(dataset_id, "running")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.key(dataset_id, "counts"))
            pipe.hlen(final_key)
            self._running_count(keys=[running_key, final_key], client=pipe)
            pipe.hgetall(self.key(dataset_id, "stats"))
            pipe.hscan(self.key(dataset_id, "failures"), 0, count=FAILURES_SCANNED)
            pipe.exists(self.key(dataset_id, "cancelled"))
            counts_raw, finals, running, stats_raw, (_, failures_raw), cancelled = pipe.execute()
        counts = {_text(k): int(v) for k, v in counts_raw.items()}
        if sum(counts.values()) != finals:  # not every final state counted: an earlier version recorded some
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hvals(final_key)
                self._running_count(keys=[running_key, final_key], client=pipe)
                states, running = pipe.execute()
            counts = Counter(_text(state) for state in states)
        stats = {_text(k): _text(v) for k, v in stats_raw.items()}
        funnel = Funnel(**{state: n for state, n in counts.items() if n}, running=running)
        funnel.queued = meta.problems - funnel.finished - funnel.running
        started = _float(stats.get("started_at"))
        finished_at = _float(stats.get("finished_at"))
        elapsed_minutes = ((finished_at or now) - started) / 60 if started else 0.0
        rate = funnel.finished / elapsed_minutes if elapsed_minutes > 0 else 0.0
        left = meta.problems - funnel.finished
        if cancelled and funnel.cancelled:
            state = "cancelled"
        elif funnel.finished == meta.problems:
            state = "done"
        else:
            state = "running" if started else "queued"
        listed = sorted(failures_raw.items())[:MAX_LISTED_FAILURES]
        failures = [Failure(problem_id=_text(k), reason=_text(v)) for k, v in listed]
        return DatasetStatus(
            id=meta.id,
            name=meta.name,
            state=state,
            problems=meta.problems,
            funnel=funnel,
            created_at=meta.created_at,
            started_at=started,
            finished_at=finished_at,
            tokens_per_second=int(stats.get("tokens", 0)) / (elapsed_minutes * 60) if elapsed_minutes > 0 else 0.0,
            problems_per_minute=rate,
            seconds_left=(0.0 if left == 0 else left / rate * 60) if rate > 0 else None,
            failures=failures,
            training_run=stats.get("training_run"),
            training_error=stats.get("training_error"),
            options=meta.options,
        )

    def delete(self, dataset_id: str) -> None:
        """Forget a dataset entirely (tests, and an upload whose jobs could not be queued)."""
        parts = (None, "final", "failures", "running", "stats", "counts", "cancelled", "jobs")
        with self.redis.pipeline() as pipe:
            pipe.delete(*(self.key(dataset_id, part) for part in parts))
            pipe.zrem(f"{self.prefix}:datasets", dataset_id)
            pipe.execute()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value) -> float | None:
    return float(value) if value not in (None, "") else None
