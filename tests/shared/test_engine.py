"""`ConcurrentCalls`: a caller's rollouts and explanations as two concurrent calls, and what happens when one fails.

The calls here are stand-ins (pure logic: which call runs where, and what the caller sees); the real ones go to a
teacher service in tests/services/teacher/ and tests/services/curator/."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.engine import ConcurrentCalls, HintedQuestion
from shared.schemas import SamplingSettings

REPO = Path(__file__).resolve().parents[2]
ITEM = HintedQuestion(question="1 + 1?", correct_response="2", incorrect_response="3")
SAMPLING = SamplingSettings()


class Calls(ConcurrentCalls):
    def __init__(self, rollouts_error=None, explanations_error=None, explanations_take=0.0):
        self.rollouts_error, self.explanations_error, self.explanations_take = (
            rollouts_error, explanations_error, explanations_take
        )

    def rollouts(self, questions, sampling, *, worked_example=False):
        if self.rollouts_error:
            raise self.rollouts_error
        return [f"rollout of {q}" for q in questions]

    def explanations(self, items, sampling, *, worked_example=False):
        time.sleep(self.explanations_take)
        if self.explanations_error:
            raise self.explanations_error
        return [f"explanation of {i.question}" for i in items]


def test_both_calls_answer_together():
    answered, explained = Calls(explanations_take=0.2).rollouts_and_explanations(["q"], [SAMPLING], [ITEM], [SAMPLING])
    assert answered == ["rollout of q"] and explained == ["explanation of 1 + 1?"]


def test_a_failed_explanation_call_raises_in_the_caller():
    with pytest.raises(KeyError, match="teacher said no"):
        Calls(explanations_error=KeyError("teacher said no")).rollouts_and_explanations(
            ["q"], [SAMPLING], [ITEM], [SAMPLING]
        )


def test_a_failed_rollout_call_waits_for_the_explanations_it_started():
    """A caller that retries (the curator, problem by problem) must not compete with a call nobody reads."""
    calls = Calls(rollouts_error=ValueError("refused"), explanations_take=0.5)
    started = time.monotonic()
    with pytest.raises(ValueError, match="refused"):
        calls.rollouts_and_explanations(["q"], [SAMPLING], [ITEM], [SAMPLING])
    assert time.monotonic() - started >= 0.5


def test_a_command_ended_by_a_signal_does_not_wait_for_the_explanations_nor_does_its_exit():
    """SIGTERM (`exit_on_signals` raises SystemExit) or Ctrl-C during the rollouts, while the explanations' call
    still waits on the teacher: the command ends at once, its exit not waiting for the other call."""
    code = (
        "import time\n"
        "from tests.shared.test_engine import Calls, ITEM, SAMPLING\n"
        "started = time.monotonic()\n"
        "try:\n"
        "    Calls(rollouts_error=SystemExit(143), explanations_take=60).rollouts_and_explanations(\n"
        "        ['q'], [SAMPLING], [ITEM], [SAMPLING])\n"
        "finally:\n"
        "    print('ended after', time.monotonic() - started, flush=True)\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=50)
    said = result.stdout.split()
    assert result.returncode == 143 and said[:2] == ["ended", "after"] and float(said[2]) < 10, result.stderr
    assert time.monotonic() - started < 30
