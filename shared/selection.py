"""Choosing the two hints for the teacher (step 3 of SSB): one correct rollout and the most common wrong answer.

Wrong answers are counted by equivalence class (`18`, `18.00` and `$18` are one answer), using the project's grader.
Ties between classes, and the choice among equal candidates, are broken by a draw seeded by (seed, problem id), so a
run is reproducible and independent of the order problems are processed in.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.grading import is_equivalent
from shared.schemas import Rollout


@dataclass(frozen=True)
class HintChoice:
    """Indices into the rollouts of the correct hint and the incorrect hint."""

    correct_index: int
    incorrect_index: int


def has_mix(rollouts: Sequence[Rollout]) -> bool:
    """A problem is usable when at least one rollout is right and at least one gave a wrong, non-empty answer."""
    return any(r.correct is True for r in rollouts) and any(r.correct is False and r.extracted for r in rollouts)


def seeded_rng(seed: int, key: str) -> random.Random:
    """A random generator that depends only on the run seed and a key (e.g. the problem id)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def group_equivalent(answers: Sequence[str], equivalent: Callable[[str, str], bool | None]) -> list[list[int]]:
    """Group answer indices into equivalence classes (first member is the class representative), in order of first use."""
    classes: list[list[int]] = []
    for i, answer in enumerate(answers):
        for members in classes:
            if equivalent(answers[members[0]], answer):
                members.append(i)
                break
        else:
            classes.append([i])
    return classes


def select_hints(
    rollouts: Sequence[Rollout],
    *,
    seed: int,
    key: str,
    equivalent: Callable[[str, str], bool | None] = is_equivalent,
) -> HintChoice | None:
    """Pick one correct rollout and one rollout carrying the most common wrong answer; None without a mix."""
    if not has_mix(rollouts):
        return None
    rng = seeded_rng(seed, key)
    correct = [i for i, r in enumerate(rollouts) if r.correct is True]
    wrong = [i for i, r in enumerate(rollouts) if r.correct is False and r.extracted]
    classes = group_equivalent([rollouts[i].extracted or "" for i in wrong], equivalent)
    largest = max(len(members) for members in classes)
    chosen_class = rng.choice([members for members in classes if len(members) == largest])
    return HintChoice(correct_index=rng.choice(correct), incorrect_index=wrong[rng.choice(chosen_class)])
