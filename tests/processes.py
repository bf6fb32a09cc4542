"""The tests' last word on processes they started: `kill_leftovers` waits for a stopped process and its children to
exit, kills whichever did not (on every path, a failed stop too: nothing is left to the rest of the run), and names
them for the test's assertion."""

from __future__ import annotations

from collections.abc import Sequence

import psutil


def kill_leftovers(processes: Sequence[psutil.Process], timeout: float) -> list[str]:
    """Wait up to `timeout` seconds for `processes` to exit; kill those still there and return them as `pid name`
    (zombies, already dead, are not named)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    left = []
    for process in alive:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {process.name()}")
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return left
