"""What makes a curated answer count, on real strings: a rollout or an explanation cut at the token limit never does,
however its last number reads; an explanation that ended with the gold answer does; of several attempts, the first
that passes in sample order is kept."""

import pytest

from services.curator.curation import choose_explanation, explanation_rejection, grade_rollouts, seeded_sampling
from shared.grading import grade_response
from shared.schemas import Generation, Problem
from shared.settings import CurationConfig

PROBLEM = Problem(id="p1", question="Kofi reads 10 pages and then 10 more. How many pages has he read?", answer="20")
RUNAWAY = "The correct solution is:\n#### 20\nThe answer is 20.\n#### 12\nThe answer is 12.\n#### 20\nThe answer is 20."
ENDED = "Kofi reads 10 pages, then 10 more: 10 + 10 = 20.\nThe answer is \\boxed{20}."


def generation(text: str, finish_reason: str) -> Generation:
    return Generation(text=text, token_ids=list(range(len(text.split()))), finish_reason=finish_reason)


def test_an_explanation_cut_at_the_limit_is_rejected_even_when_its_last_number_is_right():
    runaway = generation(RUNAWAY, "length")
    verdict = grade_response(PROBLEM.answer, runaway.text)
    assert verdict.correct is True  # what the grader alone would have let in
    reason, detail = explanation_rejection(PROBLEM, runaway, verdict)
    assert reason == "explanation_truncated" and "cut at" in detail


def test_an_explanation_is_kept_only_when_it_ended_with_the_gold_answer():
    ended = generation(ENDED, "stop")
    assert explanation_rejection(PROBLEM, ended, grade_response(PROBLEM.answer, ended.text)) is None
    wrong = generation(ENDED.replace("{20}", "{21}"), "stop")
    reason, detail = explanation_rejection(PROBLEM, wrong, grade_response(PROBLEM.answer, wrong.text))
    assert reason == "explanation_wrong" and "'21'" in detail


def test_a_rollout_cut_at_the_limit_gets_no_verdict():
    rollouts = grade_rollouts(PROBLEM, [generation(RUNAWAY, "length"), generation(ENDED, "stop")], CurationConfig())
    assert (rollouts[0].truncated, rollouts[0].correct) == (True, None)
    assert rollouts[0].extracted is not None  # what it last wrote is kept, for the record
    assert (rollouts[1].truncated, rollouts[1].correct) == (False, True)


def test_the_first_attempt_that_passes_in_sample_order_is_kept():
    attempts = [
        generation(ENDED.replace("{20}", "{21}"), "stop"),
        generation(RUNAWAY, "length"),
        generation(ENDED, "stop"),
        generation(ENDED.replace("Kofi reads", "He reads"), "stop"),
    ]
    choice = choose_explanation(PROBLEM, attempts, CurationConfig().extraction_order)
    assert choice.kept == 2 and choice.verdict.correct is True
    assert [reason for reason, _ in choice.rejections] == ["explanation_wrong", "explanation_truncated"]
    assert choose_explanation(PROBLEM, attempts[2:], CurationConfig().extraction_order).kept == 0


def test_when_no_attempt_passes_the_first_ones_reason_is_kept_and_every_attempt_is_told():
    wrong, runaway = generation(ENDED.replace("{20}", "{21}"), "stop"), generation(RUNAWAY, "length")
    choice = choose_explanation(PROBLEM, [runaway, wrong, runaway], CurationConfig().extraction_order)
    assert choice.kept is None and choice.verdict is None
    assert choice.drop_reason == "explanation_truncated"
    assert choice.drop_detail.startswith("3 attempts: 0: the explanation was cut at")
    assert "1: explanation answered '21'" in choice.drop_detail
    # One attempt is dropped exactly as before attempts existed.
    single = choose_explanation(PROBLEM, [wrong], CurationConfig().extraction_order)
    assert (single.drop_reason, single.drop_detail) == explanation_rejection(
        PROBLEM, wrong, grade_response(PROBLEM.answer, wrong.text)
    )
    with pytest.raises(ValueError):
        choose_explanation(PROBLEM, [], CurationConfig().extraction_order)


def test_attempts_are_samples_of_one_request_with_the_problems_own_seed():
    config = CurationConfig(explanation_attempts=3, seed=7)
    sampling = seeded_sampling(config.explanation_sampling(), config.seed + 1, PROBLEM)
    assert sampling.n == 3 and sampling.temperature == 0.4 and sampling.logprobs == config.topk
    single = seeded_sampling(CurationConfig(seed=7).explanation_sampling(), config.seed + 1, PROBLEM)
    assert single.n == 1 and single.seed == sampling.seed  # the first attempt is the one a single attempt samples
    with pytest.raises(ValueError, match="explanation_temperature"):
        CurationConfig(explanation_attempts=2, explanation_temperature=0.0)


def test_a_right_explanation_that_speaks_of_the_attempts_is_no_pair():
    mentions = generation("Unlike the incorrect attempt, Kofi's pages add up: 10 + 10 = 20.\n\\boxed{20}", "stop")
    verdict = grade_response(PROBLEM.answer, mentions.text)
    assert verdict.correct is True
    reason, detail = explanation_rejection(PROBLEM, mentions, verdict)
    assert reason == "explanation_mentions_hints" and "'the incorrect attempt'" in detail
    # Another attempt that stands alone is kept in its place.
    choice = choose_explanation(PROBLEM, [mentions, generation(ENDED, "stop")], CurationConfig().extraction_order)
    assert choice.kept == 1 and [reason for reason, _ in choice.rejections] == ["explanation_mentions_hints"]
