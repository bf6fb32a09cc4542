"""`context_overflows` with the default model's real tokenizer: a problem is named when its question's prompt plus an
answer, or its hinted prompt at its largest plus the explanation, passes the context; the rest pass."""

import pytest

from shared.prompts import context_overflows
from shared.schemas import Problem


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def problem(question: str, line: int) -> Problem:
    return Problem(id=f"p{line}", question=question, answer="1", source=f"f.jsonl:{line}")


def test_the_question_and_the_hinted_prompt_are_each_held_to_the_context(tokenizer):
    short, medium = problem("What is 2 + 2?", 1), problem("Count the apples. " * 60, 2)
    long = problem("Apples? " * 400, 3)
    limits = dict(context=1024, answer_tokens=128, worked_example=True)
    assert context_overflows(tokenizer, [short, medium], **limits) == []  # answering fits
    (too_long,) = context_overflows(tokenizer, [short, medium, long], **limits)
    assert too_long.startswith("f.jsonl:3: the question's prompt is ") and "for the answer" in too_long
    # With an explanation of 400 to write, the medium question's hinted prompt (two answers of up to 128) does not fit.
    hinted = context_overflows(tokenizer, [short, medium], explanation_tokens=400, **limits)
    assert len(hinted) == 1 and hinted[0].startswith("f.jsonl:2: the hinted prompt can reach ")
    assert context_overflows(tokenizer, [short, medium], explanation_tokens=64, **limits) == []
