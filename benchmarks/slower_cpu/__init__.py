"""Run a command as if on a slower CPU class: a stand-in for the 2-core machines a session does not have.

    python -m benchmarks.slower_cpu --isa avx2 --cpus 1.31 -- make test
    python -m benchmarks.slower_cpu --isa avx512 --cpus 1.0 -- make demo

`--isa` tells torch and the CPU build of vLLM that the CPU has only AVX2 (vLLM's `_C_AVX2` kernels, float32) or AVX512
without BF16 (`_C_AVX512`, float32), through `hook/sitecustomize.py` and torch's and oneDNN's own ISA caps.
`--cpus` caps the command and every process it starts at that many cores' worth of CPU time (a CPU cgroup quota; needs
root), so that the engine generates about as fast as on the real machine. Calibrated with `benchmarks.engine_threads
--variants ssb-no-lora` against the one real figure of the AVX2-only class (179.8 tokens/s on a 2-core AMD EPYC,
docs/BENCHMARKS.md): on an AVX512-BF16 EPYC, `--isa avx2` alone generated 290 tokens/s, with `--cpus 1.24` 160, with
`--cpus 1.40` 207, so `--cpus 1.31` for that class. For the AVX512-without-BF16 class, `--isa avx512 --cpus 1.0`:
on an Intel Xeon with AMX, `--variants ssb-processes-no-lora` gave 453 tokens/s with `--isa avx512` alone and 217-225
with `--cpus 1.0`, against 217 in that class's one probe (plain vLLM, the same binding). The quota depends on the
host: calibrate it on yours (another AVX512-BF16 EPYC needed `--isa avx2 --cpus 1.12` and `--isa avx512 --cpus 1.07`;
the AMX Xeon `--isa avx2 --cpus 1.05`). The quota slows everything else (Python, the trainer, Redis clients) by as
much, which the real machine may not: a stand-in, not a measurement of that machine.

`--clock F` slows the machine the other way: on each core a real-time process (`burner.py`) takes the last 1 - F of
every 2 ms, all cores in step, so the command's processes get the share F of every core, as on a machine whose
clock is F times this one's. Serial work (one Python process while the others wait) slows as much as the engine's
parallel work, where a quota leaves it at full speed when it runs alone. The two bracket a real machine that is
slower at the engine's vector work than at plain Python: the quota estimates low, the clock high.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HOOK = Path(__file__).resolve().parent / "hook"
ISA_ENVIRONMENT = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}
CGROUP_NAME = "ssb-slower-cpu"
PERIOD_US = 100_000


def cpu_cgroup(cpus: float) -> Path:
    """A CPU cgroup capped at `cpus` cores' worth of time per period (cgroup v2's cpu.max, or v1's CFS quota)."""
    root = Path("/sys/fs/cgroup")
    quota = int(cpus * PERIOD_US)
    if (root / "cgroup.controllers").exists():
        group = root / CGROUP_NAME
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        return group
    group = root / "cpu" / CGROUP_NAME
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(quota))
    return group


def start_burners(fraction: float) -> list[subprocess.Popen]:
    """One burner per core this process may run on (needs the right to real-time scheduling: root)."""
    command = [sys.executable, "-m", "benchmarks.slower_cpu.burner", "--fraction", str(fraction)]
    repo = Path(__file__).resolve().parents[2]
    burners = [subprocess.Popen([*command, "--cpu", str(cpu)], cwd=repo) for cpu in sorted(os.sched_getaffinity(0))]
    time.sleep(0.5)  # a burner that cannot run exits at once (it says why): then nothing runs unthrottled
    if any(burner.poll() is not None for burner in burners):
        stop_burners(burners)
        sys.exit("--clock: a burner could not start (its message is above)")
    return burners


def stop_burners(burners: list[subprocess.Popen]) -> None:
    for burner in burners:
        burner.terminate()
        burner.wait()


def run(command: list[str], isa: str | None, cpus: float | None, clock: float | None = None) -> int:
    environment = dict(os.environ)
    if isa:
        environment |= ISA_ENVIRONMENT[isa] | {"SSB_STANDIN_ISA": isa}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))
    group = cpu_cgroup(cpus) if cpus else None
    # The child joins the cgroup before it execs, so everything it starts is capped with it.
    join = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None
    burners = []
    try:
        burners = start_burners(clock) if clock else []
        return subprocess.call(command, env=environment, preexec_fn=join)
    finally:
        stop_burners(burners)
        if group:
            remove_cgroup(group)


def remove_cgroup(group: Path, wait_seconds: float = 30.0) -> None:
    """Remove the cgroup once the last process in it is gone (a process the command stopped may still be exiting)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            group.rmdir()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                left = (group / "cgroup.procs").read_text().split()
                print(f"cgroup {group} kept: {error}; processes still in it: {left}", file=sys.stderr)
                return
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=sorted(ISA_ENVIRONMENT), help="the CPU features to pretend to have")
    parser.add_argument("--cpus", type=float, help="cap the command at this many cores' worth of CPU time")
    parser.add_argument("--clock", type=float, help="leave the command this share of every core, as a slower clock")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.clock is not None and not 0 < args.clock <= 1:
        parser.error(f"--clock must be in (0, 1], got {args.clock}")
    sys.exit(run(command, args.isa, args.cpus, args.clock))
