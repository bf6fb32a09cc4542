"""The project's one answer grader: find the final answer in a model's response and decide whether it equals the gold.

Rollout filtering, hint selection, the check on the teacher's explanation, evaluation and `ssb grade FILE` all call
these functions, so "correct" means the same thing everywhere.

    from shared.grading import grade_response
    grade_response("18", "... so she pays $\\boxed{\\$18.00}$.")    # GradedAnswer(extracted='\\$18.00', correct=True)

Extraction (`extract_final_answer`) tries these strategies in order and returns the first answer found
(`DEFAULT_EXTRACTION_ORDER`; a caller may pass another order or a subset):

1. "boxed": the content of the LAST `\\boxed{...}` or `\\fbox{...}` (nested braces matched by a scan, escaped `\\{ \\}`
   skipped), or the token after a brace-less `\\boxed 7`. If the last box is never closed (a truncated output), this
   strategy finds nothing; it does not fall back to an earlier box.
2. "gsm8k": the text after the last `####` that opens no Markdown heading (the GSM8K solution format, `#### 72`;
   `#### Step 1: ...` and `#### 1. Add ...` are headings).
3. "answer_is": the last "the answer is ..." / "final answer: ..." (any case) that states an answer ("... whether the
   answer is right" states none); the answer is the math span right after it (`$...$`, `\\(...\\)`, `\\[...\\]`) or
   else the rest of that sentence ("the answer is 5, since ..." gives `5`).
4. "last_number": the last number in the text; commas as thousands separators, a leading minus and decimals allowed.

Every extracted answer is stripped of surrounding whitespace, one trailing period, Markdown emphasis (`**18**`) and a
surrounding `$...$` pair.
`None` means nothing was found.

Equivalence (`is_equivalent`) is math-verify 0.9.0 (`math_verify.parse` + `math_verify.verify`, default settings) on
both answers wrapped in `\\boxed{}`, after `normalize_answer` fixes what math-verify misses (thousands separated by
spaces, trailing unit words such as "dollars", a degree sign, one trailing period). math-verify decides the rest:
`18` = `18.00` = `$18` = `\\$18`; `\\frac{1}{2}` = `0.5` = `1/2`; `(1, 2)` is an ordered pair or an open interval and
differs from `(2, 1)`; `\\{1, 2\\}` = `\\{2, 1\\}`; `x = 18` counts as `18`; a percentage is accepted both ways,
so `50\\%` equals `0.5` and also `50`.

Bounding. math-verify bounds itself with `signal.alarm`, and its cleanup calls `signal.alarm(0)`, which would cancel the
SIGALRM job timeout of the RQ worker that called us. So its own timeouts are switched off (`parsing_timeout=None`,
`timeout_seconds=None`) and every comparison runs in a helper process that is killed when it overruns
`GRADING_TIMEOUT_S` (the answer is then `None`, ungradeable). A thread cannot do this: sympy expands `9^{9^{9^{9}}}`
in one big-integer operation that holds the GIL, so a waiting `future.result(timeout=...)` never gets to run.
Nothing in the calling process touches signals: the wait is a select() on the helper's pipe, and an overrunning
helper is killed (SIGKILL to that process only). Answers longer than `MAX_ANSWER_CHARS` are not parsed at all.
The helper process starts on first use (about a second: it imports sympy), serves comparisons one at a time, and is
replaced after a kill; identical normalized answers are accepted without it.

No torch, vLLM, FastAPI or RQ: the standard library in the calling process, math-verify (and sympy) in the helper.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.processes import die_with_parent
from shared.schemas import CUT_OFF

logger = logging.getLogger(__name__)

EXTRACTION_STRATEGIES = ("boxed", "gsm8k", "answer_is", "last_number")
DEFAULT_EXTRACTION_ORDER: tuple[str, ...] = EXTRACTION_STRATEGIES

# Model answers are short (the longest MATH-500 gold is about 150 characters). A longer answer is a runaway output,
# and the parser's cost grows with length, so it is called ungradeable rather than parsed.
MAX_ANSWER_CHARS = 1000

# Wall-clock budget of one comparison (parsing both sides and verifying). math-verify's own default is 5 s per step.
GRADING_TIMEOUT_S = 5.0

# How long the helper process may take to start (importing sympy on a busy machine), not counted in the budget above.
_WORKER_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GradedAnswer:
    """One graded response: the extracted answer, and whether it equals the gold.

    `correct` is None when nothing was extracted or the pair could not be graded (unparseable or over the time budget).
    """

    extracted: str | None
    correct: bool | None


# ---------------------------------------------------------------------------------------------------------------------
# Extraction


MINUS_SIGN = "\u2212"  # typeset minus, read as "-"
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_GSM8K_MARK = re.compile(r"(?<!#)####(?!#)[ \t]*([^\n]*)")  # not a level-5 or 6 Markdown heading
# What a Markdown heading opens with, and an answer after `####` does not: a word of two letters or more and a space
# or colon ("Step 1: ...", "Final answer"), or a numbered title ("1. Add the apples").
_HEADING = re.compile(r"[A-Za-z]{2,}[\s:]|\d+[.)]\s+[A-Za-z]")
# What follows "the answer is" in a sentence that states no answer ("... whether the answer is right: yes").
_NO_ANSWER_WORDS = frozenset({
    "right", "correct", "wrong", "incorrect", "not", "that", "to", "because", "as", "in", "still", "indeed", "clearly",
    "likely", "probably", "reasonable", "consistent", "below", "above", "given", "shown",
})  # fmt: skip
# "The answer is", "the final answer is", "Final answer: 5", "**Final Answer:** 5", "**Final Answer**\n5".
_ANSWER_IS = re.compile(
    r"\bthe\s+(?:final\s+)?answer\s+is\b|\bfinal\s+answer\b\s*\**\s*(?::|is\b|(?=\n))",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"(?:(?<![\w)\]}.])-)?(?<![\w.])(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_MATH_SPANS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# A math span after "the answer is" ends at its closing delimiter (a `$` not escaped): a display's on any line, inline
# math's on the same line; an inline span holding a full stop is no math but dollars ("$18. Then she paid $6"), nor
# is one opening with a digit and going on in prose or closed after a space ("$18 and she keeps $6": its amount, 18).
_SPAN_CLOSE = {left: re.compile(r"(?<!\\)" + re.escape(right)) for left, right in _MATH_SPANS}
_INLINE = ("$", "\\(")
_FULL_STOP = re.compile(r"\.\s")
_TEXT_COMMAND = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{[^{}]*\}")
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}\b")
# The answer after "the answer is" ends at a full stop, or at a comma that starts a clause ("5, since ..."), not one
# inside a list ("1, 2, and 3").
_SENTENCE_END = re.compile(r"\.(?=\s|$)|,\s+(?!(?:and|or)\b)[A-Za-z]{3,}\b")


def _matching_brace(text: str, open_at: int) -> int | None:
    """Index of the `}` closing the `{` at `open_at`, skipping escaped braces; None when it is never closed."""
    depth = 0
    i = open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _strip_answer(answer: str) -> str:
    """Surrounding whitespace, one trailing period (not an ellipsis), Markdown emphasis around it (`**18**`, `__18__`)
    and a surrounding `$...$` pair."""
    answer = answer.strip()
    for _ in range(2):
        if answer.endswith(".") and not answer.endswith(".."):
            answer = answer[:-1].rstrip()
        answer = answer.strip("*").strip()
        while len(answer) > 4 and answer.startswith("__") and answer.endswith("__"):
            answer = answer[2:-2].strip()
        for left, right in _MATH_SPANS:
            inner = answer[len(left) : len(answer) - len(right)]
            if (
                len(answer) >= len(left) + len(right)
                and answer.startswith(left)
                and answer.endswith(right)
                and left not in inner
            ):
                answer = inner.strip()
                break
    return answer


def _extract_boxed(response: str) -> str | None:
    commands = list(_BOX_COMMAND.finditer(response))
    if not commands:
        return None
    after = commands[-1].end()
    rest = response[after:]
    body = rest.lstrip()
    if body.startswith("{"):
        open_at = after + len(rest) - len(body)
        close_at = _matching_brace(response, open_at)
        if close_at is None:
            return None
        return response[open_at + 1 : close_at]
    if body and (len(body) < len(rest) or body[0].isdigit()):
        # Brace-less form, `\boxed 7`: the next token, up to whitespace or a math delimiter.
        token = re.match(r"[^\s$]+", body)
        return token.group(0) if token else None
    return None


def _extract_gsm8k(response: str) -> str | None:
    """The text after the last `####` that opens no Markdown heading: `#### Step 1: ...` and `#### 1. Add` are
    headings, `#### 72`, `#### x^2 + 1` and `#### B` answer marks (GSM8K's format)."""
    marks = [mark for mark in _GSM8K_MARK.findall(response) if not _HEADING.match(mark.strip("*_ \t") + " ")]
    return marks[-1] if marks else None


def _extract_answer_is(response: str) -> str | None:
    """The answer after the last phrase that states one: "the answer is 7. Checking whether the answer is right: yes"
    gives `7` (a phrase followed by nothing, or by a word of `_NO_ANSWER_WORDS`, states none)."""
    answers = [_answer_after(response, phrase.end()) for phrase in _ANSWER_IS.finditer(response)]
    if not answers:
        return None
    return next((answer for answer in reversed(answers) if _states_an_answer(answer)), answers[-1])


def _states_an_answer(answer: str) -> bool:
    words = answer.split()
    return bool(words) and words[0].strip(".,:;!*").lower() not in _NO_ANSWER_WORDS


def _answer_after(response: str, at: int) -> str:
    rest = response[at:].lstrip(" \t\n*:")
    line = rest.split("\n", 1)[0]
    for left, _ in _MATH_SPANS:
        if rest.startswith(left):
            close = _SPAN_CLOSE[left].search(line if left in _INLINE else rest, len(left))
            span = rest[len(left) : close.start()] if close else ""
            if close and left == "$" and (amount := _amount_in_prose(span)) is not None:
                return amount
            if close and not (left in _INLINE and _FULL_STOP.search(span)):
                return span
            line = line[len(left) :]  # not closed, or dollars: the words after the delimiter
            break
    end = _SENTENCE_END.search(line)
    return line[: end.start()] if end else line


def _amount_in_prose(span: str) -> str | None:
    """The dollar amount the text between two `$` on a line opens with, when the rest is prose, not math (words
    outside `\\text{}`, or a space before the next dollar sign); None otherwise."""
    amount = _NUMBER.match(span)
    if amount is None or _FULL_STOP.search(span):
        return None
    prose = span[-1].isspace() or _PROSE.search(_TEXT_COMMAND.sub(" ", span)) is not None
    return amount.group(0) if prose else None


def _extract_last_number(response: str) -> str | None:
    numbers = _NUMBER.findall(response.replace(MINUS_SIGN, "-"))
    return numbers[-1] if numbers else None


_EXTRACTORS = {
    "boxed": _extract_boxed,
    "gsm8k": _extract_gsm8k,
    "answer_is": _extract_answer_is,
    "last_number": _extract_last_number,
}


def check_extraction_order(order: Sequence[str]) -> tuple[str, ...]:
    """`order` as a tuple; a ValueError when it names no strategy or one that does not exist."""
    if isinstance(order, str) or not order:
        raise ValueError(f"an extraction order names one or more of {list(EXTRACTION_STRATEGIES)}, got {order!r}")
    unknown = [name for name in order if name not in _EXTRACTORS]
    if unknown:
        raise ValueError(f"unknown extraction strategies {unknown}; known: {list(EXTRACTION_STRATEGIES)}")
    return tuple(order)


def extract_final_answer(response: str, order: Sequence[str] = DEFAULT_EXTRACTION_ORDER) -> str | None:
    """The final answer in a model's response, by the first strategy in `order` that finds a non-empty one.

    Strategies are named in `EXTRACTION_STRATEGIES` and described in the module docstring. Returns None when none finds
    anything. Raises ValueError for an unknown strategy name (a configuration error, not a grading outcome).
    """
    check_extraction_order(order)
    if not isinstance(response, str):
        return None
    for name in order:
        found = _EXTRACTORS[name](response)
        if found is not None:
            found = _strip_answer(found)
            if found:
                return found
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Normalization: only what math-verify 0.9.0 gets wrong on its own.

_SIGN_AND_CURRENCY = r"[-+]?\s*(?:\\?\$\s*)?"
# "1 000", "1\,000", "1~000": a number grouped by three with spaces (math-verify reads `1 000` as 1*0).
_SPACED_THOUSANDS = re.compile(
    rf"^(?P<head>{_SIGN_AND_CURRENCY})(?P<int>\d{{1,3}}(?:(?:\s|\\[,;: !]|~)+\d{{3}})+)(?P<tail>(?:\.\d+)?\D*)$"
)
_THOUSANDS_GAP = re.compile(r"(?:\s|\\[,;: !]|~)+")
# A number followed only by words: "18 dollars", "64 square feet", "10 km/h", "5 cm^2".
_NUMBER_THEN_WORDS = re.compile(
    rf"^(?P<number>{_SIGN_AND_CURRENCY}(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?|{_SIGN_AND_CURRENCY}\.\d+)"
    r"\s*(?P<words>[A-Za-z][A-Za-z\s]*(?:\^\s*\{?\d\}?)?(?:\s*/\s*[A-Za-z]+(?:\^\s*\{?\d\}?)?)?)$"
)
# Words that carry meaning after a number, so they are never dropped as units.
_MEANINGFUL_WORDS = frozenset({
    "pi", "and", "or", "percent", "percentage", "pct", "sqrt", "infinity", "inf", "ln", "log",
    "sin", "cos", "tan", "hundred", "thousand", "thousands", "million", "millions", "billion", "billions", "trillion",
    "dozen", "dozens",
})  # fmt: skip
# Units written against the number ("5cm", "12kg"): without a space, other letters are more likely a product of
# variables ("2xy"), which must not become "2".
_COMPACT_UNITS = frozenset({
    "mm", "cm", "km", "kg", "mg", "ml", "ft", "yd", "mi", "lb", "lbs", "oz", "mph", "kph", "sec", "secs", "min", "mins",
    "hr", "hrs", "am", "pm", "in", "st", "nd", "rd", "th",
})  # fmt: skip
# A power of the number itself ("5 squared" is 25), not of a unit ("24 units squared", "24 cm squared").
_POWER_WORDS = frozenset({"squared", "cubed"})
_DEGREE_SIGN = re.compile(r"\s*°")
# "30^\circ C", "30^{\circ}\text{F}": the temperature scale after a degree mark.
_DEGREE_SCALE = re.compile(r"(\^\s*\{?\s*\\circ\s*\}?)\s*(?:\\(?:text|mathrm)\s*\{\s*[CF]\s*\}|[CF])$")


def _drop_unit_words(answer: str) -> str:
    match = _NUMBER_THEN_WORDS.match(answer)
    if not match:
        return answer
    words = match.group("words")
    first_word = re.match(r"[A-Za-z]+", words).group(0).lower()
    if match.end("number") == match.start("words") and first_word not in _COMPACT_UNITS:
        return answer
    if first_word in _POWER_WORDS:
        return answer
    # A one-letter word may be a variable ("2 x", "3 i"); math-verify knows the one-letter units it strips itself.
    # After a slash it is a unit ("km/h").
    if any(len(name) < 2 for name in re.findall(r"[A-Za-z]+", words.split("/", 1)[0])):
        return answer
    if any(name.lower() in _MEANINGFUL_WORDS for name in re.findall(r"[A-Za-z]+", words)):
        return answer
    return match.group("number").strip()


def normalize_answer(answer: str) -> str:
    """Rewrite the forms math-verify misses into ones it reads; everything else passes through unchanged.

    - surrounding whitespace, one trailing period and a surrounding `$...$` pair go (`18.` -> `18`);
    - a degree sign becomes `^\\circ`, and a temperature scale after it goes (`30^\\circ C` -> `30^\\circ`);
    - a number grouped by three with spaces or thin spaces loses them (`1 000`, `1\\,000` -> `1000`), only when nothing
      after it holds another digit, so `(1, 2)` or `1 2 3` are untouched;
    - a number followed only by words (two letters or more, none of `_MEANINGFUL_WORDS`) loses the words, which are
      units: `18 dollars`, `64 square feet`, `10 km/h` -> the number. `2 x`, `3 pi`, `12 and 13`, `5 million` stay.
      Written against the number, only the units and ordinal endings of `_COMPACT_UNITS` go (`5cm`, `3rd` -> the
      number; `2xy` stays); `5 squared` stays (a power of the number, not of a unit: `24 cm squared` -> `24`).
      (`\\text{ cm}`, `^\\circ`, `\\%`, "percent" and many unit words math-verify already handles.)
    """
    answer = _strip_answer(answer).replace(MINUS_SIGN, "-")
    answer = _DEGREE_SIGN.sub(r"^\\circ", answer)
    answer = _DEGREE_SCALE.sub(r"\1", answer)
    spaced = _SPACED_THOUSANDS.match(answer)
    if spaced:
        answer = spaced.group("head") + _THOUSANDS_GAP.sub("", spaced.group("int")) + spaced.group("tail")
    return _drop_unit_words(answer.strip())


# ---------------------------------------------------------------------------------------------------------------------
# Equivalence, bounded in a helper process.


def _compare_with_math_verify(gold: str, pred: str) -> bool | None:
    """Runs in the helper process. None when either side yields nothing to compare."""
    from math_verify import parse, verify

    try:
        parsed_gold = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        parsed_pred = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
        if not parsed_gold or not parsed_pred:
            return None
        return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None))
    except Exception:  # math-verify catches its own errors; this guards the helper's loop against anything else
        logger.debug("math-verify failed on %r vs %r", gold, pred, exc_info=True)
        return None


class _QuietTimeoutWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; that is deliberate here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def _serve_comparisons(parent_pid: int) -> None:
    """The helper process: read `[gold, pred]` JSON lines on stdin, answer each with one JSON line (true/false/null).
    It dies with the process that started it (`parent_pid`), even mid-comparison (a caller killed while a comparison
    ran for seconds would leave it computing; the comparison may hold the interpreter's lock for as long, so only the
    kernel can end it). The kernel's signal follows the thread that started the helper: started from a thread that
    ends, the helper ends with it, and the next comparison starts another (about a second)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the caller, which then closes our stdin
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print from a library must not corrupt the replies
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_QuietTimeoutWarning())
    import math_verify  # noqa: F401  # imported before "ready", so start-up is not charged to a comparison

    replies.write('"ready"\n')
    replies.flush()
    for line in sys.stdin:
        gold, pred = json.loads(line)
        replies.write(json.dumps(_compare_with_math_verify(gold, pred)) + "\n")
        replies.flush()


class _ComparisonWorker:
    """The caller's handle on the helper process: one request at a time, kill and replace on overrun.

    The helper is a plain `python -c` subprocess talking JSON lines over pipes, not a multiprocessing child: the spawn
    start method re-imports the caller's main script in the child (a script without an `if __name__ == "__main__"`
    guard would run again), and fork would copy the caller's threads and locks half-taken.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def compare(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        request = (json.dumps([gold, pred]) + "\n").encode()
        with self._lock:
            # A second try covers a helper that died between calls (killed from outside, or lost across a fork).
            for _ in range(2):
                if not self._start():
                    return None
                try:
                    self._send(request)
                    reply = self._read_reply(timeout_s)
                    if reply is None:
                        logger.warning("grading took over %.1f s, counted as ungradeable: %.80r", timeout_s, pred)
                        self._stop()
                        return None
                    return json.loads(reply)
                except (OSError, EOFError, ValueError):  # a broken pipe, or a helper that died mid-reply
                    self._stop()
                except BaseException:
                    # e.g. the caller's own SIGALRM handler raising mid-wait: the helper still owes a reply that no
                    # one would read, so it must not be reused.
                    self._stop()
                    raise
            return None

    def _send(self, request: bytes) -> None:
        unsent = memoryview(request)
        while unsent:
            unsent = unsent[self._process.stdin.write(unsent) :]

    def _read_reply(self, timeout_s: float) -> bytes | None:
        """One reply line, or None when none arrives within `timeout_s`. Waits in select(), which sends no signal."""
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self._process.stdout.readline()  # replies are one short write each, so a readable pipe holds all of it
        if not line:
            raise EOFError("grading helper exited")
        return line

    def _start(self) -> bool:
        if self._process is not None and self._process.poll() is None:
            return True
        self._stop()
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        serve = f"from shared.grading import _serve_comparisons; _serve_comparisons({os.getpid()})"
        try:
            self._process = subprocess.Popen(
                # -P: the caller's working directory is not on the helper's import path (a `shared` package of its own
                # there would be imported instead of this one)
                [sys.executable, "-P", "-c", serve],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                env=env,
            )
            if self._read_reply(_WORKER_START_TIMEOUT_S) != b'"ready"\n':
                raise RuntimeError("grading helper did not start")
        except Exception:
            logger.exception("could not start the grading helper process; answers count as ungradeable")
            self._stop()
            return False
        return True

    def _stop(self) -> None:
        if self._process is None:
            return
        self._process.kill()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.error("grading helper %d did not exit after SIGKILL", self._process.pid)
        for pipe in (self._process.stdin, self._process.stdout):
            pipe.close()
        self._process = None

    def forget_after_fork(self) -> None:
        """In a forked child: the helper belongs to the parent. Drop our copies of its pipes, never signal it."""
        self._lock = threading.Lock()
        if self._process is not None:
            for pipe in (self._process.stdin, self._process.stdout):
                pipe.close()
            self._process = None


_WORKER = _ComparisonWorker()
os.register_at_fork(after_in_child=_WORKER.forget_after_fork)


def is_equivalent(gold: str, pred: str, *, timeout_s: float = GRADING_TIMEOUT_S) -> bool | None:
    """Whether `pred` is mathematically the same answer as `gold`, by math-verify after `normalize_answer`.

    Both are bare answers (`"18"`, `"\\frac{1}{2}"`, `"\\left( 3, \\frac{\\pi}{2} \\right)"`), not whole responses.
    Returns None (ungradeable) when either side is empty, not a string, longer than `MAX_ANSWER_CHARS`, yields nothing
    math-verify can read, or the comparison overruns `timeout_s` seconds. Never raises.
    """
    if not isinstance(gold, str) or not isinstance(pred, str):
        return None
    if len(gold) > MAX_ANSWER_CHARS or len(pred) > MAX_ANSWER_CHARS:
        return None
    gold, pred = normalize_answer(gold), normalize_answer(pred)
    if not gold or not pred:
        return None
    if gold == pred:
        return True
    try:
        return _WORKER.compare(gold, pred, timeout_s)
    except Exception:
        logger.exception("grading failed on %.80r vs %.80r", gold, pred)
        return None


def grade_response(gold: str, response: str, order: Sequence[str] = DEFAULT_EXTRACTION_ORDER) -> GradedAnswer:
    """Extract the final answer from `response` and compare it with `gold` (a bare answer). Never raises on strings."""
    extracted = extract_final_answer(response, order)
    if extracted is None:
        return GradedAnswer(extracted=None, correct=None)
    return GradedAnswer(extracted=extracted, correct=is_equivalent(gold, extracted))


def grade_model_response(
    gold: str, response: str, *, cut_off: bool, order: Sequence[str] = DEFAULT_EXTRACTION_ORDER
) -> GradedAnswer:
    """`grade_response` for a model's response, except that one cut at the token limit gets no verdict: it never
    finished, and a small model that runs on repeats numbers, so the last one it wrote is no final answer. What it
    extracted stays, to show."""
    graded = grade_response(gold, response, order)
    return GradedAnswer(extracted=graded.extracted, correct=None) if cut_off else graded


def _text_field(record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"field {name!r} must be a string or a number, got {type(value).__name__}")
    return str(value)


def grade_records(lines: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Grade JSONL records for `ssb grade FILE`: each record plus `extracted` and `correct`.

    A record needs `gold` (the bare answer) and either `response` (a whole model output, extracted with the default
    order; with `"finish_reason": "length"` it was cut at the token limit and gets no verdict, `grade_model_response`)
    or `pred` (an answer already extracted, graded as it is). When both are present, `response` is used. Raises
    ValueError naming the missing field; the caller adds the line number.
    """
    for record in lines:
        if not isinstance(record, dict):
            raise ValueError(f"expected an object with 'gold' and 'response' or 'pred', got {type(record).__name__}")
        gold = _text_field(record, "gold")
        if gold is None:
            raise ValueError("missing field 'gold'")
        response = _text_field(record, "response")
        pred = _text_field(record, "pred")
        if response is not None:
            graded = grade_model_response(gold, response, cut_off=record.get("finish_reason") == CUT_OFF)
        elif pred is not None:
            graded = GradedAnswer(extracted=pred, correct=is_equivalent(gold, pred))
        else:
            raise ValueError("missing field 'response' (or 'pred')")
        yield {**record, "extracted": graded.extracted, "correct": graded.correct}
