"""`ssb run`, the main job, as a user runs it: a real process on the real engine and model, end to end.

It starts from the session's curated pairs (a rerun skips every problem already curated, so the run is quick and the
skip is exercised too), evaluates the base model on held-out problems, trains one step, evaluates the adapter merged
into a copy of the base weights, and prints the paired comparison.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def ssb(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cli.main", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_run_curates_trains_and_compares_base_and_merged_adapter(curation_run, curated_pairs, tmp_path):
    problems = curation_run[0]
    out = tmp_path / "run"
    shutil.copytree(curated_pairs, out / "pairs")
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train.write_text("".join(p.model_dump_json(exclude_none=True) + "\n" for p in problems))
    assert ssb("data", "arith", "--n", "4", "--seed", "1", "--out", str(held_out)).returncode == 0

    result = ssb(
        "run", "--train", str(train), "--eval", str(held_out), "--out", str(out),
        "--rollout-max-tokens", "192", "--explanation-max-tokens", "256", "--eval-max-tokens", "32",
        "--max-steps", "1",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    log = " ".join(result.stderr.split())
    skipped = len(problems)
    assert f"already done (skipped) │ {skipped}" in log or f"already done (skipped) {skipped}" in log
    assert "McNemar's exact p =" in log and "training: 1 steps" in log
    report = json.loads((out / "eval.json").read_text())
    assert [(row["name"], row["served"]) for row in report["rows"]] == [("base", None), ("adapter", "merged")]
    assert report["benchmark"] == "held_out" and len(report["problems"]) == 4
    assert all(set(p["answers"]) == {"base", "adapter"} for p in report["problems"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "training_config.json").read_text())
