"""Evaluation: scores on a scripted fake engine, checked by hand; base and LoRA adapter on the real engine."""

from __future__ import annotations

import pytest
from rich.console import Console

from services.evaluation.evaluation import (
    EvalConfig,
    EvalReport,
    as_merged_adapter,
    combine_reports,
    evaluate,
    model_names,
    render_table,
)
from shared.arithmetic import make_arithmetic_problems
from shared.engine import PromptingEngine
from shared.schemas import Generation, Problem, RenderedPrompt
from tests.conftest import engine_dtype

PROBLEMS = [Problem(id=f"p{i}", question=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(1, 5)]


class ScriptedEngine(PromptingEngine):
    """Answers from a script: `script[adapter][question]` is (greedy text, [sample texts]). Records every call."""

    model_name = "scripted"

    def __init__(self, script: dict[str | None, dict[str, tuple[str, list[str]]]]):
        self.script = script
        self.calls: list[tuple[str | None, list[str], list]] = []

    def render(self, messages):
        question = messages[-1].content
        return RenderedPrompt(messages=list(messages), text=question, token_ids=[1, 2, 3])

    def generate(self, prompts, sampling, *, adapter=None):
        self.calls.append((adapter, [p.text for p in prompts], list(sampling)))
        outputs = []
        for prompt, settings in zip(prompts, sampling, strict=True):
            greedy, samples = self.script[adapter][prompt.text]
            texts = [greedy] if settings.temperature == 0 else samples[: settings.n]
            assert len(texts) == settings.n
            tokens = [list(range(len(t.split()))) for t in texts]
            outputs.append([Generation(text=t, token_ids=ids, finish_reason=ending(t)) 
                            for t, ids in zip(texts, tokens)])
        return outputs


def ending(text: str) -> str:
    """A scripted text that starts with "CUT" was cut at the token limit."""
    return "length" if text.startswith("CUT") else "stop"


def boxed(value) -> str:
    return f"So the answer is \\boxed{{{value}}}"


# Base: greedy right on p1, p2; wrong on p3; no answer on p4. Samples right 2, 1, 0, 0 of 2.
# Adapter: greedy right on all four. Samples right 2, 2, 1, 0 of 2 (p4: one wrong, one without an answer).
SCRIPT = {
    None: {
        "What is 1 + 1?": (boxed(2), [boxed(2), boxed(2)]),
        "What is 2 + 2?": (boxed(4), [boxed(4), boxed(5)]),
        "What is 3 + 3?": (boxed(7), [boxed(7), "I do not know"]),
        "What is 4 + 4?": ("I do not know", [boxed(9), boxed(10)]),
    },
    "runs/ssb-adapter": {
        "What is 1 + 1?": (boxed(2), [boxed(2), boxed(2)]),
        "What is 2 + 2?": (boxed(4), [boxed(4), boxed(4)]),
        "What is 3 + 3?": (boxed(6), [boxed(6), boxed(5)]),
        "What is 4 + 4?": (boxed(8), [boxed(9), "no idea"]),
    },
}


def test_scores_match_the_hand_computed_numbers():
    engine = ScriptedEngine(SCRIPT)
    report = evaluate(PROBLEMS, engine, EvalConfig(samples=2), adapters=[None, "runs/ssb-adapter"], benchmark="toy")

    base, tuned = report.rows
    assert (base.name, base.adapter, tuned.name, tuned.adapter) == ("base", None, "ssb-adapter", "runs/ssb-adapter")
    assert base.pass_at_1 == 0.5 and base.correct == 2 and base.ungradeable == 1  # ungradeable counts as wrong
    assert base.mean_at_n == pytest.approx((2 + 1 + 0 + 0) / 8)
    assert base.pass_at_n == pytest.approx(2 / 4)
    assert tuned.pass_at_1 == 1.0 and tuned.ungradeable == 0
    assert tuned.mean_at_n == pytest.approx((2 + 2 + 1 + 0) / 8)
    assert tuned.pass_at_n == pytest.approx(3 / 4)
    assert base.problems == tuned.problems == 4
    assert base.mean_response_tokens == pytest.approx((5 + 5 + 5 + 4) / 4)

    p4 = report.problems[3]
    assert (p4.id, p4.gold) == ("p4", "8")
    assert p4.answers["base"].extracted is None and p4.answers["base"].correct is None
    assert p4.answers["ssb-adapter"].sampled_extracted == ["9", None]
    assert p4.answers["ssb-adapter"].sampled_correct == [False, None]


def test_an_answer_cut_at_the_token_limit_gets_no_verdict():
    """A response cut off is counted wrong even when its last number is the gold answer (as in curation), greedy or
    sampled; the row counts it as cut, apart from the ungradeable ones."""
    script = {
        None: {
            "What is 1 + 1?": ("CUT 1 + 1 = 2, and again 1 + 1 = 2", ["CUT so 2", boxed(2)]),
            "What is 2 + 2?": ("I do not know", [boxed(4), boxed(4)]),
        }
    }
    report = evaluate(PROBLEMS[:2], ScriptedEngine(script), EvalConfig(samples=2))
    (row,) = report.rows
    assert (row.correct, row.truncated, row.ungradeable, row.pass_at_1) == (0, 1, 1, 0.0)
    assert row.mean_at_n == pytest.approx(3 / 4)
    cut = report.problems[0].answers["base"]
    assert (cut.extracted, cut.correct, cut.finish_reason) == ("2", None, "length")
    assert (cut.sampled_extracted, cut.sampled_correct) == (["2", "2"], [None, True])


def test_one_engine_call_per_model_holds_greedy_and_seeded_samples():
    engine = ScriptedEngine(SCRIPT)
    evaluate(PROBLEMS, engine, EvalConfig(samples=2, seed=3), adapters=[None, "runs/ssb-adapter"])
    assert [adapter for adapter, _, _ in engine.calls] == [None, "runs/ssb-adapter"]
    _, questions, settings = engine.calls[0]
    assert questions == [p.question for p in PROBLEMS] * 2
    assert [(s.n, s.temperature) for s in settings] == [(1, 0.0)] * 4 + [(2, 0.6)] * 4
    seeds = [s.seed for s in settings[4:]]
    assert len(set(seeds)) == 4
    # Seeds depend on the run seed and the problem only: the adapter gets the same ones.
    assert [s.seed for s in engine.calls[1][2][4:]] == seeds


def test_batches_and_progress_do_not_change_the_result():
    whole = evaluate(PROBLEMS, ScriptedEngine(SCRIPT), EvalConfig(samples=2), adapters=[None])
    engine, seen = ScriptedEngine(SCRIPT), []
    batched = evaluate(
        PROBLEMS, engine, EvalConfig(samples=2, batch_size=3), adapters=[None], on_progress=lambda *a: seen.append(a)
    )
    assert len(engine.calls) == 2
    assert seen == [("base", 3, 4), ("base", 4, 4)]
    assert batched.problems == whole.problems
    without_time = {"rows": {"__all__": {"seconds"}}, "config": True}
    assert batched.model_dump(exclude=without_time) == whole.model_dump(exclude=without_time)


def test_greedy_only_reports_no_mean_at_n():
    report = evaluate(PROBLEMS, ScriptedEngine(SCRIPT), EvalConfig(samples=1))
    (row,) = report.rows
    assert row.mean_at_n is None and row.pass_at_n is None
    assert report.problems[0].answers["base"].sampled_correct == []


def test_row_names_are_unique():
    assert model_names([None, "a/adapter", "b/adapter", "c/final"]) == ["base", "adapter", "adapter-2", "final"]


def test_table_has_a_row_per_model_and_a_column_per_metric():
    report = evaluate(PROBLEMS, ScriptedEngine(SCRIPT), EvalConfig(samples=2), adapters=[None, "runs/ssb-adapter"])
    console = Console(record=True, width=120)
    console.print(render_table(report))
    text = console.export_text()
    assert "pass@1" in text and "mean@2" in text
    base_line = next(line for line in text.splitlines() if "base" in line)
    assert "50.0%" in base_line and "37.5%" in base_line


def test_each_row_records_the_dtype_its_engine_computed_in_and_the_table_says_it():
    engine = ScriptedEngine(SCRIPT)
    engine.dtype = "bfloat16"
    report = evaluate(PROBLEMS, engine, EvalConfig(samples=1), adapters=[None, "runs/ssb-adapter"])
    assert [row.dtype for row in report.rows] == ["bfloat16", "bfloat16"]
    assert "computed in bfloat16" in render_table(report).caption
    # The adapter merged and evaluated on another engine, in float32: each model's dtype is told.
    merged = as_merged_adapter(evaluate(PROBLEMS, ScriptedEngine(SCRIPT), EvalConfig(samples=1)), "runs/ssb-adapter")
    merged.rows[0].dtype = "float32"
    combined = combine_reports([report.model_copy(update={"rows": report.rows[:1]}), merged])
    assert "computed in bfloat16 (base), float32 (ssb-adapter)" in render_table(combined).caption


@pytest.fixture(scope="module")
def lora_adapter(model_path, tmp_path_factory) -> str:
    """A LoRA adapter on the real small model with random (non-zero) weights, so it visibly changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("lora") / "random-adapter"
    get_peft_model(model, config).save_pretrained(out)
    return str(out)


def test_base_and_adapter_side_by_side_on_the_real_engine(lora_engine, lora_adapter):
    problems = make_arithmetic_problems(2, seed=1)
    config = EvalConfig(samples=2, max_tokens=32, worked_example=True)
    report = evaluate(problems, lora_engine, config, adapters=[None, lora_adapter], benchmark="arith-s1")

    assert [row.name for row in report.rows] == ["base", "random-adapter"]
    assert report.rows[1].adapter == lora_adapter
    assert [row.dtype for row in report.rows] == [engine_dtype(lora_engine)] * 2
    assert [p.id for p in report.problems] == [p.id for p in problems]
    for result in report.problems:
        for answer in result.answers.values():
            assert answer.response and 0 < answer.num_tokens <= 32
            assert len(answer.sampled_correct) == 2
    # The adapter was loaded: its greedy responses are not the base model's.
    assert any(r.answers["base"].response != r.answers["random-adapter"].response for r in report.problems)
    assert EvalReport.model_validate_json(report.model_dump_json()) == report
