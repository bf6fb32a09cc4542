"""Curation on the real engine and model: pairs are verified, complete, aligned with the tokens, and written once."""

import pytest

from services.curator.curation import curate
from shared.arithmetic import make_arithmetic_problems
from shared.grading import grade_response
from shared.settings import CurationConfig
from shared.storage import PairStore

# The yardstick: `ssb data arith --n 200 --seed 0`, curated with the default model, keeps at least 10 pairs.
# Paper defaults (K=4, T=0.8, top-k 50; explanations at T=0.4; top-20 log-probabilities), the worked example on,
# and the demo's token limits.
CONFIG = CurationConfig(k=4, seed=0, worked_example=True, rollout_max_tokens=256, explanation_max_tokens=384, topk=20)


@pytest.fixture(scope="module")
def curated(engine, tmp_path_factory):
    problems = make_arithmetic_problems(200, seed=0)
    store = PairStore(tmp_path_factory.mktemp("pairs"))
    funnel = curate(problems, engine, store, CONFIG)
    return problems, store, funnel


def test_funnel_accounts_for_every_problem(curated):
    problems, store, funnel = curated
    assert funnel.problems == len(problems) == funnel.processed
    assert funnel.pairs == len(store.pair_ids())
    assert funnel.with_mix == funnel.explained == funnel.pairs + funnel.dropped.get("explanation_wrong", 0)
    assert funnel.rollout_tokens > 0 and funnel.tokens_per_second > 0
    assert {d.problem_id for d in store.iter_dropped()} | set(store.pair_ids()) == {p.id for p in problems}


def test_pairs_are_verified_and_aligned_with_their_tokens(curated, engine):
    _, store, funnel = curated
    assert funnel.pairs >= 10, f"only {funnel.pairs} verified pairs from 200 arithmetic problems"
    for pair in store.iter_pairs():
        record = pair.record
        assert grade_response(record.gold, record.explanation).correct is True
        assert record.rollouts[record.correct_hint_index].correct is True
        assert record.rollouts[record.incorrect_hint_index].correct is False
        assert record.rollouts[record.correct_hint_index].text in record.teacher_prompt.text
        assert record.rollouts[record.incorrect_hint_index].text in record.teacher_prompt.text
        assert record.question in record.student_prompt.text
        assert "Correct attempt" not in record.student_prompt.text
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


def test_running_again_writes_nothing_new(curated, engine):
    problems, store, _ = curated
    before = {p.name: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()}
    funnel = curate(problems, engine, store, CONFIG)
    after = {p.name: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()}
    assert funnel.skipped == len(problems) and funnel.pairs == 0
    assert before == after
