"""What the curator's and the trainer's RQ workers share: a job whose process dies still gets its failure callback.

RQ runs a job in a forked process (its "work horse") and calls the job's `on_failure` callback when the job raises,
but not when that process dies (the OOM killer, a signal, RQ's own kill past the job's timeout, a worker handing its
job back): the job is retried or failed with no callback, and whatever the callback records (a run queued again, a
problem failed) would stay unsaid.
"""

from __future__ import annotations

import os

from rq import Worker
from rq.callbacks import execute_failure_callback


class JobProcessDied(RuntimeError):
    """The error a job's failure callback gets when the job's process died."""


def how_it_died(wait_status: int | None) -> str:
    """`os.waitpid`'s status of a job's process, in words; None when RQ killed it past the job's timeout."""
    if wait_status is None:
        return "was killed past the job's timeout"
    if os.WIFSIGNALED(wait_status):
        return f"was killed by signal {os.WTERMSIG(wait_status)}"
    return f"exited with status {os.waitstatus_to_exitcode(wait_status)}"


class FailureCallbackWorker(Worker):
    """RQ's forking worker that also calls a job's failure callback when the job's process dies."""

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage) -> None:
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        died = JobProcessDied(f"the job's process {how_it_died(ret_val)}")
        try:
            execute_failure_callback(job, self.death_penalty_class, JobProcessDied, died, None)
        except Exception:  # RQ still has to retry or fail the job
            self.log.exception("Worker %s: the failure callback of job %s raised", self.name, job.id)
