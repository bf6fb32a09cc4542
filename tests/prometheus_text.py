"""Reading Prometheus text in tests: `metric(text, name, labels)` sums a sample's values over the label sets that
contain `labels` (a substring such as `state="paired"`)."""

from __future__ import annotations

import re


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus sample's values over every label set matching `labels` (a substring)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and labels in (match.group(1) or ""):
            total += float(match.group(2))
    return total
