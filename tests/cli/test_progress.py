"""Progress in a log: one plain line per report, however long; and progress inside one engine call: the evaluation
bar of `ssb eval` and `ssb run` moves as the engine finishes answers within a batch, not only when a batch ends (one
batch can take minutes on a small CPU). The real engine and model; the bar is the plain one a log file gets, recording
what it is told. (Curation's line, which counts the sequences of the batch in flight, is checked in a real
`ssb curate` process: tests/cli/test_run.py.)"""

import re

from cli import eval_command
from cli.runtime import PlainProgress
from services.evaluation.evaluation import EvalConfig
from shared.arithmetic import make_arithmetic_problems


class RecordedProgress(PlainProgress):
    """The plain progress output, also keeping every `completed` it was given."""

    def __init__(self):
        super().__init__(("model",), interval=3600)
        self.completed: list[float] = []

    def update(self, task_id: int, *, completed: float | None = None, **fields) -> None:
        if completed is not None:
            self.completed.append(completed)
        super().update(task_id, completed=completed, **fields)


def test_eval_progress_counts_answers_inside_a_batch(engine, monkeypatch):
    recorded = RecordedProgress()
    monkeypatch.setattr(eval_command, "progress_bar", lambda *fields: recorded)
    problems = make_arithmetic_problems(6, seed=3)
    config = EvalConfig(max_tokens=48, batch_size=4, worked_example=True)
    report = eval_command.evaluate_with_progress(problems, engine, config, [None], "arith")
    assert report.rows[0].problems == 6
    assert recorded.completed == sorted(recorded.completed), "progress went back"
    assert recorded.completed[-1] == 6
    # Answers that end before the token limit finish before the rest of their batch of 4 (and of 2).
    assert any(0 < done < 4 for done in recorded.completed), recorded.completed
    assert any(4 < done < 6 for done in recorded.completed), recorded.completed


def test_a_plain_progress_line_is_one_line_however_long(capsys):
    status = "pairs 3, 132 tok/s, batch 37/165 sequences, " * 3
    with PlainProgress(("status",), interval=3600) as progress:
        task = progress.add_task("curating", total=2, status=status)
        progress.update(task, completed=2)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"curating: 2/2 (100%) {status.strip()}") and " | elapsed 0:00" in lines[0]


def test_a_plain_progress_line_estimates_the_time_left_once_a_twentieth_is_done():
    progress = PlainProgress((), interval=3600)
    task = progress.add_task("evaluating", total=200)
    progress.tasks[task]["started"] -= 30  # 30 s ago
    progress.update(task, completed=1)
    assert "left" not in progress.line(progress.tasks[task])
    progress.update(task, completed=20)
    assert re.search(r"\| elapsed 0:3\d, left ~4:[3-5]\d$", progress.line(progress.tasks[task]))  # 30 s x 180 / 20
