"""A process the project starts that must not outlive the one that started it (a job's work horse, the grading
helper, a test's Redis, the services of `ssb up`), however that one dies (SIGKILL, the OOM killer), where no cleanup
of its own would run."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies

# Found here, in the parent: a child between fork and exec (`preexec_fn`) only calls it, never looks up a symbol.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Have the kernel send this process `signum` when its parent dies (SIGKILL by default; SIGTERM lets it stop
    cleanly), and die now if the parent is already gone (it may have died between the fork and this call). Linux
    only; elsewhere nothing is done. The signal follows the thread that started the process."""
    if _PRCTL is None:
        return
    if _PRCTL(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        return  # not allowed here: the process still runs, as it would without this
    if os.getppid() != parent_pid:
        os._exit(1)
