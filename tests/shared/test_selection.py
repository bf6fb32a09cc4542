"""Hint selection: the most common wrong answer by equivalence class, seeded tie-breaks."""

from shared.schemas import Rollout
from shared.selection import group_equivalent, has_mix, select_hints


def rollout(extracted, correct):
    return Rollout(text=f"... {extracted}", num_tokens=3, extracted=extracted, correct=correct)


def test_no_mix_gives_none():
    assert select_hints([rollout("7", True), rollout("7", True)], seed=0, key="p") is None
    assert select_hints([rollout("8", False), rollout("9", False)], seed=0, key="p") is None
    assert select_hints([rollout("7", True), rollout(None, None)], seed=0, key="p") is None
    assert not has_mix([rollout("7", True), rollout(None, False)])


def test_most_common_wrong_answer_counts_equivalent_forms_together():
    # "18", "18.00" and "$18" are one wrong answer (three votes) against "20" twice.
    rollouts = [
        rollout("7", True),
        rollout("20", False),
        rollout("18", False),
        rollout("20", False),
        rollout("18.00", False),
        rollout("\\$18", False),
    ]
    for seed in range(10):
        choice = select_hints(rollouts, seed=seed, key="p")
        assert choice.correct_index == 0
        assert choice.incorrect_index in (2, 4, 5)


def test_ties_are_broken_by_a_seeded_draw():
    rollouts = [rollout("7", True), rollout("1", False), rollout("2", False), rollout("3", False)]
    picks = {select_hints(rollouts, seed=seed, key="p").incorrect_index for seed in range(40)}
    assert picks == {1, 2, 3}
    again = [select_hints(rollouts, seed=5, key="p") for _ in range(3)]
    assert len(set(again)) == 1


def test_group_equivalent_keeps_order_of_first_use():
    groups = group_equivalent(["3", "1/2", "0.5", "3.0"], lambda a, b: float(eval(a)) == float(eval(b)))
    assert groups == [[0, 3], [1, 2]]
