"""Pair storage: atomic, write-once, loadable without pickle."""

import json
import os

import pytest

from shared.schemas import DroppedProblem, Pair, PairRecord, RenderedPrompt, Rollout, SamplingSettings
from shared.storage import PAIR_FORMAT, PairStore, StorageError


def make_pair(problem_id="p-1", tokens=5, k=3) -> Pair:
    prompt = RenderedPrompt(messages=[], text="<prompt>", token_ids=[1, 2, 3])
    record = PairRecord(
        problem_id=problem_id,
        question="What is 2+2?",
        gold="4",
        rollouts=[Rollout(text="4", num_tokens=1, extracted="4", correct=True)],
        correct_hint_index=0,
        incorrect_hint_index=0,
        prompt_version="v",
        teacher_prompt=prompt,
        student_prompt=prompt,
        explanation="2+2=4, \\boxed{4}",
        explanation_extracted="4",
        model="m",
        rollout_sampling=SamplingSettings(n=4, temperature=0.8),
        explanation_sampling=SamplingSettings(temperature=0.4, logprobs=k),
        topk=k,
    )
    return Pair(
        record=record,
        token_ids=list(range(tokens)),
        topk_ids=[[t, t + 1, t + 2][:k] for t in range(tokens)],
        topk_logprobs=[[-0.5, -1.5, -2.5][:k] for _ in range(tokens)],
    )


def test_round_trip_and_write_once(tmp_path):
    store = PairStore(tmp_path)
    pair = make_pair()
    assert store.write_pair(pair)
    assert not store.write_pair(make_pair(tokens=2))  # a second write of the same problem keeps the first
    loaded = store.load_pair("p-1")
    assert loaded == pair
    assert store.is_done("p-1") and not store.is_done("p-2")
    assert [p.record.problem_id for p in store.iter_pairs()] == ["p-1"]
    assert os.listdir(tmp_path / "pairs") == ["p-1.safetensors"]  # no temporary file left behind


def test_dropped_and_export(tmp_path):
    store = PairStore(tmp_path)
    store.write_pair(make_pair("a"))
    assert store.write_dropped(DroppedProblem(problem_id="b", reason="no_mix"))
    assert not store.write_dropped(DroppedProblem(problem_id="b", reason="ungradeable"))
    assert [d.reason for d in store.iter_dropped()] == ["no_mix"]
    assert store.is_done("b")
    # Written as UTF-8 and read as UTF-8, whatever the locale: a drop's text may be anything.
    explanation = "x = \u22123 \u00d7 2, so x\u00b2 = 36 \u2014 \u5341\u4e8c"
    assert store.write_dropped(DroppedProblem(problem_id="c", reason="explanation_wrong", explanation=explanation))
    assert [d.explanation for d in store.iter_dropped() if d.problem_id == "c"] == [explanation]
    assert store.outcome("c") == "explanation_wrong"
    lines = list(store.export_jsonl_lines())
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["problem_id"] == "a" and len(row["topk_ids"]) == 5 and row["token_ids"] == [0, 1, 2, 3, 4]


def test_a_pair_wins_over_a_drop_of_the_same_problem(tmp_path):
    """Two runs of one problem at once that ended differently leave both files: every reader sees the pair only."""
    store = PairStore(tmp_path)
    assert store.write_dropped(DroppedProblem(problem_id="a", reason="explanation_wrong"))
    assert store.write_dropped(DroppedProblem(problem_id="b", reason="no_mix"))
    assert store.outcome("a") == "explanation_wrong"
    assert store.write_pair(make_pair("a"))  # the other run's pair, written after the drop
    assert store.outcome("a") == "paired" and store.pair_ids() == ["a"]
    assert [d.problem_id for d in store.iter_dropped()] == ["b"]


def test_temporary_files_of_dead_writers_are_removed_once_old(tmp_path):
    store = PairStore(tmp_path)
    store.write_pair(make_pair("a"))
    store.write_dropped(DroppedProblem(problem_id="b", reason="no_mix"))
    orphan = store.pairs_dir / ".c.safetensors.0123.tmp"  # a writer killed between writing and linking
    orphan.write_bytes(b"half a pair")
    os.utime(orphan, (0, 0))
    in_flight = store.dropped_dir / ".d.json.4567.tmp"  # a writer still at work
    in_flight.write_bytes(b"{")
    assert store.remove_orphaned_temporaries(older_than_seconds=3600) == 1
    assert not orphan.exists() and in_flight.exists()
    assert store.pair_ids() == ["a"] and [d.problem_id for d in store.iter_dropped()] == ["b"]


def test_corrupt_file_is_a_clear_error(tmp_path):
    store = PairStore(tmp_path)
    store.pairs_dir.mkdir(parents=True)
    store.pair_path("bad").write_bytes(b"not a safetensors file")
    with pytest.raises(StorageError, match="bad.safetensors"):
        store.load_pair("bad")


def test_arrays_that_do_not_fit_together_are_refused_when_written_and_when_read(tmp_path):
    """One row of top-k ids and one of log-probabilities per explanation token, `topk` wide: a pair whose arrays
    would only fit reshaped (the top-k of other tokens) is refused, written or read, never stored scrambled."""
    import numpy as np
    from safetensors.numpy import save_file

    good = make_pair(tokens=4, k=2)
    bad = [
        good.model_copy(update={"topk_ids": [[1, 2, 3, 4], [5, 6, 7, 8]]}),  # 2 x 4: reshaped to 4 x 2 before
        good.model_copy(update={"topk_logprobs": [[-1.0] * 4, [-2.0] * 4]}),  # ids 4 x 2, log-probabilities 2 x 4
        good.model_copy(update={"topk_ids": [[1, 2, 3]] * 4, "topk_logprobs": [[-1.0] * 3] * 4}),  # top-3, not 2
        good.model_copy(update={"topk_ids": [[1, 2], [3]] + [[1, 2]] * 2}),  # rows of unequal length
    ]
    store = PairStore(tmp_path)
    for pair in bad:
        with pytest.raises(StorageError, match="pair p-1: "):
            store.write_pair(pair)
    assert store.pair_ids() == []
    no_signal = good.model_copy(update={"topk_ids": [], "topk_logprobs": []})  # no teacher signal: (tokens, 0)
    assert store.write_pair(no_signal) and store.load_pair("p-1").topk_ids == [[]] * 4

    # A file written by other means: its arrays are checked as it is read, a missing one named.
    (tmp_path / "pairs").mkdir(exist_ok=True)
    metadata = {"format": PAIR_FORMAT, "record": good.record.model_dump_json()}
    arrays = {"token_ids": np.arange(4, dtype=np.int32), "topk_ids": np.zeros((2, 4), np.int32),
              "topk_logprobs": np.zeros((2, 4), np.float32)}
    save_file(arrays, str(tmp_path / "pairs" / "p-2.safetensors"), metadata=metadata)
    with pytest.raises(StorageError, match=r"p-2.safetensors: top-k arrays \(2, 4\) for 4 explanation tokens"):
        store.load_pair("p-2")
    del arrays["topk_ids"]
    save_file(arrays, str(tmp_path / "pairs" / "p-3.safetensors"), metadata=metadata)
    with pytest.raises(StorageError, match="p-3.safetensors: unreadable pair file: 'topk_ids'"):
        store.load_pair("p-3")


def test_storage_is_compact(tmp_path):
    store = PairStore(tmp_path)
    store.write_pair(make_pair(tokens=1000, k=3))
    size = store.pair_path("p-1").stat().st_size
    assert size < 1000 * (4 + 3 * 8) + 8192  # ids and top-k arrays, plus the JSON record


def test_files_written_before_explanation_attempts_were_recorded_still_load():
    record = json.loads(make_pair().record.model_dump_json())
    del record["explanation_attempts"], record["explanation_attempt"]
    loaded = PairRecord.model_validate(record)
    assert (loaded.explanation_attempts, loaded.explanation_attempt) == (1, 0)
    dropped = DroppedProblem.model_validate({"problem_id": "b", "reason": "explanation_wrong", "explanation": "x"})
    assert dropped.explanation_attempts is None


def test_outcome_reads_how_each_problem_ended(tmp_path):
    store = PairStore(tmp_path)
    store.write_pair(make_pair())
    store.write_dropped(DroppedProblem(problem_id="b", reason="no_mix"))
    assert [store.outcome(i) for i in ("p-1", "b", "c")] == ["paired", "no_mix", None]


def test_new_directories_are_synced_into_their_parents(tmp_path, monkeypatch):
    """A file written where its directories do not exist yet: each directory created is synced into its parent (the
    file's own directory after the file), so a crash of the machine cannot lose the directory with the file in it."""
    from shared import storage

    synced = []
    real_sync = storage.sync_directory
    monkeypatch.setattr(storage, "sync_directory", lambda directory: synced.append(directory) or real_sync(directory))
    storage.replace_atomically(tmp_path / "a" / "b" / "report.json", "{}")
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    synced.clear()
    storage.replace_atomically(tmp_path / "a" / "b" / "report.json", "{}")  # nothing new to make
    assert synced == [tmp_path / "a" / "b"]
