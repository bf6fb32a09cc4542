"""Adapters merged into a copy of the base weights, loaded in place of the session engine's base weights: the engine
then answers as the LoRA does, prompts it answered before with the base weights included, and takes the demo's largest
evaluation batch (the same number of prompts, the same prompts) in stride; with the base weights loaded back, it answers
as it did before. And `ssb eval` of local adapters, merged and as LoRAs, and `ssb run` serving its adapter as a LoRA,
on the session's engines."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest

from services.evaluation.evaluation import EvalConfig, evaluate
from services.teacher.merging import merge_adapter
from shared.arithmetic import make_arithmetic_problems
from shared.prompts import build_student_messages
from shared.schemas import SamplingSettings
from tests.conftest import engine_dtype

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def small_adapter(model_path, tmp_path_factory) -> str:
    """A LoRA on every projection with random weights of a trained adapter's size (it changes answers, not to noise)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.3)
    out = tmp_path_factory.mktemp("adapters") / "small-adapter"
    peft_model.save_pretrained(out)
    return str(out)


QUESTIONS = [p.question for p in make_arithmetic_problems(2, seed=5)]
GREEDY = SamplingSettings(temperature=0.0, max_tokens=24, logprobs=5)


def question_prompts(engine) -> list:
    return [engine.render(build_student_messages(q, worked_example=True)) for q in QUESTIONS]


@pytest.fixture(scope="module")
def base_generations(engine) -> list:
    """The session engine's greedy answers to QUESTIONS with the base weights (which leaves their prompts, as the base
    weights computed them, in its prefix cache)."""
    return [gens[0] for gens in engine.generate(question_prompts(engine), GREEDY)]


@pytest.fixture(scope="module")
def merged_engine(engine, base_generations, small_adapter, model_path, tmp_path_factory):
    """The session's engine with the adapter merged into the base weights loaded in place of its own, as `ssb run` and
    `ssb eval` do on a CPU; the base weights are loaded back after this module (the module's last test checks that
    the engine then answers as before: the tests after it use the engine)."""
    merged = merge_adapter(small_adapter, model_path, tmp_path_factory.mktemp("merged"), engine_dtype(engine))
    if engine_dtype(engine) == "float32":
        assert merged.update_error < 1e-4  # the update kept (the suite's engines compute in float32)
    engine.load_weights(merged.path)
    yield engine
    engine.load_weights(model_path)


def test_merge_refuses_a_non_empty_directory_and_a_non_lora_adapter(small_adapter, model_path, tmp_path):
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        merge_adapter(small_adapter, model_path, tmp_path / "occupied")
    other = tmp_path / "prefix-tuning"
    other.mkdir()
    (other / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(ValueError, match="only LoRA"):
        merge_adapter(other, model_path, tmp_path / "out")


@pytest.mark.filterwarnings("ignore::UserWarning:peft")  # peft's own warnings about such an adapter, expected here
def test_merge_refuses_a_lora_on_an_input_embedding_the_output_layer_shares(model_path, tmp_path):
    """The default model ties its embeddings: a LoRA on `embed_tokens` adapts the input only (as trained, and as vLLM
    serves it), and merged in place it would move the output layer too: refused, saying how to serve it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    peft_model.save_pretrained(tmp_path / "embedding-adapter")
    with pytest.raises(ValueError, match="a LoRA on the input embedding .* serve it as a LoRA"):
        merge_adapter(tmp_path / "embedding-adapter", model_path, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_a_lora_on_a_tied_embedding_is_told_from_its_settings_before_any_weights_load(model_path, tmp_path):
    """Whether a LoRA would adapt the input embedding the output layer shares, from its target modules as PEFT matches
    them (names, a pattern, exclusions) and the model's config alone; a model that does not tie them never."""
    import json

    from services.teacher.merging import targets_a_tied_embedding

    assert targets_a_tied_embedding(model_path, {"target_modules": ["embed_tokens", "q_proj"]})
    assert targets_a_tied_embedding(model_path, {"target_modules": r".*embed_tokens"})
    assert not targets_a_tied_embedding(model_path, {"target_modules": ["q_proj", "v_proj"]})
    assert not targets_a_tied_embedding(model_path, {"target_modules": "all-linear"})
    assert not targets_a_tied_embedding(model_path, {"target_modules": None, "target_parameters": ["mlp.experts.w1"]})
    assert not targets_a_tied_embedding(
        model_path, {"target_modules": ["embed_tokens", "q_proj"], "exclude_modules": ["embed_tokens"]}
    )
    untied = tmp_path / "untied"
    untied.mkdir()
    config = json.loads(Path(model_path, "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert not targets_a_tied_embedding(str(untied), {"target_modules": ["embed_tokens"]})


def test_ssb_eval_serves_local_adapters_merged_and_as_loras(engine, lora_engine, small_adapter, model_path, tmp_path,
                                                            monkeypatch):
    """`ssb eval` of local adapters as a user runs it, in-process, on the session's engines in place of the ones it
    would start, with the dtype left to the machine: two adapters merged one after the other into the base weights (a
    CPU's default, its engine asked for float32; the second, a copy of the first whose update is zero, loads over the
    first and answers as the base model), then one served as a LoRA (a GPU's default) by an engine asked for its rank;
    mean@n with --samples, the report where --out is left out. The session engine gets its base weights back (this
    module's merged copy is made after). (The run's adapter through `ssb eval`'s own engine: tests/cli/test_run.py
    runs `ssb run`, whose evaluation shares this code and starts its engine for real.)"""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    import cli.eval_command
    import cli.runtime
    from cli.main import app

    started = []

    def start_session_engine(model_path, settings, **options):
        started.append({"dtype": settings.dtype, **options})
        return contextlib.nullcontext(lora_engine if options["enable_lora"] else engine)

    monkeypatch.setattr(cli.runtime, "start_engine", start_session_engine)
    monkeypatch.setattr(cli.eval_command, "exit_on_signals", contextlib.nullcontext)  # the suite's own SIGTERM handler
    monkeypatch.setenv("SSB_DTYPE", "auto")  # the dtype left to the machine, as a user runs it
    monkeypatch.chdir(tmp_path)
    zero = Path(shutil.copytree(small_adapter, tmp_path / "zero"))
    weights = load_file(zero / "adapter_model.safetensors")
    save_file({name: w * 0 if "lora_B" in name else w for name, w in weights.items()}, zero / "adapter_model.safetensors")
    benchmark = tmp_path / "questions.jsonl"
    benchmark.write_text("".join(p.model_dump_json() + "\n" for p in make_arithmetic_problems(2, seed=5)))
    args = ["eval", "--benchmark", str(benchmark), "--model", model_path, "--max-tokens", "8", "--samples", "2"]
    try:
        merged = CliRunner().invoke(app, [*args, "--adapter", small_adapter, "--adapter", str(zero)])  # auto: merged
    finally:
        engine.load_weights(model_path)
    assert merged.exit_code == 0, merged.output
    report = json.loads((tmp_path / "runs" / "eval-questions.json").read_text())
    rows = [(row["name"], row["served"]) for row in report["rows"]]
    assert rows == [("base", None), ("small-adapter", "merged"), ("zero", "merged")], rows
    assert all(row["problems"] == 2 and row["mean_at_n"] is not None for row in report["rows"])
    answers = [problem["answers"] for problem in report["problems"]]
    assert [a["zero"] for a in answers] == [a["base"] for a in answers]  # the base weights again, not the first merge
    assert [a["small-adapter"] for a in answers] != [a["base"] for a in answers]

    lora = CliRunner().invoke(app, [*args, "--adapter", small_adapter, "--adapter-serving", "lora", "--out", "l.json"])
    assert lora.exit_code == 0, lora.output
    report = json.loads((tmp_path / "l.json").read_text())
    assert [(row["name"], row["served"]) for row in report["rows"]] == [("base", None), ("small-adapter", "lora")]
    assert all(row["problems"] == 2 and row["mean_at_n"] is not None for row in report["rows"])
    # Merged on a CPU, evaluated in float32 whatever the CPU computes in; a LoRA in the dtype given (here the
    # machine's), by an engine built for the adapter's rank.
    assert started == [{"dtype": "float32", "seed": 0, "enable_lora": False, "max_lora_rank": None},
                       {"dtype": "auto", "seed": 0, "enable_lora": True, "max_lora_rank": 8}]


class SessionEngine:
    """One of the session's engines in place of an engine a command would start: closing it only marks it closed."""

    def __init__(self, engine):
        self.engine, self.closed = engine, False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.closed = True

    def close(self):
        self.closed = True


def test_ssb_run_serving_its_adapter_as_a_lora_closes_the_engine_and_starts_one_for_the_adapters_rank(
    engine, lora_engine, curation_run, tmp_path, monkeypatch
):
    """`ssb run --adapter-serving lora` (a GPU's default), in-process on the session's engines in place of the ones it
    would start: the curation it resumes is the session's (every problem done), the base model is evaluated, the
    engine closed before training (on a GPU training needs its memory), and the adapter evaluated as a LoRA by an
    engine asked for the run's rank."""
    from typer.testing import CliRunner

    import cli.run_command
    import services.trainer.training
    from cli.main import app
    from tests.conftest import CURATION_CONFIG

    started = []

    def start_session_engine(model_path, settings, **options):
        started.append(SessionEngine(lora_engine if options["enable_lora"] else engine))
        started[-1].options = options
        return started[-1]

    monkeypatch.setattr(cli.run_command, "start_engine", start_session_engine)
    monkeypatch.setattr(cli.run_command, "exit_on_signals", contextlib.nullcontext)  # the suite's own SIGTERM handler
    train_adapter, open_while_training = services.trainer.training.train, []

    def train_recording_the_engines(*args, **kwargs):
        open_while_training.extend(not s.closed for s in started)
        return train_adapter(*args, **kwargs)

    monkeypatch.setattr(services.trainer.training, "train", train_recording_the_engines)
    problems, store, _ = curation_run
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train.write_text("".join(p.model_dump_json(exclude_none=True) + "\n" for p in problems))
    held_out.write_text("".join(p.model_dump_json() + "\n" for p in make_arithmetic_problems(2, seed=5)))
    shutil.copytree(store.root, tmp_path / "run" / "pairs")  # the session's curation, as if this run had made it
    curation = [f"--{name.replace('_', '-')}={CURATION_CONFIG[name]}"  # top-k: ssb run's default, the same 20
                for name in ("k", "seed", "rollout_max_tokens", "explanation_max_tokens")]
    result = CliRunner().invoke(app, [
        "run", "--train", str(train), "--eval", str(held_out), "--out", str(tmp_path / "run"), *curation,
        "--eval-max-tokens", "8", "--max-steps", "1", "--rank", "4", "--adapter-serving", "lora",
    ])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"already done (skipped) │ {len(problems)} │" in said and "training: 1 step on" in said, said
    assert [(s.engine, s.options["enable_lora"], s.options.get("max_lora_rank")) for s in started] == [
        (engine, False, None), (lora_engine, True, 8)  # rank 4 rounded up to vLLM's next bound
    ]
    assert open_while_training == [False] and all(s.closed for s in started)  # closed before training; after the run
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [(row["name"], row["served"]) for row in report["rows"]] == [("base", None), ("adapter", "lora")]


def test_the_merged_copy_answers_as_the_lora_does(lora_engine, merged_engine, small_adapter):
    """The LoRA's greedy answers, scored token by token (teacher forcing) by the LoRA and by the merged copy: the same
    choice at every position where the LoRA's choice is not a near tie, and log-probabilities far closer to the LoRA's
    than the base model's are. And the merged copy's own greedy answers to the prompts its engine answered before with
    the base weights: their log-probabilities as the LoRA's on the same tokens (a prefix cache kept from the base
    weights would answer those prompts partly as the base model).

    Why not compare free greedy generations: in bfloat16 (the engine's dtype on a CPU with AVX512-BF16 and on a GPU)
    the merged weights W + BA are rounded once, the LoRA's two products separately; the difference is rounding-sized,
    but a near tie anywhere flips the rest of an answer (measured: 4 of 6 free answers identical). Tolerances: in
    bfloat16, two passes of the same model over the same tokens already differ by a few hundredths on average
    (measured here: merged vs LoRA 0.069 on the top-5 log-probabilities, with the same choice at every position that
    is not a near tie); in float32 the two agree to rounding.
    """
    engine = lora_engine
    prompts = question_prompts(engine)
    answers = [gens[0].token_ids for gens in engine.generate(prompts, GREEDY, adapter=small_adapter)]
    base_answers = [gens[0].token_ids for gens in engine.generate(prompts, GREEDY)]
    assert answers != base_answers, "the adapter changes no answer"

    k, near_tie = GREEDY.logprobs, 0.1
    merged_gaps, base_gaps, disagreements = [], [], []
    for prompt, answer in zip(prompts, answers):
        lora_ids, lora_lps = engine.score(prompt.token_ids, answer, k, adapter=small_adapter)
        merged_ids, merged_lps = merged_engine.score(prompt.token_ids, answer, k)
        base_ids, base_lps = engine.score(prompt.token_ids, answer, k)
        for t, token in enumerate(answer):
            lora = dict(zip(lora_ids[t], lora_lps[t]))
            merged, base = dict(zip(merged_ids[t], merged_lps[t])), dict(zip(base_ids[t], base_lps[t]))
            merged_gaps += [abs(lora[i] - merged[i]) for i in lora.keys() & merged.keys()]
            base_gaps += [abs(lora[i] - base[i]) for i in lora.keys() & base.keys()]
            margin = lora_lps[t][0] - lora_lps[t][1]
            if merged_ids[t][0] != lora_ids[t][0] and margin > near_tie:
                disagreements.append((t, margin))
    assert not disagreements, f"the merged copy chose otherwise at (position, LoRA's margin) {disagreements}"
    mean_merged, mean_base = sum(merged_gaps) / len(merged_gaps), sum(base_gaps) / len(base_gaps)
    bound = 0.15 if engine_dtype(engine) == "bfloat16" else 1e-3
    assert mean_merged < bound, f"merged vs LoRA log-probabilities differ by {mean_merged:.3f} on average"
    assert mean_merged < mean_base / 3, (mean_merged, mean_base)

    own_gaps = []
    generations = merged_engine.generate(prompts, GREEDY)
    for prompt, (generation,) in zip(prompts, generations):
        lora_ids, lora_lps = engine.score(prompt.token_ids, generation.token_ids, k, adapter=small_adapter)
        for t, (merged_ids, merged_lps) in enumerate(zip(generation.topk_ids, generation.topk_logprobs)):
            lora, merged = dict(zip(lora_ids[t], lora_lps[t])), dict(zip(merged_ids, merged_lps))
            own_gaps += [abs(lora[i] - merged[i]) for i in lora.keys() & merged.keys()]
    mean_own = sum(own_gaps) / len(own_gaps)
    assert mean_own < bound and mean_own < mean_base / 3, f"its own answers: {mean_own:.3f} from the LoRA's on average"


def demo_held_out_problems() -> int:
    """`DEMO_EVAL` in the Makefile: how many held-out problems `make demo` evaluates."""
    return int(re.search(r"^DEMO_EVAL \?= (\d+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1))


def test_the_demos_largest_evaluation_batch_completes_on_the_merged_engine(merged_engine):
    """The demo sends min(DEMO_EVAL, batch size) held-out prompts (seed 1, worked example) to the adapter's engine in
    one call; here they go with a short answer limit, since the prompt's prefill is the step that grows with the
    batch."""
    config = EvalConfig(max_tokens=2, worked_example=True)
    problems = make_arithmetic_problems(demo_held_out_problems(), seed=1)[: config.batch_size]
    report = evaluate(problems, merged_engine, config, adapters=[None])
    assert report.rows[0].problems == len(problems) >= min(demo_held_out_problems(), config.batch_size)
    assert all(p.answers["base"].num_tokens > 0 for p in report.problems)


def test_the_base_weights_loaded_back_answer_as_before(merged_engine, base_generations, model_path):
    """The module's last test: the engine gets its base weights back and answers QUESTIONS as it did before the merge,
    token for token and log-probability for log-probability."""
    merged_engine.load_weights(model_path)
    again = [gens[0] for gens in merged_engine.generate(question_prompts(merged_engine), GREEDY)]
    assert [g.token_ids for g in again] == [g.token_ids for g in base_generations]
    for after, before in zip(again, base_generations):
        assert after.topk_ids == before.topk_ids
        for position_after, position_before in zip(after.topk_logprobs, before.topk_logprobs):
            assert position_after == pytest.approx(position_before, abs=1e-4)


def test_the_update_error_measures_what_rounding_the_merged_weights_loses():
    """W + dW rounded to bfloat16 as a whole keeps a small update badly, a large one well; float32 keeps both.
    A tiny random model, a LoRA with its B scaled to set the update's size against W."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from services.teacher.merging import update_error

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = get_peft_model(
        transformers.LlamaForCausalLM(config),
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    errors = {}
    for size in (1e-3, 1e-1):
        for name, module in model.named_modules():
            if name.endswith("lora_B.default"):
                with torch.no_grad():
                    module.weight.normal_(0.0, 1.0)
                    delta = module.weight @ model.get_submodule(name.replace("lora_B", "lora_A")).weight
                    weight = model.get_submodule(name.rsplit(".lora_B", 1)[0]).base_layer.weight
                    module.weight.mul_(size * weight.norm() / delta.norm())
        errors[size] = {dtype: update_error(model, dtype) for dtype in (torch.float32, torch.bfloat16)}
    assert errors[1e-3][torch.float32] < 1e-4 and errors[1e-1][torch.float32] < 1e-6
    assert errors[1e-3][torch.bfloat16] > 0.5 and errors[1e-1][torch.bfloat16] < 0.05
