"""Keep only the curated pairs whose explanation neither states a wrong answer nor is a bare answer.

A pair passes verification when its explanation's last answer is the gold one, so an explanation can still state a
wrong final answer earlier ("The correct solution is \\boxed{3}. ... the answer is \\boxed{20}.") or be the answer
alone ("The answer is 27"). This script sorts every pair of a curation output into:

- stray: a final-answer marker (`#### X`, `\\boxed{X}`, "the answer is X" / "final answer is X") whose number X is
  not the gold answer, anywhere in the explanation;
- bare: no arithmetic in it (no `a op b` with op one of + - * x / and digits on both sides) and at most two
  non-empty lines, i.e. a statement of the answer without a solution;
- clean: the rest. The clean pair files are copied (unchanged) into `OUT/pairs/`, so `ssb train --pairs OUT` trains
  on them alone.

    .venv/bin/python -m benchmarks.clean_pairs runs/exp/pairs runs/exp/pairs-clean [--list]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from safetensors import safe_open

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_MARKERS = (
    re.compile(r"####[ \t]*\$?(" + _NUMBER + ")"),
    re.compile(r"\\boxed\s*\{\s*\$?(" + _NUMBER + r")\s*\}"),
    re.compile(r"\b(?:final\s+)?answer\s+is\s*[:*]*\s*\$?\\?\(?\s*(" + _NUMBER + ")", re.IGNORECASE),
)
_ARITHMETIC = re.compile(r"\d\s*(?:[-+*/x×÷])\s*\d")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def stated_answers(explanation: str) -> list[str]:
    """Every number that a final-answer marker states, in order of position."""
    found: list[tuple[int, str]] = []
    for marker in _MARKERS:
        found.extend((m.start(), m.group(1)) for m in marker.finditer(explanation))
    return [number for _, number in sorted(found)]


def classify(explanation: str, gold: str) -> str:
    """'stray', 'bare' or 'clean' (stray wins when both apply)."""
    gold_value = _as_number(gold)
    if any(_as_number(n) != gold_value for n in stated_answers(explanation)):
        return "stray"
    lines = [line for line in explanation.splitlines() if line.strip()]
    if not _ARITHMETIC.search(explanation) and len(lines) <= 2:
        return "bare"
    return "clean"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a curation output directory (with pairs/ in it)")
    parser.add_argument("out", type=Path, help="where the clean pairs go (OUT/pairs/)")
    parser.add_argument("--list", action="store_true", help="print every pair's class and explanation")
    args = parser.parse_args()

    files = sorted((args.source / "pairs").glob("*.safetensors"))
    (args.out / "pairs").mkdir(parents=True, exist_ok=True)
    counts = {"clean": 0, "stray": 0, "bare": 0}
    for path in files:
        with safe_open(str(path), "pt") as handle:
            record = json.loads(handle.metadata()["record"])
        kind = classify(record["explanation"], record["gold"])
        counts[kind] += 1
        if kind != "clean" or args.list:
            print(f"{kind:5} {record['problem_id']:14} gold {record['gold']:>4}  {record['explanation'][:100]!r}")
        if kind == "clean":
            shutil.copy2(path, args.out / "pairs" / path.name)
    print(f"{len(files)} pairs: {counts['clean']} clean, {counts['stray']} stray answer, {counts['bare']} bare answer")
    print(f"clean pairs copied to {args.out / 'pairs'}")


if __name__ == "__main__":
    main()
