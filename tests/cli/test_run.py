"""`ssb curate` stopped by SIGTERM, then `ssb run`, the main job, resuming it: real processes on the real engine and
model, end to end, with one engine start for each command where the CPU has no BF16 (the two commands share one test
for that reason).

`ssb curate`, the plain command on the default model (the worked example on by default for it), is stopped by a real
SIGTERM once a batch is written: it exits with 128 + 15, every engine process it started is gone, neither a half-written
file nor an IPC socket of the engine's is left, and plain progress lines (the output is not a terminal) arrived at the
configured interval before, counting the sequences of the engine's batch in flight. `ssb run` on the same directory, in
the machine's own dtype, skips what was written, curates the rest, evaluates the base model on held-out problems (in
float32: on a CPU with BF16 a float32 engine takes over from the one that curated), trains one step, evaluates the
adapter merged into a copy of the base weights (loaded by the engine that evaluated the base model), and prints the
paired comparison, in a log unwrapped and without the loaders' progress bars; the pairs export as JSONL.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from services.teacher.engine import native_dtype
from shared.arithmetic import make_arithmetic_problems
from tests.cli.test_cli import ssb_side_by_side

REPO = Path(__file__).resolve().parents[2]
# Four of the session's problems (tests/conftest.py): in float32 each problem's outcome depends on neither the batch
# nor the CPU, and with these options 7, 11 and 28 pair, so the first batch holds a pair and the run has three to train.
PROBLEMS = (6, 7, 11, 28)
LIMITS = ("--rollout-max-tokens", "192", "--explanation-max-tokens", "256")


def ssb(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cli.main", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.runs_first
def test_sigterm_mid_curation_stops_every_engine_process_and_ssb_run_resumes_trains_and_compares(
    tmp_path, tmp_path_factory
):
    problems = make_arithmetic_problems(max(PROBLEMS) + 1, seed=0)
    train, held_out, log = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl", tmp_path / "curate.log"
    train.write_text("".join(problems[i].model_dump_json(exclude_none=True) + "\n" for i in PROBLEMS))
    assert ssb("data", "arith", "--n", "4", "--seed", "1", "--out", str(held_out)).returncode == 0
    out = tmp_path / "run"
    pairs = out / "pairs"  # where `ssb run --out OUT` keeps its curation

    curate = [sys.executable, "-m", "cli.main", "curate", "--data", str(train), "--out", str(pairs), *LIMITS]
    ipc = tmp_path_factory.mktemp("ipc")  # where vLLM puts the engine's IPC sockets: a short path (108 bytes at most)
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [*curate, "--batch-size", "2"], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
            # The engine in processes of its own, as on a GPU (on a CPU it runs in the command's process by default,
            # which leaves nothing behind): those are what must not outlive the command.
            env={
                **os.environ, "SSB_PROGRESS_INTERVAL": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                "VLLM_RPC_BASE_PATH": str(ipc),
            },
        )
        try:
            deadline = time.monotonic() + 300
            while not (written := re.search(r"curating: ([1-9]\d*)/4", log.read_text())):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no batch written after 300 s:\n{log.read_text()}"
                time.sleep(0.2)
            engine_processes = psutil.Process(process.pid).children(recursive=True)
            assert engine_processes, "the engine runs in child processes"
            assert any(path.is_socket() for path in ipc.rglob("*")), "the engine's processes talk over IPC sockets"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 128 + signal.SIGTERM
        finally:  # a failure on the way leaves neither the command nor its engine's processes running
            family = []
            if process.poll() is None:
                family = psutil.Process(process.pid).children(recursive=True)
                process.kill()
            for child in family:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
    _, alive = psutil.wait_procs(engine_processes, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    assert not list(pairs.rglob("*.tmp"))
    assert not list(ipc.iterdir()), "the engine's IPC sockets were left behind"
    assert log.read_text().count("curating:") >= 2
    # Before the first batch was written, the line already counted the sequences the engine had finished in it.
    assert re.search(r"curating: 0/4 \(0%\) batch \d+/\d+ sequences", log.read_text()), log.read_text()
    first = len(list(pairs.glob("pairs/*.safetensors"))) + len(list(pairs.glob("dropped/*.json")))
    assert 0 < int(written.group(1)) <= first < 4

    # With the dtype left to the machine, as `make demo` runs it (the suite's float32 is a choice of the tests).
    result = ssb(
        "run", "--train", str(train), "--eval", str(held_out), "--out", str(out), *LIMITS,
        "--eval-max-tokens", "32", "--max-steps", "1", env={**os.environ, "SSB_DTYPE": "auto"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stderr = " ".join(result.stderr.split())
    assert "Curation funnel" in stderr and "verified pairs written" in stderr
    assert f"already done (skipped) │ {first} │" in stderr
    assert "McNemar's exact p =" in stderr and "training: 1 step on" in stderr
    # On a CPU the engine that evaluated the base model waits through training and then loads the merged adapter. It
    # is the engine that curated, unless the CPU computes in bfloat16: then a float32 engine takes over after curation
    # (the evaluations in float32, as a merged adapter's weights need): one engine start, or two.
    switched = "Evaluating in float32 (curation ran in bfloat16)" in stderr
    assert switched == (native_dtype() == "bfloat16"), result.stderr
    assert stderr.count("Starting the engine") == 1 + switched, result.stderr
    # Its output is a pipe, as in a log: the report's long lines are not wrapped, and neither the model loaders'
    # progress bars nor the dependencies' notices at the engine's start are there.
    assert re.search(r"^adapter - base: .+; McNemar's exact p = [\d.]+: ", result.stderr, re.MULTILINE), result.stderr
    for noise in ("Loading weights", "Writing model shards", "Triton is installed", "FutureWarning"):
        assert noise not in result.stderr, noise
    report = json.loads((out / "eval.json").read_text())
    assert [(row["name"], row["served"]) for row in report["rows"]] == [("base", None), ("adapter", "merged")]
    assert report["benchmark"] == "held_out" and len(report["problems"]) == 4
    assert all(set(p["answers"]) == {"base", "adapter"} for p in report["problems"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "training_config.json").read_text())
    # The same command again finds the trained adapter at once, before any engine starts or any work is redone; so
    # does --resume there (the run saved no checkpoint), and a rank the LoRA engine could not serve. (Side by side
    # with the export: each reads what the run wrote, and none writes there. `ssb eval` of a local adapter, merged
    # and as a LoRA, runs on the session's engines in tests/services/teacher/test_merging.py: here its own engine would
    # cost 25-30 s more.)
    common = ["run", "--train", str(train), "--eval", str(held_out), *LIMITS]
    again, resumed, too_wide, export = ssb_side_by_side(
        [*common, "--out", str(out), "--max-steps", "1"], [*common, "--out", str(out), "--resume"],
        [*common, "--out", str(tmp_path / "wide"), "--rank", "1024", "--adapter-serving", "lora"],
        ["pairs", "export", str(pairs)],
    )
    assert again.returncode == 2 and "already holds a trained adapter" in " ".join(again.stderr.split())
    assert "Starting the engine" not in again.stdout + again.stderr
    assert resumed.returncode == 2 and "no complete checkpoint" in " ".join(resumed.stderr.split())
    said = " ".join(too_wide.stderr.split())
    assert too_wide.returncode == 2 and "above the largest LoRA rank vLLM serves (512)" in said, said
    assert "Starting the engine" not in resumed.stderr + too_wide.stderr and not (tmp_path / "wide").exists()

    assert export.returncode == 0, export.stderr
    exported = [json.loads(line) for line in export.stdout.splitlines()]
    stored = sorted(p.stem for p in (pairs / "pairs").glob("*.safetensors"))
    assert stored and sorted(r["problem_id"] for r in exported) == stored
    assert len(stored) + len(list((pairs / "dropped").glob("*.json"))) == len(PROBLEMS)
