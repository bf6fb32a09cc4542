"""What makes a curated answer count, on real strings: a rollout or an explanation cut at the token limit never does,
however its last number reads; an explanation that ended with the gold answer does."""

from services.curator.curation import explanation_rejection, grade_rollouts
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
