"""One core made slower for `python -m benchmarks.slower_cpu --clock F`: a real-time process pinned to that core that
takes the last (1 - F) of every short period and leaves the first F to everything else.

    python -m benchmarks.slower_cpu.burner --cpu 0 --fraction 0.5

Every burner slices the same clock (the periods start at multiples of `--period-us`), so all cores pause together, as
if the machine ran at a lower clock: serial work slows as much as parallel work. It exits when its parent does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def burn(cpu: int, fraction: float, period_ns: int) -> None:
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))  # preempts every ordinary process on this core
    except PermissionError:
        sys.exit(f"burner on cpu {cpu}: real-time scheduling is not allowed here (it needs root or CAP_SYS_NICE)")
    parent, idle_ns = os.getppid(), int(fraction * period_ns)
    while os.getppid() == parent:
        start = time.monotonic_ns() // period_ns * period_ns
        burn_from, burn_until = start + idle_ns, start + period_ns
        now = time.monotonic_ns()
        if now < burn_from:
            time.sleep((burn_from - now) / 1e9)
        while time.monotonic_ns() < burn_until:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", type=int, required=True, help="the core to slow down")
    parser.add_argument("--fraction", type=float, required=True, help="the share of each period left to other work")
    parser.add_argument("--period-us", type=int, default=2000, help="the period, in microseconds")
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    burn(args.cpu, args.fraction, args.period_us * 1000)


if __name__ == "__main__":
    main()
