"""Tests of the answer grader on real strings, on the 232 reference verdicts in tests/data/grader_cases.jsonl,
and of its bounding: a pathological answer returns in seconds, and grading never touches the caller's SIGALRM.

    .venv/bin/python -m pytest tests/shared/test_grading.py
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from shared.grading import (
    DEFAULT_EXTRACTION_ORDER,
    MAX_ANSWER_CHARS,
    GradedAnswer,
    extract_final_answer,
    grade_model_response,
    grade_records,
    grade_response,
    is_equivalent,
    normalize_answer,
)

GRADER_CASES = Path(__file__).resolve().parents[1] / "data" / "grader_cases.jsonl"
MIN_AGREEMENT = 228


# --- extraction -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so the total is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{3}{4}}}", "\\sqrt{\\frac{3}{4}}"),
        ("First \\boxed{1}, then on reflection \\boxed{2}", "2"),
        ("The roots are $\\boxed{\\{1\\pm\\sqrt{5},-2\\}}.$", "\\{1\\pm\\sqrt{5},-2\\}"),
        ("\\boxed{\n\\begin{pmatrix} 0 \\\\ 1 \\end{pmatrix}\n}.", "\\begin{pmatrix} 0 \\\\ 1 \\end{pmatrix}"),
        ("The answer is \\boxed 7.", "7"),
        ("\\fbox{5}", "5"),
        ("$\\boxed{$18$}$", "18"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 1,000", "1,000"),
        ("The answer is 42.", "42"),
        ("the answer is 5, since 2 + 3 = 5", "5"),
        ("The answer is 1, 2, and 3.", "1, 2, and 3"),
        ("Final Answer: The final answer is $(0, 1)$. I hope it is correct.", "(0, 1)"),
        ("**Final Answer**\n\n$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("She pays $1,234.50 in total.", "1,234.50"),
        ("so 3-5 = -2, and the change is -.5", "-.5"),
        ("In 2023 it cost 7 dollars; now it costs 12.", "12"),
        # Markdown emphasis around the answer
        ("The answer is **18**.", "18"),
        ("So the final answer is: **18**", "18"),
        ("**Final Answer:** __5__", "5"),
        # a `####` Markdown heading is no GSM8K answer mark
        ("#### Step 1: Add the apples\n3 + 4 = 7\n\nThe answer is 7.", "7"),
        ("#### Step 1\nTom has 3 + 4 apples.\n#### 7\n", "7"),
        ("#### **Step 1: Add**\n3 + 4 = 7", "7"),
        ("#### 1. Add the apples\n3 + 4 = 7", "7"),
        ("so we get\n#### x^2 + 1", "x^2 + 1"),
        ("#### B", "B"),
        # "the answer is" that states no answer gives way to the last one that does
        ("The answer is 7. Let me check whether the answer is right: yes.", "7"),
        ("The answer is B.", "B"),
        ("Let us test whether the answer is 12: no. So the answer is $x$.", "x"),
        # a `$` after "the answer is": math closed on its line by a `$` not escaped, else dollars read as words
        ("Final Answer: The final answer is $\\$18$. I hope it is correct.", "\\$18"),
        ("The answer is $18. Check: she paid $6 three times.", "18"),
        ("The answer is $18.\nCheck: 3 * $6 = $18.", "18"),
        ("The answer is $\n5\n$.", "5"),
        ("The answer is $$18 dollars", "18 dollars"),
        # an inline span opening with a digit and going on in prose is an amount, not math
        ("The answer is $18 and she keeps $6.", "18"),
        ("So the answer is $18, while Tom pays $6.", "18"),
        ("The answer is $18 per day and $126 per week.", "18"),
        ("The answer is $1,250.50 for the car and $3 tax.", "1,250.50"),
        ("The answer is $18 $ in all.", "18"),
        ("The answer is $10 \\text{ dollars per day}$.", "10 \\text{ dollars per day}"),
        ("The answer is $2 \\sin x$.", "2 \\sin x"),
        ("The answer is $² of the area and more$ here.", "² of the area and more"),  # no amount: a digit \\d misses
        ("The answer is $$\n\\frac{1}{2}\n$$", "\\frac{1}{2}"),
        # a level-5 heading is no GSM8K mark; a typeset minus is a minus
        ("##### Step 2: add\n3 + 4 = 7", "7"),
        ("so x = \u22123", "-3"),
    ],
)
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize("response", ["", "   ", "No numbers here at all.", "AZYUK2A", "\\boxed{}"])
def test_extract_final_answer_finds_nothing(response):
    assert extract_final_answer(response) is None


def test_extraction_order_is_configurable():
    response = "The answer is 12.\n#### 13\nso \\boxed{14} and then 15"
    assert DEFAULT_EXTRACTION_ORDER == ("boxed", "gsm8k", "answer_is", "last_number")
    assert extract_final_answer(response) == "14"
    assert extract_final_answer(response, ["gsm8k", "boxed"]) == "13"
    assert extract_final_answer(response, ["answer_is"]) == "12"
    assert extract_final_answer(response, ["last_number"]) == "15"
    assert extract_final_answer("no box here, 3 apples", ["boxed"]) is None
    with pytest.raises(ValueError, match="unknown extraction strategies"):
        extract_final_answer(response, ["boxed", "first_number"])


def test_unclosed_last_box_is_not_an_answer():
    # A truncated output: the last box never closes, so "boxed" finds nothing rather than an earlier box.
    assert extract_final_answer("\\boxed{3} is wrong, it is \\boxed{\\frac{1}{2", ["boxed"]) is None


# --- normalization and equivalence ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("\u22123", "-3"),
        ("1 000", "1000"),
        ("1\\,000\\,000", "1000000"),
        ("-1 000.5", "-1000.5"),
        ("18 dollars", "18"),
        ("64 square feet.", "64"),
        ("10 km/h", "10"),
        ("90°", "90^\\circ"),
        ("30^\\circ C", "30^\\circ"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        # left alone: not a lone number with units
        ("(1, 2)", "(1, 2)"),
        ("1 2 3", "1 2 3"),
        ("12 and 13", "12 and 13"),
        ("3 pi", "3 pi"),
        ("2 x", "2 x"),
        ("5 million", "5 million"),
        ("2 squared", "2 squared"),
        ("24 units squared", "24"),
        ("3rd place", "3"),
        ("12in", "12"),
        # written against the number: units go, other letters (a product of variables) stay
        ("5cm", "5"),
        ("12kg", "12"),
        ("2xy", "2xy"),
        ("28 percent", "28 percent"),
        ("$1$ and $2$", "$1$ and $2$"),
    ],
)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize(
    ("gold", "pred", "expected"),
    [
        ("18", "18.00", True),
        ("18", "$18", True),
        ("18", "\\$18.00", True),
        ("18", "18 dollars", True),
        ("18", "18.", True),
        ("18", "x = 18", True),
        ("18", "19", False),
        ("2", "2xy", False),
        ("2xy", "2ab", False),
        ("1000", "1,000", True),
        ("1000", "1 000", True),
        ("7425000", "7,425,000", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac{1}{2}", "1/2", True),
        ("\\frac{1}{3}", "0.33", False),
        ("90", "90^\\circ", True),
        ("90", "90°", True),
        ("15", "15\\text{ cm}", True),
        # percentages: math-verify accepts both readings, as the number and as the fraction
        ("50\\%", "0.5", True),
        ("0.5", "50%", True),
        ("50", "50\\%", True),
        ("0.2", "10%", False),
        # tuples, intervals, sets
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
        ("(1, 2)", "(1,2)", True),
        ("(1, 2)", "(2, 1)", False),
        ("[-2, 7]", "[-2,7]", True),
        ("[0,1)", "(0, 1)", False),
        ("(-\\infty, -3] \\cup [2, \\infty)", "(-\\infty,-3]\\cup[2,\\infty)", True),
        ("\\{1, 2\\}", "\\{2, 1\\}", True),
        ("1,2", "2,1", True),
        # expressions
        ("x^2+2x+1", "(x+1)^2", True),
        ("2 \\sin b \\cos a", "2\\cos a \\sin b", True),
        ("x^2+2x+1", "x^3+2x+1", False),
        ("\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    ],
)
def test_is_equivalent(gold, pred, expected):
    assert is_equivalent(gold, pred) is expected


@pytest.mark.parametrize(
    ("gold", "pred"),
    [("18", ""), ("", "18"), ("18", "   "), ("18", "}{"), ("18", "\\text{}"), ("18", None), (18, "18")],
)
def test_is_equivalent_is_none_when_ungradeable(gold, pred):
    assert is_equivalent(gold, pred) is None


def test_answers_over_the_length_cap_are_ungradeable_at_once():
    long_sum = "+".join(["1"] * (MAX_ANSWER_CHARS // 2 + 1))
    start = time.monotonic()
    assert is_equivalent("501", long_sum) is None
    assert time.monotonic() - start < 0.5


# --- grade_response and grade_records ---------------------------------------------------------------------------------


def test_grade_response():
    assert grade_response("18", "She pays 6 * 3 = $\\boxed{\\$18.00}$.") == GradedAnswer("\\$18.00", True)
    assert grade_response("18", "So the answer is 17.") == GradedAnswer("17", False)
    assert grade_response("18", "I do not know.") == GradedAnswer(None, None)
    assert grade_response("1000", "#### 1,000", order=["gsm8k"]) == GradedAnswer("1,000", True)


def test_a_response_cut_off_gets_no_verdict_but_keeps_what_it_extracted():
    unfinished = "She pays 6 * 3 = 18, then 18 + 2 = 20, then 20 - 2 = 18"
    assert grade_model_response("18", unfinished, cut_off=False) == GradedAnswer("18", True)
    assert grade_model_response("18", unfinished, cut_off=True) == GradedAnswer("18", None)
    assert grade_model_response("18", "I do not", cut_off=True) == GradedAnswer(None, None)


@pytest.mark.parametrize(
    "response",
    [
        "",
        "\\boxed{",
        "\\boxed{}}}",
        "}}}{{{",
        "$$",
        "####",
        "\x00\\boxed{\x00}",
        "\\boxed{\ud800}",
        "\\fbox",
        "$" * 5000,
        "\\boxed{" * 300 + "1" + "}" * 300,
        "The answer is",
        "9" * 5000,
    ],
)
def test_grade_response_never_raises(response):
    graded = grade_response("1", response)
    assert isinstance(graded, GradedAnswer)
    assert graded.correct in (True, False, None)


def test_grade_records():
    records = [
        {"id": 1, "gold": "18", "response": "so \\boxed{18.00}"},
        {"id": 2, "gold": "\\frac{1}{2}", "pred": "0.5"},
        {"id": 3, "gold": "18", "pred": "\\boxed{19}"},
        {"id": 4, "gold": 204, "response": "nothing to see"},
        {"id": 5, "gold": "18", "response": "18 + 0 = 18, and 18", "finish_reason": "length"},  # cut off
    ]
    graded = list(grade_records(records))
    assert graded[0] == {**records[0], "extracted": "18.00", "correct": True}
    assert graded[1] == {**records[1], "extracted": "0.5", "correct": True}
    assert graded[2]["extracted"] == "\\boxed{19}" and graded[2]["correct"] is False  # `pred` is used as it is
    assert graded[3] == {**records[3], "extracted": None, "correct": None}
    assert graded[4] == {**records[4], "extracted": "18", "correct": None}


@pytest.mark.parametrize(
    ("record", "field"),
    [({"response": "\\boxed{1}"}, "'gold'"), ({"gold": "1"}, "'response'"), ({"gold": None, "pred": "1"}, "'gold'")],
)
def test_grade_records_names_the_missing_field(record, field):
    with pytest.raises(ValueError, match=field):
        list(grade_records([record]))


# --- bounding ---------------------------------------------------------------------------------------------------------

# sympy evaluates this tower as one big-integer power: it would run for hours, holding the GIL.
TOWER = "9^{9^{9^{9}}}"


def test_pathological_answer_returns_within_seconds():
    assert is_equivalent("2", "2.0") is True  # the helper process is up, so its start-up is not timed below
    start = time.monotonic()
    assert is_equivalent("1", TOWER, timeout_s=1.0) is None
    assert time.monotonic() - start < 4.0
    # the overrun helper was replaced, and grading goes on
    assert is_equivalent("1", "1.0") is True


def test_math_verify_own_timeout_would_cancel_the_callers_alarm():
    """The trap the grader avoids: math-verify's default timeout ends with signal.alarm(0)."""
    from math_verify import parse

    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        signal.alarm(30)
        parse("$1$")  # default parsing_timeout=5
        remaining = signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert remaining == 0


def test_grading_leaves_the_callers_alarm_pending():
    """Stands in for RQ's job timeout: a SIGALRM armed by the caller survives grading, overruns included."""
    fired = []

    def handler(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.alarm(30)
        assert is_equivalent("\\frac{1}{2}", "0.5") is True
        assert grade_response("18", "so \\boxed{\\$18.00}").correct is True
        assert is_equivalent("1", TOWER, timeout_s=0.5) is None  # a killed and restarted helper
        assert is_equivalent("(1, 2)", "(2, 1)") is False
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        handler_after = signal.getsignal(signal.SIGALRM)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert 0 < remaining <= 30
    assert handler_after is handler
    assert fired == []


# --- the reference verdicts -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grader_cases() -> list[dict]:
    return [json.loads(line) for line in GRADER_CASES.read_text().splitlines() if line.strip()]


def test_grader_agrees_with_reference_verdicts(grader_cases):
    disagreements = []
    for case in grader_cases:
        verdict = is_equivalent(case["gold"], case["pred"])
        if verdict is not case["equal"]:
            disagreements.append(
                f"{case['id']} ({case['kind']}): gold={case['gold']!r} pred={case['pred']!r} "
                f"expected {case['equal']}, got {verdict}"
            )
    agreed = len(grader_cases) - len(disagreements)
    assert agreed >= MIN_AGREEMENT, f"{agreed}/{len(grader_cases)} agree; disagreements:\n" + "\n".join(disagreements)


def test_extraction_matches_reference_last_box(grader_cases):
    with_response = [case for case in grader_cases if "response" in case]
    assert with_response
    mismatches = [
        f"{case['id']}: expected {case['pred_extracted'].strip()!r}, got {extracted!r}"
        for case in with_response
        if (extracted := extract_final_answer(case["response"])) != case["pred_extracted"].strip()
    ]
    assert not mismatches, "\n".join(mismatches)


def test_the_helper_imports_this_project_from_any_working_directory(tmp_path):
    """A caller started from a directory that has a `shared` package of its own (and this project on PYTHONPATH): the
    grading helper still imports this one (a `python -c` child would put that directory first on its path)."""
    import os
    import subprocess
    import sys

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text("raise ImportError('not this project')\n")
    caller = tmp_path / "caller" / "grade.py"
    caller.parent.mkdir()
    caller.write_text("from shared.grading import is_equivalent\nprint(is_equivalent('1/2', '0.5'))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, str(caller)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]


def test_the_helper_dies_with_a_caller_killed_outright_mid_comparison():
    """A caller killed by SIGKILL (no cleanup of its own runs) while its helper works on a pathological answer: the
    helper goes with it, instead of computing on alone."""
    import contextlib
    import subprocess
    import sys

    import psutil

    code = (
        "from shared.grading import is_equivalent\n"
        "print(is_equivalent('1/2', '0.5'), flush=True)\n"
        f"is_equivalent('1', {TOWER!r}, timeout_s=600)\n"
    )
    caller = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                              stdout=subprocess.PIPE, text=True)
    helpers = []
    try:
        assert caller.stdout.readline().strip() == "True"
        helpers = psutil.Process(caller.pid).children()
        (helper,) = helpers
        time.sleep(0.5)  # the helper is at the tower now
        assert helper.cpu_percent(interval=0.5) > 50, "the helper is not computing"
        caller.kill()
        caller.wait(timeout=30)
        helper.wait(timeout=10)  # psutil.TimeoutExpired while it computes on
    finally:
        for process in [*helpers, caller]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.kill()
        caller.wait()
