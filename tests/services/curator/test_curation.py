"""Curation on the real engine and model: pairs are verified, complete, aligned with the tokens, and written once.

The session's curation (`curation_run` in tests/conftest.py: six arithmetic problems of seed 0, paper sampling, the
worked example, the demo's token limits, top-20) is checked here; the 200-problem yardstick (at least 10 pairs) is in
`make bench` (benchmarks/curation.py), where its minutes do not weigh on the test suite.
"""

from pathlib import Path

from services.curator.curation import Funnel, changed_problems, curate, record_dropped, rerun_conflict
from shared.grading import grade_response
from shared.schemas import DroppedProblem, Problem
from shared.settings import CurationConfig
from shared.storage import PairStore
from tests.conftest import CURATION_CONFIG, SESSION_PROBLEMS

CONFIG = CurationConfig(**CURATION_CONFIG)


def test_funnel_accounts_for_every_problem(curation_run):
    problems, store, funnel = curation_run
    assert funnel.problems == len(problems) == funnel.processed
    assert funnel.pairs == len(store.pair_ids())
    unverified = sum(n for reason, n in funnel.dropped.items() if reason.startswith("explanation_"))
    assert funnel.with_mix == funnel.explained == funnel.pairs + unverified
    assert funnel.rollout_tokens > 0 and funnel.tokens_per_second > 0
    assert {d.problem_id for d in store.iter_dropped()} | set(store.pair_ids()) == {p.id for p in problems}
    assert not {d.problem_id for d in store.iter_dropped()} & set(store.pair_ids())


def test_pairs_are_verified_and_aligned_with_their_tokens(curation_run, engine):
    _, store, funnel = curation_run
    assert funnel.pairs >= 3, f"only {funnel.pairs} verified pairs from {len(SESSION_PROBLEMS)} arithmetic problems"
    for pair in store.iter_pairs():
        record = pair.record
        assert grade_response(record.gold, record.explanation).correct is True
        assert record.rollouts[record.correct_hint_index].correct is True
        assert record.rollouts[record.incorrect_hint_index].correct is False
        assert not any(r.correct is not None for r in record.rollouts if r.truncated)
        assert len(pair.token_ids) < CONFIG.explanation_max_tokens  # ended, not cut at the limit
        assert record.rollouts[record.correct_hint_index].text in record.teacher_prompt.text
        assert record.rollouts[record.incorrect_hint_index].text in record.teacher_prompt.text
        assert record.question in record.student_prompt.text
        assert "Correct attempt" not in record.student_prompt.text
        assert record.worked_example is True
        # Token ids stored as generated, decoding back to the explanation text.
        text = engine.tokenizer.decode(pair.token_ids, skip_special_tokens=True)
        assert text.strip() == record.explanation.strip()
        assert len(pair.topk_ids) == len(pair.topk_logprobs) == len(pair.token_ids)
        assert all(len(row) == CONFIG.topk for row in pair.topk_ids)
        # The sampled token is nearly always among the teacher's top-20 at temperature 0.4.
        inside = sum(t in row for t, row in zip(pair.token_ids, pair.topk_ids))
        assert inside / len(pair.token_ids) > 0.95
        assert record.rollout_sampling.temperature == 0.8 and record.rollout_sampling.top_k == 50
        assert record.explanation_sampling.temperature == 0.4


def test_running_again_writes_nothing_new(curation_run, engine):
    problems, store, _ = curation_run
    before = {p.name: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()}
    funnel = curate(problems, engine, store, CONFIG)
    after = {p.name: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()}
    assert funnel.skipped == len(problems) and funnel.pairs == 0
    assert before == after


def test_a_rerun_with_other_settings_is_told_from_one_with_the_same(curation_run, engine):
    """A pair store records how its pairs were made: a rerun with the same settings (another seed too) may add to it;
    one with another k, top-k, model or prompt would mix two kinds of pairs, and is named with what differs."""
    _, store, _ = curation_run
    assert rerun_conflict(store, CONFIG, engine.model_name) is None
    assert rerun_conflict(store, CONFIG.model_copy(update={"seed": 7}), engine.model_name) is None
    moved = f"/elsewhere/models/{Path(engine.model_name).name}"  # the same model at another path: the same
    assert rerun_conflict(store, CONFIG, moved) is None
    cached = f"/hub/models--HuggingFaceTB--{Path(engine.model_name).name}/snapshots/12fd25f77366fa6b3b4b768ec3050bf6"
    assert rerun_conflict(store, CONFIG, cached) is None  # in a Hugging Face cache, named by its revision's hash
    other = rerun_conflict(store, CONFIG.model_copy(update={"k": 8, "topk": 5}), "another/model")
    assert other.startswith(f"{store.root} holds pairs made otherwise (")
    for change in (f"model {Path(engine.model_name).name!r} there, 'model' now", "topk 20 there, 5 now",
                   "rollout_sampling.n 4 there, 8 now", "explanation_sampling.logprobs 20 there, 5 now"):
        assert change in other, change
    assert rerun_conflict(PairStore(store.root / "nothing-here"), CONFIG, "another/model") is None


def test_a_rerun_refuses_ids_whose_results_were_made_from_other_problems(curation_run, tmp_path):
    """A rerun skips the ids already done: one that now names another question or gold answer (a file without ids is
    numbered by line, so another file or an inserted line gives old ids to new problems) is refused, named with where
    it came from; the same problems, or new ids, are not. A drop recorded before drops kept their problem is taken as
    the same."""
    problems, store, _ = curation_run
    assert changed_problems(store, problems) is None
    paired = next(p for p in problems if p.id in store.pair_ids())
    moved = [
        paired.model_copy(update={"question": "What is 1 + 1?", "source": "b/train.jsonl:1"}),
        paired.model_copy(update={"id": "a-new-id"}),
    ]
    assert changed_problems(store, moved) == (
        f"{store.root} holds results for 1 of these problem ids made from other problems, e.g. {paired.id} "
        "(b/train.jsonl:1: another question); a rerun would keep them: curate into a new directory"
    )
    drops = PairStore(tmp_path)
    problem = Problem(id="d1", question="What is 2 + 2?", answer="4")
    drops.write_dropped(DroppedProblem(problem_id="d1", question=problem.question, gold="5", reason="no_mix"))
    drops.write_dropped(DroppedProblem(problem_id="d2", reason="no_mix"))  # written before drops kept their problem
    assert "d1 (this problem: another gold answer)" in changed_problems(drops, [problem])
    same = [problem.model_copy(update={"answer": "5"}), problem.model_copy(update={"id": "d2"})]
    assert changed_problems(drops, same) is None


def test_a_drop_another_run_recorded_meanwhile_counts_as_skipped_not_twice(tmp_path):
    """Two runs of one problem at once (a job re-queued while its first process still runs): the second drop writes
    nothing and the funnel counts it skipped, as it does a second pair."""
    store, funnel = PairStore(tmp_path), Funnel(problems=1)
    record_dropped(DroppedProblem(problem_id="q1", reason="no_mix"), store, funnel)
    record_dropped(DroppedProblem(problem_id="q1", reason="ungradeable"), store, funnel)
    assert funnel.dropped == {"no_mix": 1} and funnel.skipped == 1
    assert [(d.problem_id, d.reason) for d in store.iter_dropped()] == [("q1", "no_mix")]
