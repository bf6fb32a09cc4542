"""Synthetic arithmetic problems: deterministic per seed, different across seeds, answers that check out."""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter

import pytest

from shared.arithmetic import generate_arithmetic, make_arithmetic_problems
from shared.schemas import PROBLEM_ID_PATTERN

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def evaluate(expression: str) -> int:
    """Integer arithmetic with + - * // and parentheses; `//` must divide exactly."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.FloorDiv):
                assert left % right == 0, f"{expression} does not divide exactly"
            return _OPERATORS[type(node.op)](left, right)
        raise AssertionError(f"unexpected node in {expression!r}: {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval").body)


def numbers_in(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def test_same_seed_gives_the_same_problems() -> None:
    assert make_arithmetic_problems(50, seed=7) == make_arithmetic_problems(50, seed=7)
    assert make_arithmetic_problems(20, seed=7) == make_arithmetic_problems(50, seed=7)[:20]


def test_different_seeds_give_mostly_different_problems() -> None:
    first = {p.question for p in make_arithmetic_problems(200, seed=0)}
    second = {p.question for p in make_arithmetic_problems(200, seed=1)}
    assert len(first & second) < 10


def test_ids_sources_and_no_duplicates() -> None:
    problems = make_arithmetic_problems(300, seed=3)
    assert [p.id for p in problems] == [f"arith-s3-{i}" for i in range(300)]
    assert all(re.match(PROBLEM_ID_PATTERN, p.id) for p in problems)
    assert all(p.source == "arithmetic:seed=3" for p in problems)
    assert len({p.question for p in problems}) == 300
    assert make_arithmetic_problems(0, seed=3) == []
    with pytest.raises(ValueError):
        make_arithmetic_problems(-1, seed=3)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_answers_match_the_expression_and_the_question(seed: int) -> None:
    for item in generate_arithmetic(400, seed):
        answer = item.problem.answer
        assert re.fullmatch(r"\d+", answer), answer  # a non-negative integer, written plainly
        assert evaluate(item.expression) == int(answer), item
        assert set(numbers_in(item.expression)) == set(numbers_in(item.problem.question)), item


def test_mix_of_steps_templates_and_small_numbers() -> None:
    items = generate_arithmetic(1000, seed=5)
    steps = Counter(item.steps for item in items)
    assert 0.5 < steps[1] / len(items) < 0.7
    assert len({item.template for item in items}) >= 8
    assert all(max(numbers_in(item.expression)) <= 20 for item in items)


def test_known_problem_reads_naturally() -> None:
    item = generate_arithmetic(1, seed=3)[0]
    assert item.problem.question == (
        "Sam shares 20 candies equally among 5 friends. How many candies does each friend get?"
    )
    assert (item.expression, item.problem.answer) == ("20 // 5", "4")
