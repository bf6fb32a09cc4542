"""`ssb train` and `ssb eval` as a user runs them: bad input exits with status 2 and one message before any model or
engine loads (`ssb train`'s paths before torch is even imported), and a training run on real pairs killed after its
first checkpoint goes on with `--resume` and leaves a complete adapter directory.

The error-path tests pass `--model` a checkpoint directory that cannot load (a config and no weights): had the command
loaded the model or started the engine before checking its input, it would crash instead of giving the message.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from services.trainer.inputs import other_model_note, pair_store
from shared.storage import PairStore, decode_pair
from tests.cli.test_cli import REPO, ssb, ssb_side_by_side
from tests.services.trainer.test_training import pairs_dir  # noqa: F401  (a fixture: three real pairs, top-8)


@pytest.fixture
def unloadable_model(tmp_path):
    model = tmp_path / "unloadable-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return str(model)


def error_of(result) -> str:
    """The one error message, with the console's line wrapping undone."""
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return " ".join(result.stderr.split())


def test_train_without_a_pairs_directory_exits_2(tmp_path, unloadable_model):
    args = ["--pairs", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--model", unloadable_model]
    result = ssb("train", *args, check=False)
    assert "no pairs/ directory here" in error_of(result)
    assert not (tmp_path / "out").exists()


def test_train_on_an_empty_pairs_directory_exits_2_before_loading_the_model(tmp_path, unloadable_model):
    (tmp_path / "curated" / "pairs").mkdir(parents=True)
    args = ["--pairs", str(tmp_path / "curated"), "--out", str(tmp_path / "out"), "--model", unloadable_model]
    result = ssb("train", *args, check=False)
    assert "no pairs in" in error_of(result)
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_output_directory_with_an_adapter_a_checkpoint_or_files_of_its_own(
    tmp_path, unloadable_model
):
    """A trained adapter, a run that can be resumed, or files under a run's names that no run left are refused, and
    left as they are; what an attempt that stopped before its first checkpoint left passes the check (`train` clears
    it: tests/services/trainer/test_training.py), here up to the empty pairs directory."""
    (tmp_path / "curated" / "pairs").mkdir(parents=True)
    finished, resumable, foreign, stopped = (tmp_path / name for name in ("finished", "resumable", "foreign", "gone"))
    (finished / "checkpoints").mkdir(parents=True)
    (finished / "adapter_config.json").write_text("{}")
    (resumable / "checkpoints" / "step-4").mkdir(parents=True)
    (resumable / "checkpoints" / "step-4" / "state.json").write_text("{}")
    (resumable / "metrics.jsonl").write_text('{"step": 5}\n')
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "metrics.jsonl").write_text("mine\n")
    (stopped / "checkpoints" / ".step-4.tmp").mkdir(parents=True)  # killed while writing its first checkpoint
    for name in ("metrics.jsonl", "pair_ids.txt", "training_config.json"):
        (stopped / name).write_text("x\n")

    def train_into(out: Path) -> str:
        args = ["--pairs", str(tmp_path / "curated"), "--out", str(out), "--model", unloadable_model]
        return error_of(ssb("train", *args, check=False))

    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert f"{finished} already holds a trained adapter; evaluate it (ssb eval --adapter {finished})" in train_into(
        finished
    )
    said = train_into(resumable)
    assert "already holds a training run, stopped after its checkpoint step-4: resume it (--resume)" in said
    assert f"{foreign} holds metrics.jsonl, checkpoints, which no training run of this tool left there" in train_into(
        foreign
    )
    assert "no pairs in" in train_into(stopped)  # past the output directory's check
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_train_resume_with_other_settings_stops_before_loading(pairs_dir, tmp_path, unloadable_model):  # noqa: F811
    from services.trainer.config import TrainConfig

    checkpoint = tmp_path / "out" / "checkpoints" / "step-2"
    checkpoint.mkdir(parents=True)
    config = {**TrainConfig().model_dump(mode="json"), "lr": 0.5}
    (checkpoint / "state.json").write_text(json.dumps({"config": config, "step": 2}))
    args = ["--pairs", str(pairs_dir), "--out", str(tmp_path / "out"), "--resume", "--model", unloadable_model]
    said = error_of(ssb("train", *args, check=False))
    assert "settings changed since it was written:" in said and " lr" in said.split("written:")[1], said


def test_train_names_a_bad_setting_in_the_environment(pairs_dir, tmp_path):  # noqa: F811
    command = [sys.executable, "-m", "cli.main", "train", "--pairs", str(pairs_dir), "--out", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SSB_DTYPE": "fp16"})
    said = error_of(result)
    assert said.startswith("error: SSB_DTYPE: String should match pattern") and "validation error" not in said, said
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_train_with_a_model_that_cannot_load_or_modules_it_lacks_is_one_line(
    pairs_dir, model_path, tmp_path, unloadable_model  # noqa: F811
):
    """A model that cannot load (here a checkpoint with an empty config), LoRA target modules the model does not
    have (on pairs made by a model of another name: noted first), and a pair that cannot be read: one error line each,
    status 2, no traceback, no adapter."""
    other = copy_pairs(pairs_dir, tmp_path / "other", model="/teacher-box/Qwen2.5-0.5B-Instruct+round-1")
    unreadable = copy_pairs(pairs_dir, tmp_path / "unreadable")
    (unreadable / "pairs" / "0.safetensors").write_bytes(b"not a pair")  # the first pair by name
    cases = (
        (pairs_dir, ["--model", unloadable_model], unloadable_model),
        (other, ["--model", model_path, "--target-modules", "q_projection", "--max-steps", "1"],
         "the LoRA adapter cannot be built on"),
        (unreadable, ["--model", model_path], "unreadable pair file"),
    )
    commands = [["train", "--pairs", str(pairs), "--out", str(tmp_path / f"out-{i}"), *args]
                for i, (pairs, args, _) in enumerate(cases)]
    for i, ((pairs, _, says), result) in enumerate(zip(cases, ssb_side_by_side(*commands))):
        assert result.returncode == 2 and says in error_of(result), error_of(result)
        assert "Traceback" not in result.stderr and not (tmp_path / f"out-{i}" / "adapter_config.json").exists()
        noted = "note: the pairs were made by Qwen2.5-0.5B-Instruct (recorded as /teacher-box/Qwen2.5-0.5B-Instruct+"
        assert (noted in " ".join(result.stderr.split())) == (pairs == other), result.stderr


@pytest.mark.filterwarnings("ignore::UserWarning:peft")  # peft's own warnings about such an adapter, expected here
def test_a_lora_on_a_tied_embedding_is_refused_before_the_engine_starts_where_it_would_be_merged(model_path, tmp_path):
    """The default model ties its embeddings: a LoRA on `embed_tokens` cannot be merged (tests/services/teacher/
    test_merging.py). `ssb eval` of such an adapter and `ssb run` training one say so before the engine starts (it was
    said after the base model's evaluation, or after curation, evaluation and training), with what to do instead."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])).save_pretrained(tmp_path / "a")
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    held_out = tmp_path / "h.jsonl"
    held_out.write_text('{"question": "2+2?", "answer": "4"}\n', encoding="utf-8")
    evaluated, run = ssb_side_by_side(
        ["eval", "--benchmark", str(held_out), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "e.json"),
         "--adapter-serving", "merged"],
        ["run", "--train", str(problems), "--eval", str(held_out), "--out", str(tmp_path / "run"),
         "--target-modules", "embed_tokens", "--target-modules", "q_proj", "--adapter-serving", "merged"],
    )
    for result, what in ((evaluated, f"adapter {tmp_path / 'a'}"), (run, "--target-modules embed_tokens,q_proj")):
        said = error_of(result)
        assert f"error: {what}: a LoRA on the input embedding of {model_path}, whose output layer shares its " in said
        assert "serve it as a LoRA (--adapter-serving lora)" in said and "Starting the engine" not in said, said
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "run" / "pairs").exists()


def copy_pairs(source: Path, to: Path, *, model: str | None = None) -> Path:
    """The pairs of the store at `source` in a store at `to`, their records saying they were made by `model` if
    given."""
    store = PairStore(to)
    for path in sorted(Path(source, "pairs").glob("*.safetensors")):
        pair = decode_pair(path)
        if model is not None:
            pair.record.model = model
        store.write_pair(pair)
    return to


def test_train_checks_its_paths_before_importing_torch(tmp_path, unloadable_model):
    """A wrong path is refused at once: not after torch, transformers and peft have loaded (seconds)."""
    (tmp_path / "curated" / "pairs").mkdir(parents=True)
    args = ["--pairs", str(tmp_path / "curated"), "--out", str(tmp_path / "out"), "--model", unloadable_model]
    command = [sys.executable, "-X", "importtime", "-m", "cli.main", "train", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "no pairs in" in error_of(result)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "typer" in imported and "torch" not in imported


def test_eval_rejects_an_unknown_benchmark(tmp_path, unloadable_model):
    args = ["--benchmark", "math501", "--out", str(tmp_path / "report.json"), "--model", unloadable_model]
    result = ssb("eval", *args, check=False)
    message = error_of(result)
    assert "unknown benchmark 'math501'" in message and "math500" in message
    assert not (tmp_path / "report.json").exists()


def test_eval_rejects_an_adapter_directory_without_its_config(tmp_path, unloadable_model):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    args = ["--benchmark", "gsm8k", "--adapter", str(adapter), "--out", str(tmp_path / "r.json")]
    result = ssb("eval", *args, "--model", unloadable_model, check=False)
    assert "no adapter_config.json" in error_of(result)
    assert not (tmp_path / "r.json").exists()


def test_train_killed_after_a_checkpoint_resumes_with_resume_and_writes_a_complete_adapter_directory(
    pairs_dir, tmp_path  # noqa: F811
):
    """Four steps of batch 2 (the fixture's three short real pairs), rank 4, a checkpoint each step, into a directory
    that holds a README of the user's (peft's model card is not written over it). SIGTERM once a checkpoint is
    written: the command ends as on Ctrl-C (status 128 + 15), leaving nothing half-written whatever it was writing;
    the same command with --resume goes on from the newest checkpoint, says which, logs each step once, and leaves a
    complete adapter directory."""
    out, log = tmp_path / "adapter", tmp_path / "killed.log"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    args = ["train", "--pairs", str(pairs_dir), "--out", str(out), "--max-steps", "4", "--checkpoint-every", "1",
            "--rank", "4", "--batch-size", "2"]
    with open(log, "w") as log_file:
        killed = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=REPO, stdout=log_file,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not any((out / "checkpoints").glob("step-*")):
            assert killed.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no checkpoint after 300 s:\n{log.read_text()}"
            time.sleep(0.05)
        killed.send_signal(signal.SIGTERM)
        assert killed.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()
    finally:
        if killed.poll() is None:
            killed.kill()
    assert not (out / "adapter_config.json").exists(), "the run ended before the signal: lengthen it"
    assert not list(out.rglob("*.tmp")), "a checkpoint or the adapter left half-written"

    result = ssb(*args, "--resume")
    said = " ".join(result.stderr.split())
    assert re.search(r"trained 4 steps \(resumed from the checkpoint at step [1-4]\) on 3 pairs", said), said
    assert "note: the pairs were made by" not in result.stderr  # made by the model it trains
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[0]["explanation_tokens"] > 0
    curve = out / "training_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "README.md").read_text() == "my notes\n" and not (out / ".adapter.tmp").exists()


def test_pairs_made_by_a_model_of_another_name_are_noted(pairs_dir, model_path):  # noqa: F811
    store = pair_store(pairs_dir)
    note = other_model_note(store, "/models/Qwen2.5-0.5B-Instruct/")
    assert note.startswith(f"note: the pairs were made by SmolLM2-135M-Instruct (recorded as {model_path}) and the "
                           "model to train is Qwen2.5-0.5B-Instruct")
    assert other_model_note(store, model_path + "/") is None
    assert other_model_note(store, "elsewhere/SmolLM2-135M-Instruct") is None  # one model at another path
    cached = "/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/12fd25f77366fa6b3b4b768ec3050bf629380bac"
    assert other_model_note(store, cached) is None  # in a Hugging Face cache, its path ends in a revision's hash


@pytest.mark.parametrize(
    ("serving", "dtype", "served", "evaluated_in"),
    [("auto", "float32", "merged", "float32"), ("auto", "bfloat16", "lora", "bfloat16"),
     ("auto", "float16", "lora", "float16"), ("merged", "bfloat16", "merged", "bfloat16"),
     ("lora", "float32", "lora", "float32"), ("lora", "auto", "lora", "auto")],
)
def test_adapters_are_served_merged_only_where_the_engine_keeps_their_update(serving, dtype, served, evaluated_in):
    """Merged weights rounded to bfloat16 lose most of a small adapter's update (services/teacher/merging.py): a dtype
    given is kept, and `auto` merges only in float32."""
    from cli.eval_command import resolve_adapter_serving

    assert resolve_adapter_serving(serving, dtype) == (served, evaluated_in)
    with pytest.raises(ValueError, match="use auto, merged or lora"):
        resolve_adapter_serving("both", dtype)


def test_with_the_dtype_left_to_the_machine_a_cpu_evaluates_adapters_merged_in_float32_a_gpu_as_loras(monkeypatch):
    """On any CPU (with BF16 or not) the base model and the merged adapter are evaluated in float32, exactly and at the
    base model's speed; on a GPU, where vLLM's LoRA kernels are fast, as a LoRA in the engine's own dtype."""
    import torch

    from cli.eval_command import resolve_adapter_serving

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_adapter_serving("auto", "auto") == ("merged", "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_adapter_serving("auto", "auto") == ("lora", "auto")


def write_adapter(path: Path, **config) -> Path:
    """An adapter directory with `config` over a LoRA on q_proj, and an empty weights file: enough for the checks."""
    path.mkdir()
    config = {"peft_type": "LORA", "lora_alpha": 16, "target_modules": ["q_proj"], **config}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def test_an_adapter_of_any_rank_is_served_merged_and_as_a_lora_by_an_engine_built_for_its_rank(tmp_path):
    """Merged, any adapter; as a LoRA, the engine is built for the adapters' largest rank rounded up to one of vLLM's
    bounds (on a CPU a larger bound makes every request slower), and what vLLM does not serve as a LoRA is said before
    the engine starts (it was at the first request, after the base model's whole evaluation)."""
    from cli.eval_command import check_adapter, lora_engine_rank
    from services.teacher.settings import lora_rank_bound

    assert [lora_rank_bound(r) for r in (1, 2, 8, 9, 32, 33, 300, 512, 513)] == [1, 8, 8, 16, 32, 64, 320, 512, 512]

    def adapter(name: str, **config) -> tuple[str, dict]:
        return check_adapter(write_adapter(tmp_path / name, **config))

    wide = adapter("r64", r=64)
    assert wide == (str((tmp_path / "r64").resolve()), json.loads((tmp_path / "r64/adapter_config.json").read_text()))
    assert lora_engine_rank([wide]) == 64
    assert lora_engine_rank([adapter("r4", r=4)]) == 8
    assert lora_engine_rank([adapter("r12-float", r=12.0)]) == 16  # a rank written as a number with a point
    assert lora_engine_rank([adapter("r8", r=8), adapter("pattern", r=8, rank_pattern={"q_proj": 16})]) == 16
    with pytest.raises(ValueError, match="adapter .*adapter_config.json: rank_pattern is not an object"):
        adapter("listed", r=8, rank_pattern=[16])
    too_wide = "LoRA rank 1024 is greater than max_lora_rank 512"
    for extra, says in (({"r": 1024}, too_wide), ({"r": 8, "rank_pattern": {"q_proj": 1024}}, too_wide),
                        ({}, "fields: {'r'}"),
                        ({"r": 8, "use_dora": True}, "DoRA"), ({"r": 8, "bias": "all"}, "bias is not supported")):
        unservable = adapter(f"unservable-{len(list(tmp_path.iterdir()))}", **extra)
        with pytest.raises(ValueError, match=f"adapter .*: vLLM does not serve it as a LoRA .*{says}"):
            lora_engine_rank([unservable])


def test_ssb_eval_builds_its_lora_engine_for_the_adapters_largest_rank(model_path, tmp_path, monkeypatch):
    """`ssb eval --adapter-serving lora` (in-process, the engine's start recorded in place of the engine) asks for an
    engine built for LoRAs up to its adapters' largest rank, rounded up to vLLM's next bound."""
    from typer.testing import CliRunner

    import cli.runtime
    from cli.main import app
    from shared.arithmetic import make_arithmetic_problems

    class Started(Exception):
        pass

    def record_start(model_path, settings, **options):
        raise Started(options)

    monkeypatch.setattr(cli.runtime, "start_engine", record_start)
    benchmark = tmp_path / "held_out.jsonl"
    problems = make_arithmetic_problems(2, seed=0)
    benchmark.write_text("".join(problem.model_dump_json(exclude_none=True) + "\n" for problem in problems))
    adapters = [write_adapter(tmp_path / "r4", r=4), write_adapter(tmp_path / "r12", r=4, rank_pattern={"v_proj": 12})]
    args = ["eval", "--benchmark", str(benchmark), "--out", str(tmp_path / "eval.json"), "--adapter-serving", "lora"]
    result = CliRunner().invoke(app, [*args, *(arg for path in adapters for arg in ("--adapter", str(path)))])
    assert isinstance(result.exception, Started), result.output
    assert result.exception.args[0] == {"seed": 0, "enable_lora": True, "max_lora_rank": 16}
