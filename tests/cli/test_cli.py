"""The `ssb` command as a user runs it: real processes, real files, clear errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def ssb(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ssb {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_model_pull_prints_the_checkpoint_and_does_nothing_the_second_time(model_path):
    before = {p: p.stat().st_mtime_ns for p in Path(model_path).iterdir()}
    result = ssb("model", "pull")
    assert result.stdout.strip() == model_path
    assert {p: p.stat().st_mtime_ns for p in Path(model_path).iterdir()} == before


def test_data_arith_writes_a_loadable_file(tmp_path):
    out = tmp_path / "arith.jsonl"
    ssb("data", "arith", "--n", "5", "--seed", "3", "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["id"].startswith("arith-s3-") for r in rows)
    assert ssb("data", "arith", "--n", "5", "--seed", "3").stdout.splitlines() == out.read_text().splitlines()


def test_grade_adds_extracted_and_correct(tmp_path):
    src = tmp_path / "answers.jsonl"
    src.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"gold": "18", "response": "So she pays \\boxed{\\$18.00}."},
                {"gold": "1/2", "pred": "0.5"},
                {"gold": "7", "response": "I am not sure."},
            ]
        )
    )
    rows = [json.loads(line) for line in ssb("grade", str(src)).stdout.splitlines()]
    assert [(r["extracted"], r["correct"]) for r in rows] == [("\\$18.00", True), ("0.5", True), (None, None)]


def test_pairs_export_of_a_curation_that_kept_no_pair_prints_nothing(tmp_path):
    (tmp_path / "kept-none" / "dropped").mkdir(parents=True)
    result = ssb("pairs", "export", str(tmp_path / "kept-none"))
    assert result.returncode == 0 and result.stdout == ""
    refused = ssb("pairs", "export", str(tmp_path), check=False)
    assert refused.returncode != 0 and "no pairs/ or dropped/ directory here" in " ".join(refused.stderr.split())


def test_grade_reports_the_bad_line(tmp_path):
    src = tmp_path / "answers.jsonl"
    src.write_text('{"gold": "1", "response": "1"}\n{"gold": "2"\n')
    result = ssb("grade", str(src), check=False)
    assert result.returncode == 2
    assert f"{src}:2" in result.stderr.replace("\n", "")


def test_curate_rejects_a_bad_file_before_starting_the_engine(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "", "answer": "3"}\n')
    result = ssb("curate", "--data", str(src), "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2
    assert "bad.jsonl:2" in result.stderr.replace("\n", "") and "empty" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.engine
def test_sigterm_mid_curation_stops_every_engine_process_and_the_rerun_finishes(tmp_path, model_path):
    """`ssb curate` as a user runs it, twice on one output directory (one engine start each, so one test).

    A real SIGTERM once a batch is written: the command exits with 128 + 15, every engine process it started is gone,
    and no half-written file is left; plain progress lines (the output is not a terminal) arrived at the configured
    interval before. Then the plain command with the default model (worked example on by default for it) on the same
    directory: it skips what the first run wrote, curates the rest, prints the funnel, and the pairs export as JSONL.
    """
    import psutil

    data, out, log = tmp_path / "train.jsonl", tmp_path / "pairs", tmp_path / "curate.log"
    ssb("data", "arith", "--n", "6", "--seed", "0", "--out", str(data))
    curate = ["curate", "--data", str(data), "--out", str(out), "--rollout-max-tokens", "96",
              "--explanation-max-tokens", "160"]
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *curate, "--batch-size", "2"],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
            # The engine in processes of its own, as on a GPU (on a CPU it runs in the command's process by default,
            # which leaves nothing behind): those are what must not outlive the command.
            env={**os.environ, "SSB_PROGRESS_INTERVAL": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        )
        try:
            deadline = time.monotonic() + 300
            while not (written := re.search(r"curating: ([1-9]\d*)/6", log.read_text())):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no batch written after 300 s:\n{log.read_text()}"
                time.sleep(0.2)
            engine_processes = psutil.Process(process.pid).children(recursive=True)
            assert engine_processes, "the engine runs in child processes"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 128 + signal.SIGTERM
        finally:
            if process.poll() is None:
                process.kill()
    _, alive = psutil.wait_procs(engine_processes, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    assert not list(out.rglob("*.tmp"))
    assert log.read_text().count("curating:") >= 2
    first = len(list(out.glob("pairs/*.safetensors"))) + len(list(out.glob("dropped/*.json")))
    assert 0 < int(written.group(1)) <= first < 6

    result = ssb(*curate)
    stderr = " ".join(result.stderr.split())
    assert "Curation funnel" in stderr and "verified pairs written" in stderr
    assert f"already done (skipped) │ {first} │" in stderr
    assert "curating: 6/6 (100%)" in stderr
    exported = [json.loads(line) for line in ssb("pairs", "export", str(out)).stdout.splitlines()]
    stored = sorted(p.stem for p in (out / "pairs").glob("*.safetensors"))
    assert sorted(r["problem_id"] for r in exported) == stored
    assert len(stored) + len(list((out / "dropped").glob("*.json"))) == 6
