"""`attempt_mention` on the ways a hinted explanation speaks of the attempts it was shown, against standalone solutions
that warn about mistakes in their own words, questions that use such words themselves, and the 8,792 reference
solutions of GSM8K (none of which speaks of attempts)."""

import json

import pytest

from shared.datasets import DATA_DIR
from shared.prompts import attempt_mention

QUESTION = "Kofi reads 10 pages and then 10 more. How many pages has he read?"


@pytest.mark.parametrize(
    "explanation, phrase",
    [
        ("Unlike the incorrect attempt, we add the pages: 10 + 10 = 20. \\boxed{20}", "incorrect attempt"),
        ("As the Correct Attempt shows, 10 + 10 = 20.", "Correct Attempt"),
        ("The second attempt made a mistake by multiplying.", "second attempt"),
        ("Both attempts start with 10 pages.", "Both attempts"),
        ("Of the attempts above, only one adds.", "the attempts"),
        ("In the previous\nresponse the pages were multiplied.", "previous response"),
        ("Response 2 multiplied 10 by 10, which is wrong.", "Response 2"),
        ("I was shown two solutions; here is my own.", "was shown two solutions"),
    ],
)
def test_an_explanation_that_speaks_of_the_attempts_is_caught(explanation, phrase):
    assert attempt_mention(explanation, QUESTION) == phrase


@pytest.mark.parametrize(
    "explanation",
    [
        "Kofi reads 10 pages, then 10 more: 10 + 10 = 20.\nThe answer is \\boxed{20}.",
        # Warning about a likely mistake in its own words is what the prompt asks for.
        "A common mistake is to multiply 10 by 10 and get 100; the pages add up instead. The correct answer is 20.",
        "Be careful: the incorrect answer 100 comes from multiplying. The right approach is to add. \\boxed{20}",
        "The equation has two solutions, x = 2 and x = 3, and both solutions are positive.",
        "Let us attempt the sum step by step: 10 + 10 = 20.",
    ],
)
def test_a_standalone_solution_is_not_caught(explanation):
    assert attempt_mention(explanation, QUESTION) is None


def test_a_question_that_uses_the_word_itself_lets_its_explanation_use_it():
    question = "Ana made 8 free-throw attempts and scored on 6. Her first attempt missed. How many did she miss?"
    explanation = "Her first attempt missed, and of the attempts 8 - 6 = 2 missed. Both attempts... \\boxed{2}"
    assert attempt_mention(explanation, question) is None
    quiz = "A quiz scores 5 points for each correct response. Lia gave 7 correct responses. What is her score?"
    assert attempt_mention("Her 7 correct\nresponses score 7 * 5 = 35. \\boxed{35}", quiz) is None
    # Only the word it uses: the quiz's explanation may still not speak of attempts.
    assert attempt_mention("Unlike the second attempt, 7 * 5 = 35.", quiz) == "second attempt"


def test_no_reference_solution_of_gsm8k_is_caught():
    caught = []
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        for number, line in enumerate((DATA_DIR / name).read_text().splitlines(), 1):
            row = json.loads(line)
            if (phrase := attempt_mention(row["answer"], row["question"])) is not None:
                caught.append(f"{name}:{number}: {phrase!r}")
    assert caught == []
