"""The `ssb` command as a user runs it: real processes, real files, clear errors."""

import json
import os
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


def ssb_side_by_side(*commands: list[str], envs: list[dict] | None = None) -> list[subprocess.CompletedProcess]:
    """Several `ssb` commands run at once (each in its environment of `envs`, if given), their results in the order
    given: a test of refusals that each load the tokenizer or torch (seconds of one core each) takes the time of the
    slowest instead of the sum."""
    running = [
        (args, subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for args, env in zip(commands, envs or [None] * len(commands), strict=True)
    ]
    results = []
    try:
        for args, process in running:
            stdout, stderr = process.communicate(timeout=600)
            results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    finally:  # a failed wait leaves none of them running
        for _, process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def test_model_pull_prints_the_checkpoint_and_does_nothing_the_second_time(model_path):
    before = {p: p.stat().st_mtime_ns for p in Path(model_path).iterdir()}
    result = ssb("model", "pull")
    assert result.stdout.strip() == model_path
    assert {p: p.stat().st_mtime_ns for p in Path(model_path).iterdir()} == before


def test_ssb_model_in_the_environment_is_the_default_of_model(tmp_path, model_path):
    command = [sys.executable, "-m", "cli.main", "model", "pull"]
    missing = {**os.environ, "SSB_MODEL": str(tmp_path / "no-such-model")}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, env=missing)
    assert result.returncode != 0 and "no-such-model does not exist" in " ".join(result.stderr.split())
    flag_wins = subprocess.run(
        [*command, "--model", "SmolLM2-135M-Instruct"], cwd=REPO, capture_output=True, text=True, timeout=60, env=missing
    )
    assert flag_wins.returncode == 0 and flag_wins.stdout.strip() == model_path


def test_model_pull_of_a_hugging_face_id_it_cannot_download_is_one_line(tmp_path):
    """A Hugging Face id is downloaded into the Hugging Face cache (its path printed); one that cannot be (offline
    here, and not in the cache) is one error line, where the id was printed as if it were provisioned."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    models = ["SomeOrg/no-such-model", "runs/demo/mistyped", "my model"]  # the last two no Hub id at all
    for model, result in zip(models, ssb_side_by_side(*(["model", "pull", "--model", m] for m in models),
                                                      envs=[env] * len(models))):
        said = " ".join(result.stderr.split())
        assert result.returncode == 2 and result.stdout == "", result.stdout
        assert said.startswith(f"error: --model {model}: no checkpoint there, and it cannot be downloaded from the "
                               "Hugging Face Hub: "), said
        assert "Traceback" not in said


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
    src.write_text('{"gold": "1", "response": "1"}\n' + "[" * 100_000 + "\n")  # deeper than Python's JSON reader goes
    said = " ".join(ssb("grade", str(src), check=False).stderr.split())
    assert f"{src}:2: JSON nested too deeply to read" in said and "Traceback" not in said, said


def test_curate_rejects_a_bad_file_before_starting_the_engine(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "", "answer": "3"}\n')
    result = ssb("curate", "--data", str(src), "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2
    assert "bad.jsonl:2" in result.stderr.replace("\n", "") and "empty" in result.stderr
    assert not (tmp_path / "out").exists()


def test_curate_eval_and_run_refuse_a_question_longer_than_the_context_before_starting_the_engine(tmp_path):
    """A question too long for the engine's context: each command that would start an engine names it, with the
    tokens it takes, before the engine starts (the engine would refuse it mid-run)."""
    src = tmp_path / "long.jsonl"
    long_question = "How many apples are there? " * 700  # about 4,200 tokens: over the 4,096-token context
    rows = [{"question": "1+1?", "answer": "2"}, {"question": long_question, "answer": "1"}]
    src.write_text("".join(json.dumps(row) + "\n" for row in rows))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"question": "2+2?", "answer": "4"}\n')
    commands = {
        "curate": ["curate", "--data", str(src), "--out", str(tmp_path / "out")],
        "eval": ["eval", "--benchmark", str(src), "--out", str(tmp_path / "eval.json")],
        "run": ["run", "--train", str(src), "--eval", str(held_out), "--out", str(tmp_path / "run")],
    }
    for name, result in zip(commands, ssb_side_by_side(*commands.values())):
        said = " ".join(result.stderr.split())
        assert result.returncode == 2, f"{name}: {result.stderr}"
        assert "1 of 2 problems do not fit the engine's 4096-token context" in said, f"{name}: {said}"
        assert "long.jsonl:2: the question's prompt is" in said and "Starting the engine" not in said, f"{name}: {said}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("line", "says"),
    [("[" * 200_000 + "]" * 200_000, "JSON nested too deeply to read"),
     (r'{"question": "What is 2+\ud800 2?", "answer": "4"}', "'question': Input should be a valid string")],
    ids=["deep-nesting", "lone-surrogate"],
)
def test_curate_names_the_line_of_a_row_python_cannot_hold(tmp_path, line, says):
    src = tmp_path / "odd.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n' + line + "\n", encoding="utf-8")
    result = ssb("curate", "--data", str(src), "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2, result.stderr
    assert f"error: {src}:2: {says}" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "says"),
    [(["--options", "[]"], "--options: expected a JSON object, got an array"),
     (["--options", '"x"', "--train", "{}"], "--options: expected a JSON object, got a string"),
     (["--train", "[1]"], "--train: expected a JSON object, got an array"),
     (["--options", "{}", "--train", "null"], "--train: expected a JSON object, got null"),
     (["--train", "{"], "--train: not JSON:"),
     (["--options", "[" * 50_000 + "]" * 50_000], "--options: JSON nested too deeply to read")],
    ids=["options-array", "options-string", "train-array", "train-null", "train-not-json", "options-deep"],
)
def test_submit_options_must_be_json_objects(tmp_path, flags, says):
    """Refused before anything is sent: the curator URL is one where nothing listens."""
    src = tmp_path / "p.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    result = ssb("submit", str(src), "--curator", "http://127.0.0.1:9", *flags, check=False)
    assert result.returncode == 2, result.stderr
    assert f"error: {says}" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_a_bad_setting_in_the_environment_is_one_error_line_naming_the_variable(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    env = {**os.environ, "SSB_KEY_PREFIX": "has.a.dot"}
    command = [sys.executable, "-m", "cli.main", "submit", str(src), "--curator", "http://127.0.0.1:9"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error: SSB_KEY_PREFIX: String should match pattern" in " ".join((result.stdout + result.stderr).split())
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("variable", "command"),
    [("SSB_CURATOR_API_KEY", ["serve", "curator", "--port", "9"]),
     ("SSB_TRAINER_API_KEY", ["serve", "trainer", "--port", "9"]),
     ("SSB_TEACHER_API_KEY", ["serve", "teacher", "--port", "9"]),
     ("SSB_CURATOR_API_KEY", ["worker", "curate", "--burst"])],
)
def test_a_service_refuses_a_blank_api_key_naming_it(variable, command):
    """`KEY=` left in an .env file would turn the key check off; the service refuses to start instead (before it
    binds or loads anything), with one line naming the variable."""
    env = {**os.environ, variable: " "}
    command = [sys.executable, "-m", "cli.main", *command]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, said
    assert f"error: {variable}: set but empty, which would leave the service open" in said
    assert "Traceback" not in said


@pytest.mark.parametrize(
    ("value", "says"),
    [(" ", "set but empty"), ("clé", "holds characters an HTTP header cannot carry"),
     ("key-0f3a ", "holds characters an HTTP header cannot carry")],
    ids=["blank", "non-ascii", "space-after"],
)
def test_clients_refuse_a_key_they_would_send_blank_or_unsendable(tmp_path, value, says):
    """`ssb curate --teacher-url` and `ssb submit` send their service's key: a blank one is refused as the services
    refuse it (not taken for none, then answered 401), and so is one no HTTP header can carry (a traceback from the
    HTTP client), with one line naming the variable."""
    src = tmp_path / "p.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    cases = (
        ("SSB_TEACHER_API_KEY", ["curate", "--data", str(src), "--out", str(tmp_path / "out"), "--teacher-url",
                                 "http://127.0.0.1:9"]),
        ("SSB_CURATOR_API_KEY", ["submit", str(src), "--curator", "http://127.0.0.1:9"]),
        ("SSB_CURATOR_API_KEY", ["serve", "curator", "--port", "9"]),
    )
    results = ssb_side_by_side(*(command for _, command in cases),
                               envs=[{**os.environ, variable: value} for variable, _ in cases])
    for (variable, command), result in zip(cases, results):
        said = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 2 and f"error: {variable}: {says}" in said, (command, said)
        assert "Traceback" not in said and not (tmp_path / "out").exists()


def test_a_service_url_that_is_none_is_refused_naming_its_flag(tmp_path):
    """A URL without its scheme would be waited on for two minutes as a teacher not up yet; a port that is no number
    was a traceback. Both are one line, status 2, nothing written."""
    src = tmp_path / "p.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    out = ["--out", str(tmp_path / "out")]
    cases = (
        (["curate", "--data", str(src), *out, "--teacher-url", "localhost:8000"],
         "--teacher-url 'localhost:8000': not a service URL; expected http://HOST:PORT"),
        (["eval", "--benchmark", str(src), "--out", str(tmp_path / "e.json"), "--teacher-url", "http://127.0.0.1:80x1"],
         "--teacher-url 'http://127.0.0.1:80x1': Invalid port: '80x1'"),
        (["submit", str(src), "--curator", "http://[::1"], "--curator 'http://[::1': Invalid port"),
    )
    for (command, says), result in zip(cases, ssb_side_by_side(*(command for command, _ in cases))):
        said = " ".join(result.stderr.split())
        assert result.returncode == 2 and f"error: {says}" in said, (command, said)
        assert "Traceback" not in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_a_value_a_commands_settings_refuse_is_one_line_naming_the_option_or_variable(tmp_path):
    """What typer's own bounds let through and the command's settings refuse (a curation's k, a token limit, the
    machine's dtype, a top-k above what the engine returns) is named as the user gave it, in one line, before any
    engine starts, not in pydantic's report of the settings' fields."""
    src, held_out = tmp_path / "p.jsonl", tmp_path / "h.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    held_out.write_text('{"question": "2+2?", "answer": "4"}\n', encoding="utf-8")
    cases = (
        (["curate", "--data", str(src), "--out", str(tmp_path / "out"), "--k", "100"], {},
         "--k: Input should be less than or equal to 64"),
        (["curate", "--data", str(src), "--out", str(tmp_path / "out")], {"SSB_DTYPE": "fp16"},
         "SSB_DTYPE: String should match pattern"),
        (["run", "--train", str(src), "--eval", str(held_out), "--out", str(tmp_path / "run"),
          "--eval-max-tokens", "99999"], {}, "--eval-max-tokens: Input should be less than or equal to 32768"),
        (["eval", "--benchmark", str(held_out), "--max-tokens", "99999", "--teacher-url", "http://127.0.0.1:9",
          "--out", str(tmp_path / "e.json")], {}, "--max-tokens: Input should be less than or equal to 32768"),
        # A top-k the engine cannot return: every explanation refused after the rollouts (a traceback), said first.
        (["curate", "--data", str(src), "--out", str(tmp_path / "out"), "--topk", "65"], {},
         "--topk 65 is above the engine's largest top-k of log-probabilities, 64 (SSB_MAX_LOGPROBS)"),
        (["run", "--train", str(src), "--eval", str(held_out), "--out", str(tmp_path / "run")],
         {"SSB_MAX_LOGPROBS": "16"}, "the curation's top-k 20 is above the engine's largest top-k"),
    )
    results = ssb_side_by_side(*(command for command, _, _ in cases),
                               envs=[{**os.environ, **env} for _, env, _ in cases])
    for (command, _, says), result in zip(cases, results):
        said = " ".join(result.stderr.split())
        assert result.returncode == 2 and said.startswith(f"error: {says}") and said.count("error") == 1, said
        assert "validation error" not in said and "Traceback" not in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.jsonl", "p.jsonl"]


def test_eval_with_a_teacher_refuses_an_adapter_given_by_a_path(tmp_path):
    """With `--teacher-url` an adapter is a name in the teacher's adapters directory: a path (a traceback from the
    client's schema) is one line, before the teacher is waited for."""
    src = tmp_path / "p.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    result = ssb("eval", "--benchmark", str(src), "--adapter", "runs/a", "--teacher-url", "http://127.0.0.1:9",
                 "--out", str(tmp_path / "e.json"), check=False)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and "error: --adapter runs/a: with --teacher-url an adapter is named as in the " \
        "teacher's adapters directory" in said, said
    assert "Traceback" not in said and "Waiting for the teacher" not in said and not (tmp_path / "e.json").exists()


def test_curate_and_eval_against_a_teacher_that_cannot_start_end_at_once_with_one_line(tmp_path):
    """A teacher whose engine failed to start (its `/readyz` a 503 of type `start_failed`): `ssb curate` and `ssb eval`
    with `--teacher-url` stop at once, status 1, saying why in one line, and write nothing."""
    from cli.supervisor import free_port
    from tests.cli.test_supervisor import READYZ

    src = tmp_path / "p.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    port = free_port()
    teacher = subprocess.Popen([sys.executable, "-c", READYZ, str(port), "start_failed"])
    try:
        url = f"http://127.0.0.1:{port}"
        for command in (["curate", "--data", str(src), "--out", str(tmp_path / "out")],
                        ["eval", "--benchmark", str(src), "--out", str(tmp_path / "eval.json")]):
            result = ssb(*command, "--teacher-url", url, check=False)
            said = " ".join(result.stderr.split())
            assert result.returncode == 1, said
            says = f"error: the teacher service: the teacher at {url} could not start its engine"
            assert f"{says}: the engine failed to start: no model" in said
            assert "Traceback" not in said
    finally:
        teacher.kill()
        teacher.wait()
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval.json").exists()


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """A file where a command writes a directory, a directory where it writes a file, a file in the way of the
    directory to create: each command says so at once (status 2, one line), before it loads anything."""
    src = tmp_path / "p.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    held_out = tmp_path / "h.jsonl"
    held_out.write_text('{"question": "2+2?", "answer": "4"}\n', encoding="utf-8")
    graded = tmp_path / "g.jsonl"
    graded.write_text('{"gold": "2", "response": "2"}\n', encoding="utf-8")
    a_file, a_dir = tmp_path / "f.txt", tmp_path / "d"
    a_file.write_text("mine\n")
    a_dir.mkdir()
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "nothing")
    cases = [
        (["curate", "--data", str(src), "--out", str(a_file)], f"--out {a_file}: a file is there; give a directory"),
        (["curate", "--data", str(src), "--out", str(a_file / "o")], f"--out {a_file / 'o'}: {a_file} is a file"),
        (["eval", "--benchmark", str(src), "--out", str(a_dir)], f"--out {a_dir}: a directory is there; give a file"),
        (["eval", "--benchmark", str(src), "--out", str(a_file / "e.json")], f"{a_file} is a file, not a directory"),
        (["train", "--pairs", str(tmp_path), "--out", str(a_file)], f"--out {a_file}: a file is there"),
        (["run", "--train", str(src), "--eval", str(held_out), "--out", str(a_file)],
         f"--out {a_file}: a file is there"),
        (["data", "arith", "--n", "2", "--out", str(a_dir)], f"--out {a_dir}: a directory is there"),
        (["curate", "--data", str(src), "--out", str(dangling)], f"--out {dangling}: a link to nothing is there"),
        (["grade", str(graded), "--out", str(a_dir)], f"--out {a_dir}: a directory is there"),
    ]
    for (command, says), result in zip(cases, ssb_side_by_side(*(command for command, _ in cases))):
        said = " ".join(result.stderr.split())
        assert result.returncode == 2 and says in said, (command, said)
        assert "Traceback" not in said and "Starting the engine" not in said, (command, said)
    assert a_file.read_text() == "mine\n" and not any(a_dir.iterdir())
    ssb("grade", str(graded), "--out", str(tmp_path / "new" / "graded.jsonl"))  # a missing parent is made
    assert json.loads((tmp_path / "new" / "graded.jsonl").read_text())["correct"] is True


def test_run_resume_with_other_training_settings_is_refused_before_the_engine_starts(tmp_path):
    """`ssb run --resume` whose training settings differ from its checkpoint's says so at once, not after curation
    and the base model's evaluation."""
    from services.trainer.config import TrainConfig

    src, held_out = tmp_path / "p.jsonl", tmp_path / "h.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    held_out.write_text('{"question": "2+2?", "answer": "4"}\n', encoding="utf-8")
    checkpoint = tmp_path / "out" / "adapter" / "checkpoints" / "step-2"
    checkpoint.mkdir(parents=True)
    config = {**TrainConfig().model_dump(mode="json"), "lr": 0.5}
    (checkpoint / "state.json").write_text(json.dumps({"config": config, "step": 2}))
    result = ssb("run", "--train", str(src), "--eval", str(held_out), "--out", str(tmp_path / "out"), "--resume",
                 check=False)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and "settings changed since it was written:" in said, said
    assert " lr" in said.split("written:")[1] and "Starting the engine" not in said


def test_curate_into_a_store_made_otherwise_is_refused_before_the_engine_starts(curated_pairs, tmp_path):
    """A rerun of `ssb curate` into a store of the session's pairs (k = 4) with k = 8 would add pairs of another kind:
    refused at once, naming the difference; the store is a copy, left as it was."""
    import shutil

    from tests.conftest import CURATION_CONFIG

    store = tmp_path / "store"
    shutil.copytree(curated_pairs, store)
    before = sorted(p.name for p in store.rglob("*"))
    src = tmp_path / "p.jsonl"
    src.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    same = ["--seed", "0", "--worked-example", "--topk", str(CURATION_CONFIG["topk"]),
            "--rollout-max-tokens", str(CURATION_CONFIG["rollout_max_tokens"]),
            "--explanation-max-tokens", str(CURATION_CONFIG["explanation_max_tokens"])]
    result = ssb("curate", "--data", str(src), "--out", str(store), "--k", "8", *same, check=False)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and f"{store} holds pairs made otherwise (rollout_sampling.n 4 there, 8 now)" in said
    assert "Starting the engine" not in said and sorted(p.name for p in store.rglob("*")) == before


def test_curate_and_run_refuse_a_store_with_results_of_other_problems_before_the_engine_starts(curated_pairs, tmp_path):
    """An id the store holds made from another question (here: the file's line numbers name other problems) would be
    skipped with the old pair kept; and `ssb run` would train on pairs of problems it was not given: both refused at
    once, the store left as it was."""
    import shutil

    from shared.storage import PairStore

    out = tmp_path / "run"
    shutil.copytree(curated_pairs, out / "pairs")
    before = sorted(p.name for p in out.rglob("*"))
    taken = PairStore(out / "pairs").pair_ids()[0]
    src, held_out = tmp_path / "p.jsonl", tmp_path / "held.jsonl"
    src.write_text(json.dumps({"id": taken, "question": "What is 40 + 2?", "answer": "42"}) + "\n", encoding="utf-8")
    held_out.write_text('{"question": "What is 5 + 5?", "answer": "10"}\n', encoding="utf-8")
    said = " ".join(ssb("curate", "--data", str(src), "--out", str(out / "pairs"), check=False).stderr.split())
    assert f"holds results for 1 of these problem ids made from other problems, e.g. {taken} (" in said, said
    assert "p.jsonl:1: another question); a rerun would keep them: curate into a new directory" in said, said
    src.write_text('{"id": "new-1", "question": "What is 40 + 2?", "answer": "42"}\n', encoding="utf-8")
    result = ssb("run", "--train", str(src), "--eval", str(held_out), "--out", str(out), check=False)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and f"{out / 'pairs'} holds {len(PairStore(out / 'pairs').pair_ids())} pairs of " \
        f"problems not among these (e.g. " in said, said
    assert "Starting the engine" not in said and sorted(p.name for p in out.rglob("*")) == before


def test_a_log_level_no_logger_knows_is_refused_as_the_command_starts():
    commands = (["serve", "curator"], ["worker", "curate"], ["up"])
    results = ssb_side_by_side(*([*command, "--log-level", "loud"] for command in commands))
    for command, result in zip(commands, results):
        said = " ".join(result.stderr.split())
        assert result.returncode == 2 and "Invalid value for '--log-level'" in said, (command, said)


class ScriptedCurator:
    """A curator for `ssb submit`'s tests, through httpx's mock transport: each request (kept in `requests`) gets the
    next of `answers`, an exception raised as a transport error would be."""

    def __init__(self, answers=()):
        self.answers, self.requests = iter(answers), []

    def __call__(self, request):
        self.requests.append(request)
        answer = next(self.answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self, *answers):
        """An HTTP client of this curator, which answers `answers` from now on."""
        import httpx

        self.answers = iter(answers)
        return httpx.Client(base_url="http://curator", transport=httpx.MockTransport(self))


def test_submit_wait_rides_out_a_curator_briefly_out_of_reach(monkeypatch):
    """`ssb submit --wait` polls the dataset: a dropped connection and a 503 (the curator restarting, its Redis
    down) are waited out, the funnel then followed to the end. The curator here is httpx's mock transport."""
    import httpx
    import typer

    from cli import submit_command
    from shared.curator_api import DatasetOptions, DatasetStatus, Funnel

    done = DatasetStatus(
        id="ds-0123456789ab", state="done", problems=2, funnel=Funnel(paired=2), created_at=0.0, tokens_per_second=0,
        problems_per_minute=1.0, seconds_left=0.0, options=DatasetOptions(),
    )
    curator = ScriptedCurator()
    monkeypatch.setattr(submit_command, "POLL_SECONDS", 0.01)
    with curator.client(httpx.ConnectError("refused"), httpx.Response(503, json={}),
                        httpx.Response(200, text=done.model_dump_json())) as http:
        assert submit_command.follow(http, done.id, 2) == done
    # A newer curator's funnel with a drop reason this version does not count: done is what the curator says.
    newer = done.model_dump(mode="json") | {"funnel": {"paired": 1, "explanation_said_something_new": 1}}
    with curator.client(httpx.Response(200, json=newer)) as http:
        assert submit_command.follow(http, done.id, 2).state == "done"
    monkeypatch.setattr(submit_command, "UNREACHABLE_SECONDS", 0.05)
    with curator.client(*[httpx.ConnectError("refused")] * 1000) as http:
        with pytest.raises(typer.Exit) as gave_up:
            submit_command.follow(http, done.id, 2)
    assert gave_up.value.exit_code == 2

    # A dataset that asked for training: followed on until the curator records the run (or why it could not start).
    training = done.model_copy(update={"options": DatasetOptions(train={"max_steps": 1})})
    started = training.model_copy(update={"training_run": f"{done.id}-train"})
    with curator.client(*[httpx.Response(200, text=training.model_dump_json())] * 3,
                        httpx.Response(200, text=started.model_dump_json())) as http:
        assert submit_command.follow(http, done.id, 2) == started
    monkeypatch.setattr(submit_command, "HANDOFF_SECONDS", 0.05)
    with curator.client(*[httpx.Response(200, text=training.model_dump_json())] * 1000) as http:
        assert submit_command.follow(http, done.id, 2) == training  # no run recorded in time: the status as it is

    # Exit status 1 (`fell_short`) for each way a dataset can end otherwise than asked, 0 for the two that did not.
    cancelled = done.model_copy(update={"state": "cancelled", "funnel": Funnel(paired=1, cancelled=1)})
    refused = training.model_copy(update={"training_error": "the trainer refused it"})
    failed = done.model_copy(update={"funnel": Funnel(paired=1, failed=1)})
    assert [submit_command.fell_short(s) for s in (done, started, cancelled, training, refused, failed)] == [
        False, False, True, True, True, True,
    ]


def test_submit_sends_its_upload_again_with_the_same_key_while_the_curator_does_not_answer(monkeypatch):
    """A read timeout after the upload went out, then a 503 (the curator's Redis down): sent again with the same
    Idempotency-Key, which the curator answers as the first upload (tests/services/curator: never a second dataset).
    Each upload has a key of its own; one the curator never answers ends the command, saying so. The curator here is
    httpx's mock transport."""
    import httpx
    import typer

    from cli import submit_command

    created = httpx.Response(201, json={"id": "ds-0123456789ab", "problems": 2, "jobs": 1})
    upload = ({"file": ("p.jsonl", b"{}")}, {}, "http://curator")
    curator = ScriptedCurator()
    monkeypatch.setattr(submit_command, "SEND_PAUSE_SECONDS", 0.0)
    with curator.client(httpx.ReadTimeout("timed out"), httpx.Response(503, json={}), created) as http:
        assert submit_command.send_upload(http, *upload) is created
    with curator.client(created) as http:
        submit_command.send_upload(http, *upload)
    with curator.client(*[httpx.ConnectError("refused")] * submit_command.SEND_ATTEMPTS) as http:
        with pytest.raises(typer.Exit) as gave_up:
            submit_command.send_upload(http, *upload)
    with curator.client(httpx.Response(500, json={})) as http:  # an answer, if an error: not sent again
        assert submit_command.send_upload(http, *upload).status_code == 500
    keys = [request.headers["Idempotency-Key"] for request in curator.requests]
    assert len(keys) == 3 + 1 + submit_command.SEND_ATTEMPTS + 1 and len(set(keys[:3])) == 1 and keys[3] != keys[0]
    assert gave_up.value.exit_code == 2


def test_an_unusable_socket_directory_is_one_error_line_before_the_engine_starts(model_path, monkeypatch, capsys):
    """The engine's IPC sockets go in a directory of its own under VLLM_RPC_BASE_PATH: one that cannot hold it ends
    the command (`ssb curate`, `ssb run`, `ssb eval`) with exit status 2 and one line naming it; the teacher service
    says the same on /readyz. In the test process, which loads vLLM once for the session's engine: a process of its
    own would load it again."""
    import typer

    from cli.runtime import start_engine
    from shared.settings import Settings

    missing = "/nonexistent/sockets"
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", missing)
    with pytest.raises(typer.Exit) as exit_info:
        start_engine(model_path, Settings())
    assert exit_info.value.exit_code == 2
    printed = " ".join(capsys.readouterr().err.split())
    assert f"error: cannot make the engine's IPC socket directory in VLLM_RPC_BASE_PATH={missing}" in printed


def nonlocal_bind() -> bool:
    """Whether this machine lets a process listen on an address it does not have (then `ssb up --host` cannot tell)."""
    path = Path("/proc/sys/net/ipv4/ip_nonlocal_bind")
    return path.exists() and path.read_text().strip() != "0"


def test_up_refuses_ports_in_use_or_given_twice_before_starting_anything(model_path, tmp_path):
    """`ssb up` checks every port it will bind, its Redis's too (a Redis already there would otherwise answer for the
    one it starts), and that no two processes share one: one error line, exit status 2, nothing started."""
    import socket

    from cli.supervisor import free_port

    env = {name: value for name, value in os.environ.items() if name != "SSB_REDIS_URL"}
    up = ["up", "--model", model_path, "--data-dir", str(tmp_path / "data")]
    command = [sys.executable, "-m", "cli.main", *up]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = [str(free_port()) for _ in range(3)]
        ports = ["--teacher-port", free[0], "--curator-port", free[1], "--trainer-port", free[2]]
        # A port variable that is no port, a ready file nowhere to be written, a host no service can listen on (it
        # was "in use: every port"): named, before anything starts, as the ports in use or given twice are.
        cases = (
            ({}, [*ports, "--redis-port", str(port)], f"in use: redis port {port}"),
            ({}, [*ports, "--teacher-port", free[1], "--curator-port", free[1], "--trainer-port", free[2]],
             "one port for two processes"),
            ({"SSB_CURATOR_PORT": "abc"}, ["--redis-port", "0"], "SSB_CURATOR_PORT: Input should be a valid integer"),
            *([] if nonlocal_bind() else
              [({}, ["--redis-port", "0", "--host", "192.0.2.1"], "--host 192.0.2.1: nothing can listen there")]),
            ({"SSB_TRAINER_PORT": "70000"}, ["--redis-port", "0"],
             "SSB_TRAINER_PORT: Input should be less than or equal to 65535"),
            ({}, ["--redis-port", "0", "--teacher-port", "0", "--ready-file", str(tmp_path / "no" / "up.json")],
             f"--ready-file {tmp_path / 'no' / 'up.json'}: {tmp_path / 'no'} is not a directory"),
        )
        results = ssb_side_by_side(*([*up, *flags] for _, flags, _ in cases),
                                   envs=[{**env, **extra_env} for extra_env, _, _ in cases])
    for (_, _, says), result in zip(cases, results):
        assert result.returncode == 2, result.stdout + result.stderr
        assert says in " ".join((result.stdout + result.stderr).split()), result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr and not (tmp_path / "data").exists()
    # A data directory another `ssb up` holds (here the test holds its lock): a second Redis would share its files.
    import fcntl

    from cli.up_command import DATA_LOCK

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / DATA_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = subprocess.run([*command, "--redis-port", "0", "--teacher-port", "0", "--curator-port", "0",
                                 "--trainer-port", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "is in use by another `ssb up`" in said, said
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == [DATA_LOCK]  # nothing started or made
    # A data directory that is a file: named, where it was a traceback.
    (tmp_path / "a-file").write_text("")
    result = subprocess.run([*command[:-1], str(tmp_path / "a-file"), "--redis-port", "0", "--teacher-port", "0",
                             "--curator-port", "0", "--trainer-port", "0"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and f"the data directory {tmp_path / 'a-file'} (--data-dir or SSB_DATA_DIR) cannot " \
        "be used (File exists)" in said, said
    assert "Traceback" not in said


def test_signals_end_the_block_as_exits_and_one_the_command_ignores_stays_ignored():
    """`exit_on_signals` (every command that starts an engine, and `ssb train`): SIGTERM inside the block is an exit
    with status 128 + 15, and the handlers come back after it; SIGHUP, which `nohup` starts a command ignoring, stays
    ignored, so a closed terminal does not end a long run."""
    import signal

    from cli.runtime import exit_on_signals

    before_term = signal.getsignal(signal.SIGTERM)
    before_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit) as ended, exit_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            signal.raise_signal(signal.SIGHUP)
            signal.raise_signal(signal.SIGTERM)
        assert ended.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before_hup)
