"""Synthetic arithmetic word problems: an easy, unlimited problem set for smoke runs on small models.

About 60% are one-step and 40% two-step problems (add, subtract, a small product or quotient), every number in the
question at most 20, drawn from fifteen templates with varied names, objects and verbs, for example
"Tom has 13 apples and buys 7 more. How many apples does Tom have now?". A 135M-parameter model gets some right and
some wrong, which is what SSB needs: it keeps only problems with both correct and wrong rollouts.

The same `(n, seed)` always gives the same problems; another seed gives a mostly different set, so a held-out
evaluation set is just another seed. Every problem carries the expression it was built from, so answers can be
checked independently.

    from shared.arithmetic import make_arithmetic_problems
    train = make_arithmetic_problems(256, seed=0)
    held_out = make_arithmetic_problems(100, seed=1)

Pure: standard library and `shared.schemas` only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from shared.schemas import Problem

ONE_STEP_SHARE = 0.6

# Redraws per item before accepting a question already in the set; keeps sets duplicate-free in practice.
_MAX_REDRAWS = 50

_NAMES = [
    ("Tom", "he"), ("Anna", "she"), ("Liam", "he"), ("Maya", "she"), ("Sam", "he"), ("Lucy", "she"),
    ("Omar", "he"), ("Priya", "she"), ("Ben", "he"), ("Sofia", "she"), ("Leo", "he"), ("Emma", "she"),
    ("Kofi", "he"), ("Mei", "she"), ("Carlos", "he"), ("Hana", "she"), ("Jack", "he"), ("Zoe", "she"),
]
_THINGS = [
    "apples", "pencils", "marbles", "stickers", "books", "crayons", "stamps", "shells",
    "cards", "balloons", "toy cars", "buttons", "oranges", "coins", "beads", "rocks",
]
_FOODS = ["cookies", "grapes", "strawberries", "crackers", "cherries", "candies", "nuts", "muffins"]
_CONTAINERS = ["box", "basket", "jar", "bag", "drawer", "bucket"]
_GET_VERBS = ["buys", "finds", "gets", "picks up", "is given", "wins"]
_LOSE_VERBS = ["gives away", "loses", "sells"]
_GROUPS = [("bags", "bag"), ("boxes", "box"), ("packs", "pack"), ("rows", "row"), ("jars", "jar")]


@dataclass(frozen=True)
class ArithmeticProblem:
    """A generated problem with the arithmetic it encodes: `expression` evaluates (with `//` as exact division)
    to `int(problem.answer)`, and every number in it appears in the question."""

    problem: Problem
    expression: str
    steps: int
    template: str


@dataclass(frozen=True)
class _Draft:
    question: str
    expression: str
    answer: int


def make_arithmetic_problems(n: int, seed: int) -> list[Problem]:
    """`n` arithmetic word problems for `seed`, with ids `arith-s<seed>-<index>` and non-negative integer answers."""
    return [item.problem for item in generate_arithmetic(n, seed)]


def generate_arithmetic(n: int, seed: int) -> list[ArithmeticProblem]:
    """Like `make_arithmetic_problems`, keeping each problem's expression and template (for tests and inspection)."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    items: list[ArithmeticProblem] = []
    for index in range(n):
        for _ in range(_MAX_REDRAWS):
            steps = 1 if rng.random() < ONE_STEP_SHARE else 2
            name, template = rng.choice(_ONE_STEP if steps == 1 else _TWO_STEP)
            draft = template(rng)
            if draft.question not in seen:
                break
        seen.add(draft.question)
        problem = Problem(
            id=f"arith-s{seed}-{index}",
            question=draft.question,
            answer=str(draft.answer),
            source=f"arithmetic:seed={seed}",
        )
        items.append(ArithmeticProblem(problem=problem, expression=draft.expression, steps=steps, template=name))
    return items


def _two_people(rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    first, second = rng.sample(_NAMES, 2)
    return first, second


# One-step templates: numbers up to 20.


def _add_get(rng: random.Random) -> _Draft:
    (name, _), thing, verb = rng.choice(_NAMES), rng.choice(_THINGS), rng.choice(_GET_VERBS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return _Draft(
        f"{name} has {a} {thing} and {verb} {b} more. How many {thing} does {name} have now?", f"{a} + {b}", a + b
    )


def _add_together(rng: random.Random) -> _Draft:
    (name, _), (other, _) = _two_people(rng)
    thing = rng.choice(_THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return _Draft(
        f"{name} has {a} {thing} and {other} has {b} {thing}. How many {thing} do they have together?",
        f"{a} + {b}",
        a + b,
    )


def _add_container(rng: random.Random) -> _Draft:
    (name, _), thing, box = rng.choice(_NAMES), rng.choice(_THINGS + _FOODS), rng.choice(_CONTAINERS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return _Draft(
        f"There are {a} {thing} in a {box}. {name} puts {b} more {thing} into the {box}. "
        f"How many {thing} are in the {box} now?",
        f"{a} + {b}",
        a + b,
    )


def _sub_lose(rng: random.Random) -> _Draft:
    (name, pronoun), thing = rng.choice(_NAMES), rng.choice(_THINGS)
    verb = rng.choice(_LOSE_VERBS)
    a = rng.randint(3, 20)
    b = rng.randint(2, a - 1)
    return _Draft(
        f"{name} has {a} {thing}. {pronoun.capitalize()} {verb} {b} of them. How many {thing} does {name} have left?",
        f"{a} - {b}",
        a - b,
    )


def _sub_eat(rng: random.Random) -> _Draft:
    (name, _), food = rng.choice(_NAMES), rng.choice(_FOODS)
    a = rng.randint(3, 20)
    b = rng.randint(2, a - 1)
    return _Draft(
        f"{name} had {a} {food} and ate {b} of them. How many {food} are left?", f"{a} - {b}", a - b
    )


def _sub_compare(rng: random.Random) -> _Draft:
    (name, _), (other, _) = _two_people(rng)
    thing = rng.choice(_THINGS)
    a = rng.randint(4, 20)
    b = rng.randint(2, a - 1)
    return _Draft(
        f"{name} has {a} {thing}. {other} has {b} {thing}. How many more {thing} does {name} have than {other}?",
        f"{a} - {b}",
        a - b,
    )


def _mul_groups(rng: random.Random) -> _Draft:
    (name, _), thing = rng.choice(_NAMES), rng.choice(_THINGS + _FOODS)
    groups, group = rng.choice(_GROUPS)
    a, b = rng.randint(2, 5), rng.randint(2, 10)
    return _Draft(
        f"{name} has {a} {groups} with {b} {thing} in each {group}. How many {thing} does {name} have in all?",
        f"{a} * {b}",
        a * b,
    )


def _mul_days(rng: random.Random) -> _Draft:
    (name, _) = rng.choice(_NAMES)
    unit, verb = rng.choice([("pages", "reads"), ("laps", "swims"), ("words", "learns"), ("push-ups", "does")])
    a, b = rng.randint(2, 10), rng.randint(2, 7)
    return _Draft(
        f"{name} {verb} {a} {unit} every day. How many {unit} does {name} {_base_verb(verb)} in {b} days?",
        f"{a} * {b}",
        a * b,
    )


def _div_share(rng: random.Random) -> _Draft:
    (name, _), food = rng.choice(_NAMES), rng.choice(_FOODS)
    friends, each = rng.randint(2, 5), rng.randint(2, 4)
    total = friends * each
    return _Draft(
        f"{name} shares {total} {food} equally among {friends} friends. How many {food} does each friend get?",
        f"{total} // {friends}",
        each,
    )


# Two-step templates: numbers up to 20, every intermediate result non-negative.


def _add_then_sub(rng: random.Random) -> _Draft:
    (name, pronoun), (other, _) = _two_people(rng)
    thing, verb = rng.choice(_THINGS), rng.choice(["buys", "finds", "gets"])
    a, b = rng.randint(2, 15), rng.randint(2, 10)
    c = rng.randint(2, min(20, a + b - 1))
    return _Draft(
        f"{name} has {a} {thing}. {pronoun.capitalize()} {verb} {b} more and then gives {c} to {other}. "
        f"How many {thing} does {name} have now?",
        f"{a} + {b} - {c}",
        a + b - c,
    )


def _add_add(rng: random.Random) -> _Draft:
    (name, pronoun), (other, _), (third, _) = rng.sample(_NAMES, 3)
    thing = rng.choice(_THINGS)
    obj = "him" if pronoun == "he" else "her"
    a, b, c = rng.randint(2, 12), rng.randint(2, 10), rng.randint(2, 10)
    return _Draft(
        f"{name} has {a} {thing}. {other} gives {obj} {b} more, and {third} gives {obj} {c} more. "
        f"How many {thing} does {name} have now?",
        f"{a} + {b} + {c}",
        a + b + c,
    )


def _sub_sub(rng: random.Random) -> _Draft:
    (name, _), (other, _) = _two_people(rng)
    thing, box = rng.choice(_THINGS + _FOODS), rng.choice(_CONTAINERS)
    a = rng.randint(8, 20)
    b = rng.randint(2, a // 2)
    c = rng.randint(1, a - b - 1)
    return _Draft(
        f"There are {a} {thing} in a {box}. {name} takes out {b} and {other} takes out {c}. "
        f"How many {thing} are left in the {box}?",
        f"{a} - {b} - {c}",
        a - b - c,
    )


def _mul_then_sub(rng: random.Random) -> _Draft:
    (name, pronoun), thing = rng.choice(_NAMES), rng.choice(_THINGS + _FOODS)
    groups, group = rng.choice(_GROUPS)
    a, b = rng.randint(2, 4), rng.randint(2, 6)
    c = rng.randint(2, min(20, a * b - 1))
    verb = rng.choice(_LOSE_VERBS)
    return _Draft(
        f"{name} has {a} {groups} with {b} {thing} in each {group}. {pronoun.capitalize()} {verb} {c} {thing}. "
        f"How many {thing} does {name} have left?",
        f"{a} * {b} - {c}",
        a * b - c,
    )


def _more_than_total(rng: random.Random) -> _Draft:
    (name, _), (other, _) = _two_people(rng)
    thing = rng.choice(_THINGS)
    a, b = rng.randint(2, 12), rng.randint(2, 8)
    return _Draft(
        f"{name} has {a} {thing}. {other} has {b} more {thing} than {name}. "
        f"How many {thing} do {name} and {other} have together?",
        f"{a} + ({a} + {b})",
        a + (a + b),
    )


def _money(rng: random.Random) -> _Draft:
    (name, pronoun) = rng.choice(_NAMES)
    item = rng.choice(["a book", "a toy", "a game", "lunch", "a kite", "a hat"])
    first, second = rng.sample(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"], 2)
    a, b = rng.randint(2, 15), rng.randint(2, 15)
    c = rng.randint(2, min(20, a + b - 1))
    return _Draft(
        f"{name} earns {a} dollars on {first} and {b} dollars on {second}. {pronoun.capitalize()} spends {c} dollars "
        f"on {item}. How many dollars does {name} have left?",
        f"{a} + {b} - {c}",
        a + b - c,
    )


def _base_verb(verb: str) -> str:
    return {"does": "do"}.get(verb, verb[:-1] if verb.endswith("s") else verb)


_Template = Callable[[random.Random], _Draft]

_ONE_STEP: list[tuple[str, _Template]] = [
    ("add_get", _add_get),
    ("add_together", _add_together),
    ("add_container", _add_container),
    ("sub_lose", _sub_lose),
    ("sub_eat", _sub_eat),
    ("sub_compare", _sub_compare),
    ("mul_groups", _mul_groups),
    ("mul_days", _mul_days),
    ("div_share", _div_share),
]
_TWO_STEP: list[tuple[str, _Template]] = [
    ("add_then_sub", _add_then_sub),
    ("add_add", _add_add),
    ("sub_sub", _sub_sub),
    ("mul_then_sub", _mul_then_sub),
    ("more_than_total", _more_than_total),
    ("money", _money),
]
