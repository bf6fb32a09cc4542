"""The `ssb` command as a user runs it: real processes, real files, clear errors."""

import json
import subprocess
import sys
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
def test_curate_then_export_end_to_end(tmp_path, model_path):
    """The whole command on a handful of problems: funnel printed, pairs exported as JSONL."""
    data = tmp_path / "train.jsonl"
    ssb("data", "arith", "--n", "8", "--seed", "0", "--out", str(data))
    out = tmp_path / "pairs"
    result = ssb(
        "curate", "--data", str(data), "--out", str(out), "--worked-example",
        "--rollout-max-tokens", "96", "--explanation-max-tokens", "160",
    )
    assert "Curation funnel" in result.stderr and "verified pairs written" in result.stderr
    exported = [json.loads(line) for line in ssb("pairs", "export", str(out)).stdout.splitlines()]
    stored = sorted(p.stem for p in (out / "pairs").glob("*.safetensors"))
    assert sorted(r["problem_id"] for r in exported) == stored
    dropped = list((out / "dropped").glob("*.json"))
    assert len(stored) + len(dropped) == 8
