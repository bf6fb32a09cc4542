"""Accuracy metrics of evaluation: the unbiased pass@k estimator and accuracy over graded verdicts.

A verdict is what the grader says about one response: `True` (equivalent to the gold answer), `False` (a different
answer) or `None` (ungradeable: no final answer could be extracted, or the grader could not decide). Every metric here
counts an ungradeable response as wrong, as a benchmark does: a response that states no answer has not solved the
problem. Ungradeable responses are counted separately (`count_ungradeable`) so a report can say how many there were.

    from shared.metrics import pass_at_k, mean_accuracy, mcnemar
    pass_at_k(n=4, c=1, k=2)               # 0.5
    mean_accuracy([True, False, None])     # 1/3
    mcnemar([True, False], [False, False]) # paired test of two models on the same problems

`mcnemar` compares two models answering the same problems: only the problems on which they disagree carry evidence.

Pure: standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Verdict = bool | None


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k).

    The probability that at least one of `k` samples drawn without replacement from the `n` is correct (Chen et al.,
    2021). Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the large binomials. With k=1 it is c/n.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be between 0 and n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n={n}, got {k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def count_correct(verdicts: Sequence[Verdict]) -> int:
    """How many verdicts are `True`; `False` and `None` are not."""
    return sum(v is True for v in verdicts)


def count_ungradeable(verdicts: Sequence[Verdict]) -> int:
    """How many verdicts are `None`."""
    return sum(v is None for v in verdicts)


def mean_accuracy(verdicts: Sequence[Verdict]) -> float:
    """The share of verdicts that are `True`; ungradeable (`None`) counts as wrong. Raises on an empty sequence."""
    if not verdicts:
        raise ValueError("mean accuracy of no verdicts is undefined")
    return count_correct(verdicts) / len(verdicts)


def mean_pass_at_k(samples: Sequence[Sequence[Verdict]], k: int) -> float:
    """pass@k of a benchmark: the mean over problems of `pass_at_k` on each problem's sampled verdicts.

    `samples[p]` holds problem p's verdicts, one per sample; ungradeable counts as wrong. With k=1 this is the mean
    accuracy over n samples ("mean@n"): every sample of every problem weighs the same when all problems have n samples.
    """
    if not samples:
        raise ValueError("pass@k of no problems is undefined")
    return sum(pass_at_k(len(v), count_correct(v), k) for v in samples) / len(samples)


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test of two models on the same problems.

    `only_first` problems were right for the first model alone, `only_second` for the second alone; `p_value` is the
    two-sided probability, if both models were equally good, of a split of the discordant problems at least this
    uneven (exact binomial with p = 1/2). `difference` is the second model's accuracy minus the first's.
    """

    problems: int
    only_first: int
    only_second: int
    difference: float
    p_value: float


def mcnemar(first: Sequence[Verdict], second: Sequence[Verdict]) -> PairedTest:
    """McNemar's exact test on paired verdicts (ungradeable counts as wrong); raises on unequal or empty inputs."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired verdicts needed: got {len(first)} and {len(second)}")
    only_first = sum(a is True and b is not True for a, b in zip(first, second))
    only_second = sum(b is True and a is not True for a, b in zip(first, second))
    discordant = only_first + only_second
    tail = sum(math.comb(discordant, i) for i in range(min(only_first, only_second) + 1)) / 2**discordant
    return PairedTest(
        problems=len(first),
        only_first=only_first,
        only_second=only_second,
        difference=(only_second - only_first) / len(first),
        p_value=min(1.0, 2 * tail),
    )
