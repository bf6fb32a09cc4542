"""A process the project starts that must not outlive the one that started it (a job's work horse, the grading
helper, a test's Redis), however that one dies (SIGKILL, the OOM killer), where no cleanup of its own would run."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing is done), and die now if
    the parent is already gone (it may have died between the fork and this call)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here: the process still runs, as it would without this
    if os.getppid() != parent_pid:
        os._exit(1)

