"""Durable, write-once storage of teacher/student pairs and dropped problems, keyed by problem id.

Layout of a pair directory:

    DIR/pairs/<problem id>.safetensors   one verified pair: the arrays as tensors, the record as JSON metadata
    DIR/dropped/<problem id>.json        a problem that gave no pair, with the reason

A pair file holds `token_ids` (int32, T), `topk_ids` (int32, T x k) and `topk_logprobs` (float32, T x k); safetensors
loads without pickle and memory-maps. Every file is written to a hidden temporary name, flushed to disk, then
hard-linked to its final name, which fails if the name exists: a reader never sees a half-written file, and a
problem written twice (a retried job, a second run, two workers) keeps its first result. Two runs of one problem at
once that end differently (a job re-queued while its first process still runs) can leave both a pair and a drop: the
pair wins, so every reader sees each problem once, paired or dropped. A writer killed mid-write leaves its hidden
temporary file, which readers ignore and `remove_orphaned_temporaries` deletes once it is old (curation calls it).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from shared.schemas import DroppedProblem, Pair, PairRecord

PAIR_FORMAT = "ssb-pair-v1"


class StorageError(RuntimeError):
    """A stored file is unreadable or not a pair of this format."""


def write_once(path: Path, data: bytes) -> bool:
    """Atomically create `path` with `data`; return False (and write nothing) if it already exists."""
    make_directories(path.parent)
    if path.exists():
        return False
    tmp = _temporary_on_disk(path, data)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        sync_directory(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def replace_atomically(path: Path, text: str) -> Path:
    """Write `text` to `path` whole or not at all: a temporary file beside it, on disk before it is renamed over
    `path` (with the mode the umask gives any new file)."""
    make_directories(path.parent)
    tmp = _temporary_on_disk(path, text.encode("utf-8"))
    try:
        os.replace(tmp, path)
        sync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _temporary_on_disk(path: Path, data: bytes) -> Path:
    """`data` in a hidden temporary file beside `path` (a name readers ignore), flushed to disk; removed on failure."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def make_directories(directory: Path) -> None:
    """`directory` and its missing parents, each one created made durable in its parent: a crash of the machine must
    not lose a new directory together with the files already confirmed in it."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)  # another writer may make it meanwhile
        sync_directory(new.parent)


def sync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk, so a file created or renamed in it survives a crash of the machine."""
    _fsync(directory)


def _fsync(path: Path) -> None:
    """Flush a file's contents, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(directory: Path) -> None:
    """Flush every file under `directory`, and the directories holding them, to disk: written by libraries that do
    not (torch, safetensors), then renamed into place, they would otherwise survive a crash of the machine as empty
    files under a complete name."""
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # the deepest first
        _fsync(path)
    _fsync(directory)


def pair_arrays_problem(tokens: int, topk_ids: np.ndarray, topk_logprobs: np.ndarray, topk: int) -> str | None:
    """Why a pair's arrays do not fit together, or None: one row of top-k ids and one of log-probabilities per
    explanation token, both `topk` wide (or empty: no teacher signal). A mismatch stored as it is would train on
    targets that belong to other tokens."""
    if topk_ids.ndim != 2 or topk_ids.shape != topk_logprobs.shape:
        return f"top-k ids {topk_ids.shape} and log-probabilities {topk_logprobs.shape} are not one (tokens, k) shape"
    if topk_ids.shape[0] != tokens or topk_ids.shape[1] not in (topk, 0):
        return f"top-k arrays {topk_ids.shape} for {tokens} explanation tokens at top-{topk}"
    return None


def encode_pair(pair: Pair) -> bytes:
    """Serialize a pair to safetensors bytes (arrays as tensors, record as JSON metadata); StorageError for arrays
    that do not fit together (`pair_arrays_problem`)."""
    tokens = len(pair.token_ids)
    try:
        topk_ids = np.asarray(pair.topk_ids, dtype=np.int32)
        topk_logprobs = np.asarray(pair.topk_logprobs, dtype=np.float32)
    except ValueError as exc:  # rows of different lengths
        raise StorageError(f"pair {pair.record.problem_id}: top-k rows of unequal length ({exc})") from exc
    if topk_ids.size == 0 and topk_logprobs.size == 0:  # no teacher signal kept
        topk_ids, topk_logprobs = np.zeros((tokens, 0), np.int32), np.zeros((tokens, 0), np.float32)
    problem = pair_arrays_problem(tokens, topk_ids, topk_logprobs, pair.record.topk)
    if problem is not None:
        raise StorageError(f"pair {pair.record.problem_id}: {problem}")
    token_ids = np.asarray(pair.token_ids, dtype=np.int32)
    tensors = {"token_ids": token_ids, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs}
    return save(tensors, metadata={"format": PAIR_FORMAT, "record": pair.record.model_dump_json()})


def pair_metadata(path: Path) -> dict:
    """A pair file's metadata (its record as JSON), read without its arrays; StorageError for another kind of file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != PAIR_FORMAT:
        raise StorageError(f"{path}: not an SSB pair file (format {metadata.get('format')!r})")
    return metadata


def decode_pair_record(path: Path) -> PairRecord:
    """The record of one pair file, its arrays not read; StorageError for a file that is not a pair's."""
    try:
        return PairRecord.model_validate_json(pair_metadata(path)["record"])
    except StorageError:
        raise
    except Exception as exc:  # corrupt header, bad JSON
        raise StorageError(f"{path}: unreadable pair file: {exc}") from exc


def decode_pair(path: Path) -> Pair:
    """Read one pair file; StorageError for one that is not a whole pair (its arrays checked as when written)."""
    try:
        metadata = pair_metadata(path)
        arrays = load_file(str(path))
        record = PairRecord.model_validate_json(metadata["record"])
        token_ids, topk_ids, topk_logprobs = arrays["token_ids"], arrays["topk_ids"], arrays["topk_logprobs"]
        problem = "token ids are not one row" if token_ids.ndim != 1 else None
        problem = problem or pair_arrays_problem(len(token_ids), topk_ids, topk_logprobs, record.topk)
        if problem is not None:
            raise StorageError(f"{path}: {problem}")
        return Pair(
            record=record,
            token_ids=token_ids.tolist(),
            topk_ids=topk_ids.tolist(),
            topk_logprobs=topk_logprobs.tolist(),
        )
    except StorageError:
        raise
    except Exception as exc:  # corrupt header, bad JSON, missing tensor
        raise StorageError(f"{path}: unreadable pair file: {exc}") from exc


class PairStore:
    """The pairs and dropped problems of one curation output directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.pairs_dir = self.root / "pairs"
        self.dropped_dir = self.root / "dropped"

    def pair_path(self, problem_id: str) -> Path:
        return self.pairs_dir / f"{problem_id}.safetensors"

    def dropped_path(self, problem_id: str) -> Path:
        return self.dropped_dir / f"{problem_id}.json"

    def is_done(self, problem_id: str) -> bool:
        """True when the problem already has a pair or a recorded drop."""
        return self.pair_path(problem_id).exists() or self.dropped_path(problem_id).exists()

    def outcome(self, problem_id: str) -> str | None:
        """How the problem ended: `paired`, its drop reason, or None while it has neither file."""
        if self.pair_path(problem_id).exists():
            return "paired"
        path = self.dropped_path(problem_id)
        if path.exists():
            return DroppedProblem.model_validate_json(path.read_bytes()).reason
        return None

    def stored_problem(self, problem_id: str) -> tuple[str, str] | None:
        """The question and gold answer a problem's result was made from (its pair's record, or its drop's), or None:
        no result yet, or a drop written before they were recorded. StorageError for an unreadable file."""
        if self.pair_path(problem_id).exists():
            record = decode_pair_record(self.pair_path(problem_id))
            return record.question, record.gold
        path = self.dropped_path(problem_id)
        if not path.exists():
            return None
        try:
            dropped = DroppedProblem.model_validate_json(path.read_bytes())
        except ValueError as exc:
            raise StorageError(f"{path}: unreadable drop record: {exc}") from exc
        return (dropped.question, dropped.gold) if dropped.question is not None and dropped.gold is not None else None

    def write_pair(self, pair: Pair) -> bool:
        """Store a pair once; False if this problem already had one."""
        return write_once(self.pair_path(pair.record.problem_id), encode_pair(pair))

    def write_dropped(self, dropped: DroppedProblem) -> bool:
        """Record a dropped problem once; False if it was already recorded."""
        return write_once(self.dropped_path(dropped.problem_id), dropped.model_dump_json(indent=1).encode())

    def pair_ids(self) -> list[str]:
        return sorted(p.stem for p in self.pairs_dir.glob("*.safetensors") if not p.name.startswith("."))

    def load_pair(self, problem_id: str) -> Pair:
        return decode_pair(self.pair_path(problem_id))

    def iter_pairs(self) -> Iterator[Pair]:
        for problem_id in self.pair_ids():
            yield self.load_pair(problem_id)

    def iter_dropped(self) -> Iterator[DroppedProblem]:
        """The dropped problems, except any that another run of the same problem paired."""
        for path in sorted(self.dropped_dir.glob("*.json")):
            if not path.name.startswith(".") and not self.pair_path(path.stem).exists():
                yield DroppedProblem.model_validate_json(path.read_bytes())

    def remove_orphaned_temporaries(self, older_than_seconds: float = 3600.0) -> int:
        """Delete the temporary files of writers that died mid-write; return how many. A write takes milliseconds,
        so a temporary file older than `older_than_seconds` has no writer left, on any machine sharing the store."""
        cutoff, removed = time.time() - older_than_seconds, 0
        for directory in (self.pairs_dir, self.dropped_dir):
            for path in directory.glob(".*.tmp"):
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:  # its writer finished, or another curation removed it
                    continue
        return removed

    def export_jsonl_lines(self) -> Iterator[str]:
        """Each pair as one JSON line (record fields plus the arrays as lists)."""
        for pair in self.iter_pairs():
            yield json.dumps(
                {
                    **pair.record.model_dump(mode="json"),
                    "token_ids": pair.token_ids,
                    "topk_ids": pair.topk_ids,
                    "topk_logprobs": pair.topk_logprobs,
                }
            )
