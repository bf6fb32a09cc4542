"""pass@k and accuracy on hand-computed numbers; ungradeable verdicts count as wrong."""

import math

import pytest

from shared.metrics import count_correct, count_ungradeable, mcnemar, mean_accuracy, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 2, 5, 1 - 56 / 252),  # 1 - C(8,5)/C(10,5)
        (10, 3, 1, 0.3),  # k=1 is c/n
        (4, 0, 2, 0.0),  # nothing right
        (4, 3, 2, 1.0),  # fewer than k wrong samples: every draw of 2 holds a correct one
        (4, 1, 4, 1.0),  # k=n: any correct sample is enough
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula_everywhere_small():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_stays_finite_for_large_n():
    # 1 - C(199,100)/C(200,100) = 1 - 100/200; the binomials themselves have about 60 digits.
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_accuracy_counts_ungradeable_as_wrong():
    verdicts = [True, False, None, True]
    assert count_correct(verdicts) == 2
    assert count_ungradeable(verdicts) == 1
    assert mean_accuracy(verdicts) == 0.5
    assert mean_accuracy([None, None]) == 0.0
    with pytest.raises(ValueError):
        mean_accuracy([])


def test_mean_pass_at_k_averages_over_problems():
    samples = [[True, False], [False, None], [True, True]]
    assert mean_pass_at_k(samples, 1) == pytest.approx((0.5 + 0.0 + 1.0) / 3)  # mean@2
    assert mean_pass_at_k(samples, 2) == pytest.approx((1.0 + 0.0 + 1.0) / 3)  # pass@2
    assert mean_pass_at_k([[None, True, False, False]], 1) == 0.25
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


def test_mcnemar_by_hand():
    # Discordant problems: first alone right on 1, second alone right on 5.
    # Two-sided exact p = 2 * P(X <= 1), X ~ B(6, 1/2)
    first = [True] * 3 + [True] + [False] * 5 + [None] * 2
    second = [True] * 3 + [False] + [True] * 5 + [False] * 2
    test = mcnemar(first, second)
    assert (test.problems, test.only_first, test.only_second) == (11, 1, 5)
    assert test.p_value == pytest.approx(2 * (1 + 6) / 64)
    assert test.difference == pytest.approx(4 / 11)


def test_mcnemar_without_disagreement_is_no_evidence():
    assert mcnemar([True, False, None], [True, None, False]).p_value == 1.0
    assert mcnemar([True] * 4, [False] * 4).p_value == pytest.approx(2 / 16)
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])
