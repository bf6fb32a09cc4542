"""Runs' and evaluations' state in Redis, shared by the trainer API (which creates and reads them) and the train worker
(which moves them along).

    <prefix>:run:<run id>       a hash: one JSON value per field of `schemas.Run`
    <prefix>:runs               a sorted set of run ids by creation time (the list endpoint's order)
    <prefix>:eval:<eval id>     a hash: one JSON value per field of `schemas.Evaluation` (the report is on disk)
    <prefix>:evals              a sorted set of evaluation ids by creation time

Every write sets named fields (HSET), so two writers never lose each other's fields and writing the same update
twice (a retried job) leaves the same state. Creation is set-if-absent: a record is created once, whoever asks twice.
A record that reached `succeeded`, `failed` or `cancelled` is final: `advance` refuses to move it back.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import redis

FINAL = ("succeeded", "failed", "cancelled")

# Create a hash and index it, in one step, only if absent: a reader never sees half a record.
CREATE_ONCE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
redis.call('hset', KEYS[1], unpack(ARGV, 3))
redis.call('zadd', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


# Set fields unless the record's status is a final one, or its `attempts` is not the writer's attempt. ARGV: n, the n
# final statuses (as stored), the writer's attempt ('' for any), then field, value...
ADVANCE_UNLESS_FINAL = """
local n = tonumber(ARGV[1])
local status = redis.call('hget', KEYS[1], 'status')
for i = 2, n + 1 do
  if status == ARGV[i] then return 0 end
end
if ARGV[n + 2] ~= '' and redis.call('hget', KEYS[1], 'attempts') ~= ARGV[n + 2] then return 0 end
if #ARGV > n + 2 then redis.call('hset', KEYS[1], unpack(ARGV, n + 3)) end
return 1
"""
FINAL_JSON = [json.dumps(status) for status in FINAL]


# Every id a record can have: a run's (`RUN_ID_PATTERN`), an evaluation's (the same, or `<run id>-eval`); no `:`, which
# separates the parts of a key.
RECORD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


class Records:
    """One kind of record (`run` or `eval`) under a key prefix."""

    def __init__(self, connection: redis.Redis, key_prefix: str, kind: str):
        self.redis = connection
        self.prefix = key_prefix
        self.kind = kind

    def key(self, record_id: str) -> str:
        return f"{self.prefix}:{self.kind}:{record_id}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:{self.kind}s"

    def create(self, record_id: str, fields: dict[str, Any]) -> bool:
        """Store a new record; False (and nothing written) when one with this id exists already."""
        fields = {**fields, "id": record_id, "created_at": fields.get("created_at", time.time())}
        mapping = [part for name, value in fields.items() for part in (name, json.dumps(value))]
        created = self.redis.eval(
            CREATE_ONCE, 2, self.key(record_id), self.index_key, fields["created_at"], record_id, *mapping
        )
        return bool(created)

    def get(self, record_id: str) -> dict[str, Any] | None:
        """The record, or None; None also for an id this service never gives (a client's path could otherwise name a
        key of another kind under the prefix)."""
        if not RECORD_ID.fullmatch(record_id):
            return None
        raw = self.redis.hgetall(self.key(record_id))
        if not raw:
            return None
        return {name.decode(): json.loads(value) for name, value in raw.items()}

    def update(self, record_id: str, **fields: Any) -> None:
        """Set these fields (idempotent)."""
        if fields:
            self.redis.hset(self.key(record_id), mapping={name: json.dumps(value) for name, value in fields.items()})

    def advance(self, record_id: str, *, attempt: int | None = None, **fields: Any) -> bool:
        """Set these fields unless the record is already final, or, given the writer's `attempt`, a later attempt
        has started (its `attempts` moved on); False when nothing was written. One atomic step: a writer that read
        the record as running can never overwrite a final state written meanwhile, nor a stale attempt (whose worker
        lost its heartbeat while its job went on) the record of the attempt that took its job over."""
        mapping = [part for name, value in fields.items() for part in (name, json.dumps(value))]
        finals = [len(FINAL_JSON), *FINAL_JSON, "" if attempt is None else str(attempt)]
        return bool(self.redis.eval(ADVANCE_UNLESS_FINAL, 1, self.key(record_id), *finals, *mapping))

    def ids(self, limit: int = 100) -> list[str]:
        """Newest first."""
        return [raw.decode() for raw in self.redis.zrevrange(self.index_key, 0, limit - 1)]

    def increment(self, record_id: str, field: str) -> int:
        """Add one to an integer field and return it (a JSON integer is its own text)."""
        return int(self.redis.hincrby(self.key(record_id), field, 1))

    def delete_all(self) -> None:
        """Remove every record of this kind and the index (tests clean up with it)."""
        for record_id in self.redis.zrange(self.index_key, 0, -1):
            self.redis.delete(self.key(record_id.decode()))
        self.redis.delete(self.index_key)


def run_records(connection: redis.Redis, key_prefix: str) -> Records:
    return Records(connection, key_prefix, "run")


def eval_records(connection: redis.Redis, key_prefix: str) -> Records:
    return Records(connection, key_prefix, "eval")
