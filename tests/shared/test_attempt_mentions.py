"""`attempt_mention` on the ways a hinted explanation speaks of the attempts it was shown, against standalone solutions
that warn about mistakes in their own voice ("a common wrong attempt"), questions with tries or responses of their own,
and the 8,792 reference solutions of GSM8K (none of which speaks of attempts)."""

import json

import pytest

from shared.datasets import DATA_DIR
from shared.prompts import attempt_mention

QUESTION = "Kofi reads 10 pages and then 10 more. How many pages has he read?"


@pytest.mark.parametrize(
    "explanation, phrase",
    [
        ("Unlike the incorrect attempt, we add the pages: 10 + 10 = 20. \\boxed{20}", "the incorrect attempt"),
        ("As the Correct Attempt shows, 10 + 10 = 20.", "the Correct Attempt"),
        ("The second attempt made a mistake by multiplying.", "The second attempt"),
        ("Both attempts start with 10 pages.", "Both attempts"),
        ("Of the attempts above, only one adds.", "the attempts"),
        ("In the previous\nresponse the pages were multiplied.", "the previous response"),
        ("I was shown two solutions; here is my own.", "was shown two solutions"),
        # A small model's explanation, as curated by the demo before this check existed.
        ("The correct solution is 12.\n\nThe incorrect solution is 12.", "The incorrect solution"),
    ],
)
def test_an_explanation_that_speaks_of_the_attempts_is_caught(explanation, phrase):
    assert attempt_mention(explanation, QUESTION) == phrase


@pytest.mark.parametrize(
    "explanation",
    [
        "Kofi reads 10 pages, then 10 more: 10 + 10 = 20.\nThe answer is \\boxed{20}.",
        # Warning about a likely mistake in its own voice is what the prompt asks for.
        "A common mistake is to multiply 10 by 10 and get 100; the pages add up instead. The correct answer is 20.",
        "Be careful: the incorrect answer 100 comes from multiplying. The right approach is to add. \\boxed{20}",
        "A natural first attempt is to multiply; that overcounts. A common wrong attempt adds only once.",
        "An incorrect attempt would be 10 * 10 = 100. Let's make a second attempt using addition.",
        "Other attempts at this problem often forget the second 10. We attempt 2 ways and both give 20.",
        "The equation has two solutions, x = 2 and x = 3, and both solutions are positive.",
        "The first solution is x = 2 and the other solution is x = 3. The correct solution is the positive one.",
        "Squaring added a root: we discard the wrong solution x = -1 and the incorrect solution $x=-2$.",
        "Using the previous solution for part (a), and from the above solution, the area is 12.",
        "The roots were given as solutions of the quadratic, so their sum is 5.",
        "Let us attempt the sum step by step: 10 + 10 = 20.",
    ],
)
def test_a_standalone_solution_is_not_caught(explanation):
    assert attempt_mention(explanation, QUESTION) is None


@pytest.mark.parametrize(
    "question, explanation",
    [
        ("Ana made 8 free-throw attempts and scored on 6. How many did she miss?",
         "Of the attempts, 8 - 6 = 2 missed; both attempts that missed hit the rim. \\boxed{2}"),
        ("Ana scores with probability 1/2 per shot. What is the chance her first basket comes on her third try?",
         "The first two attempts must be misses and the third attempt a hit: (1/2)^3 = 1/8. \\boxed{1/8}"),
        ("Jake tries to guess a 2-digit code. How many codes are there?",
         "The first attempt can be any of 100 codes. \\boxed{100}"),
        ("Of 40 people surveyed, 25 responded yes. How many responded no?",
         "The two responses are yes and no: 40 - 25 = 15. \\boxed{15}"),
        ("A quiz gives 3 points per correct response. Lia gave 7. What is her score?",
         "The correct responses score 7 * 3 = 21. \\boxed{21}"),
        ("Solve for x: sqrt(x + 2) = x.", "Squaring gives x = 2 or x = -1; we discard the incorrect solution."),
    ],
)
def test_a_question_with_tries_or_responses_of_its_own_lets_its_explanation_speak_of_them(question, explanation):
    assert attempt_mention(explanation, question) is None


def test_only_the_words_a_question_has_are_let_through():
    quiz = "A quiz gives 3 points per correct response. Lia gave 7 correct responses. What is her score?"
    assert attempt_mention("Unlike the second attempt, 7 * 3 = 21.", quiz) == "the second attempt"


def test_no_reference_solution_of_gsm8k_is_caught():
    caught = []
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        for number, line in enumerate((DATA_DIR / name).read_text().splitlines(), 1):
            row = json.loads(line)
            if (phrase := attempt_mention(row["answer"], row["question"])) is not None:
                caught.append(f"{name}:{number}: {phrase!r}")
    assert caught == []
