"""The trainer on the real small model (CPU): LoRA-only updates that lower the loss, a loadable adapter, exact resume,
and the learning-rate schedule.

Pairs are built here from the real tokenizer and chat template (`shared.prompts.render_chat`, the one renderer), with
the real teacher top-k: the base model's log-softmax on the hinted prompt plus the explanation, as curation stores
it. Training on pairs that vLLM curated is in test_consistency.py.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.config import TrainConfig
from services.trainer.data import PairDataError, collate_examples, load_examples
from services.trainer.training import (
    TrainingError,
    batch_losses,
    count_steps_per_epoch,
    learning_rate_factor,
    micro_batch_indices,
    train,
)
from shared.prompts import PROMPT_VERSION, build_hinted_messages, build_student_messages, render_chat
from shared.schemas import Pair, PairRecord, Rollout, SamplingSettings
from shared.storage import PairStore

TOPK = 8
PROBLEMS = [
    (
        "add",
        "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "7",
        "Tom starts with 3 apples. He buys 4 more, so 3 + 4 = 7. The answer is \\boxed{7}.",
    ),
    (
        "sub",
        "A shelf holds 10 books. 6 are taken away. How many books are left?",
        "4",
        "The shelf starts with 10 books. Taking away 6 leaves 10 - 6 = 4 books. The answer is \\boxed{4}.",
    ),
    (
        "mul",
        "Each box holds 5 pens. How many pens are in 3 boxes?",
        "15",
        "There are 3 boxes with 5 pens each. Multiplying, 3 x 5 = 15 pens in total. The answer is \\boxed{15}.",
    ),
]

# Small, fast runs: rank 4, every pair short, no warm-up, the stored top-8 teacher; the knobs under test are set per
# test.
SMALL = dict(rank=4, alpha=8, warmup_ratio=0.0, scheduler="constant", chunk_size=64, teacher="stored")


def load_model(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def pairs_dir(model_path, tmp_path_factory):
    """Three real pairs: chat-rendered prompts, tokenized explanations, the base model's top-8 on the hinted prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = load_model(model_path).eval()
    store = PairStore(tmp_path_factory.mktemp("pairs"))
    for problem_id, question, gold, explanation in PROBLEMS:
        wrong = f"The answer is \\boxed{{{int(gold) + 1}}}."
        student = render_chat(tokenizer, build_student_messages(question))
        teacher = render_chat(tokenizer, build_hinted_messages(question, explanation, wrong))
        tokens = tokenizer.encode(explanation, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([teacher.token_ids + tokens])).logits[0]
        start = len(teacher.token_ids) - 1
        top = torch.log_softmax(logits[start : start + len(tokens)], dim=-1).topk(TOPK, dim=-1)
        record = PairRecord(
            problem_id=problem_id,
            question=question,
            gold=gold,
            rollouts=[
                Rollout(text=explanation, num_tokens=len(tokens), extracted=gold, correct=True),
                Rollout(text=wrong, num_tokens=8, extracted=str(int(gold) + 1), correct=False),
            ],
            correct_hint_index=0,
            incorrect_hint_index=1,
            prompt_version=PROMPT_VERSION,
            teacher_prompt=teacher,
            student_prompt=student,
            explanation=explanation,
            explanation_extracted=gold,
            model=model_path,
            rollout_sampling=SamplingSettings(n=2, temperature=0.8),
            explanation_sampling=SamplingSettings(temperature=0.4, logprobs=TOPK),
            topk=TOPK,
        )
        store.write_pair(
            Pair(record=record, token_ids=tokens, topk_ids=top.indices.tolist(), topk_logprobs=top.values.tolist())
        )
    return store.root


@pytest.fixture(scope="module")
def trained(model_path, pairs_dir, tmp_path_factory):
    """Two steps on one batch of all three pairs, at a high learning rate; the base model's loss measured before."""
    config = TrainConfig(**SMALL, lr=5e-3, batch_size=3, epochs=2)
    model = load_model(model_path)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = collate_examples(load_examples(pairs_dir), pad_id=model.config.pad_token_id)
    with torch.no_grad():
        loss_before = batch_losses(model, batch, config).kl.mean().item()
    steps = []
    out = tmp_path_factory.mktemp("run") / "adapter"
    result = train(pairs_dir, out, model_path, config, model=model, on_step=steps.append)
    return dict(
        config=config, model=model, before=before, batch=batch, loss_before=loss_before, result=result, steps=steps
    )


def test_two_steps_change_only_the_lora_weights(trained):
    model, before = trained["model"], trained["before"]
    lora, base = {}, {}
    for name, p in model.named_parameters():
        (lora if "lora_" in name else base)[name] = p
    assert lora and all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for p in base.values())
    for name, p in base.items():
        original = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(p, before[original]), name
    assert len(base) == len(before)
    assert all(p.abs().sum() > 0 for name, p in lora.items() if "lora_B" in name)  # B starts at zero


def test_two_steps_lower_the_loss_on_their_batch(trained):
    assert trained["result"].steps == 2 and [m.step for m in trained["steps"]] == [1, 2]
    with torch.no_grad():
        loss_after = batch_losses(trained["model"], trained["batch"], trained["config"]).kl.mean().item()
    assert loss_after < 0.9 * trained["loss_before"]
    assert trained["steps"][0].kl == pytest.approx(
        trained["loss_before"], rel=1e-4
    )  # step 1 starts from the base model


def test_saved_adapter_loads_with_peft(trained, model_path):
    from peft import PeftModel

    result = trained["result"]
    out = result.out_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_config.json",
        "metrics.jsonl",
        "training_curve.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "training_curve.png").stat().st_size > 1000
    loaded = PeftModel.from_pretrained(load_model(model_path), str(out)).eval()
    with torch.no_grad():
        expected = batch_losses(trained["model"], trained["batch"], trained["config"]).kl.mean()
        got = batch_losses(loaded, trained["batch"], trained["config"]).kl.mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    record = json.loads((out / "training_config.json").read_text())
    assert TrainConfig.model_validate(record["config"]) == trained["config"]
    assert record["num_pairs"] == 3 and record["model"] == model_path
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert set(m) >= {"step", "epoch", "loss", "kl", "ce", "grad_norm", "lr", "explanation_tokens", "tokens_per_s"}
        assert all(math.isfinite(m[key]) for key in ("loss", "kl", "ce", "grad_norm", "tokens_per_s"))
        assert m["lr"] == pytest.approx(5e-3) and m["explanation_tokens"] > 20


def test_resume_after_interruption_gives_the_uninterrupted_adapter(model_path, pairs_dir, tmp_path):
    # Dropout on, so the restored RNG state matters; 2 steps per epoch, stopping 1 step into epoch 2 (the schedule
    # spans 3 steps); a checkpoint every 2 steps; the interruption comes one step after the checkpoint.
    config = TrainConfig(**SMALL, dropout=0.1, lr=2e-3, batch_size=2, epochs=2, max_steps=3, checkpoint_every=2, seed=3)
    pairs_dir = Path(shutil.copytree(pairs_dir, tmp_path / "pairs"))  # a copy, to which a pair comes late below
    uninterrupted = train(pairs_dir, tmp_path / "a", model_path, config)

    class Killed(Exception):
        pass

    def stop_after_step_3(metrics):
        if metrics.step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(pairs_dir, tmp_path / "b", model_path, config, on_step=stop_after_step_3)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-2"]
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(pairs_dir, tmp_path / "b", model_path, config)
    # Curation was still writing when the run started: a pair that arrives now is not part of the resumed run.
    started_on = (tmp_path / "b" / "pair_ids.txt").read_text().split()
    first = PairStore(pairs_dir).pair_path(started_on[0])
    shutil.copy(first, first.with_name("zz-late.safetensors"))
    resumed = train(pairs_dir, tmp_path / "b", model_path, config, resume=True)
    assert resumed.num_pairs == len(started_on) == uninterrupted.num_pairs

    assert uninterrupted.steps == resumed.steps == 3
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7)
    metrics_a = [json.loads(line) for line in uninterrupted.metrics_path.read_text().splitlines()]
    metrics_b = [json.loads(line) for line in resumed.metrics_path.read_text().splitlines()]
    assert [m["step"] for m in metrics_b] == [1, 2, 3]  # the interrupted run's step 3 is logged once
    assert [m["loss"] for m in metrics_b] == pytest.approx([m["loss"] for m in metrics_a], rel=1e-6)

    changed = config.model_copy(update={"lr": 1e-3})
    with pytest.raises(TrainingError, match="settings changed.*lr"):
        train(pairs_dir, tmp_path / "b", model_path, changed, resume=True)
    # Another base model of the same shape (another fine-tune, or the same path holding other weights): refused.
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(model_path)
    with torch.no_grad():
        other.get_input_embeddings().weight[0] += 0.01
    with pytest.raises(TrainingError, match="trained on another base model"):
        train(pairs_dir, tmp_path / "b", model_path, config, resume=True, model=other)
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        train(pairs_dir, tmp_path / "never-trained", model_path, config, resume=True)


def test_gradient_accumulation_weighs_every_position_the_same(model_path, pairs_dir, tmp_path):
    one_batch = TrainConfig(**SMALL, batch_size=2, grad_accum=1, max_steps=1)
    accumulated = one_batch.model_copy(update={"batch_size": 1, "grad_accum": 2})
    metrics = []
    for name, config in (("one", one_batch), ("accumulated", accumulated)):
        train(pairs_dir, tmp_path / name, model_path, config, on_step=metrics.append)
    first, second = metrics
    assert second.loss == pytest.approx(first.loss, rel=1e-5)
    assert second.grad_norm == pytest.approx(first.grad_norm, rel=1e-4)


def test_online_teacher_step_is_finite(model_path, pairs_dir, tmp_path):
    config = TrainConfig(**{**SMALL, "teacher": "online"}, batch_size=2, max_steps=1)
    metrics = []
    result = train(pairs_dir, tmp_path / "online", model_path, config, on_step=metrics.append)
    assert result.steps == 1 and math.isfinite(result.final_loss)
    # The student starts as the teacher's model but without the hints, so the two differ.
    assert metrics[0].kl > 0 and math.isfinite(metrics[0].grad_norm)


def test_what_before_write_raises_stops_the_run_before_the_steps_files(model_path, pairs_dir, tmp_path):
    """The trainer service's check that its attempt still owns the run: raised before the second step's metrics line
    and checkpoint, the run stops with the first step's files only, and no adapter."""

    class TakenOver(Exception):
        pass

    checks = []

    def before_write():
        checks.append(len(checks) + 1)
        if len(checks) == 2:
            raise TakenOver

    config = TrainConfig(**SMALL, batch_size=2, max_steps=3, checkpoint_every=1)
    with pytest.raises(TakenOver):
        train(pairs_dir, tmp_path / "run", model_path, config, before_write=before_write)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-1"]
    assert not (tmp_path / "run" / "adapter_config.json").exists()


def test_pairs_whose_top_k_are_no_log_probabilities_are_refused_naming_the_pair(pairs_dir, tmp_path):
    store = PairStore(tmp_path / "bad")
    for pair in PairStore(pairs_dir).iter_pairs():
        if pair.record.problem_id == "sub":
            logprobs = [list(row) for row in pair.topk_logprobs]
            logprobs[2][1] = float("nan")
            pair = pair.model_copy(update={"topk_logprobs": logprobs})
        store.write_pair(pair)
    with pytest.raises(PairDataError, match="pair sub: the teacher's top-k at explanation token 2 holds nan"):
        load_examples(store.root)


def test_a_gradient_that_is_not_finite_stops_the_run_before_the_weights_move(model_path, pairs_dir, tmp_path):
    config = TrainConfig(**SMALL, batch_size=3, max_steps=2, checkpoint_every=1)
    model = load_model(model_path)
    steps = []

    def poison_after_the_first_step(metrics):
        steps.append(metrics.step)
        with torch.no_grad():  # what a learning rate far too high would do
            next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("inf"))

    with pytest.raises(TrainingError, match="the gradient is not finite"):
        train(pairs_dir, tmp_path / "run", model_path, config, model=model, on_step=poison_after_the_first_step)
    assert steps == [1]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-1"]
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-1" / "adapter_model.safetensors"))
    assert saved and all(torch.isfinite(weights).all() for weights in saved.values())
    assert not (tmp_path / "run" / "adapter_config.json").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_metrics_cut_short_by_a_kill_lose_only_their_last_line(tmp_path):
    from services.trainer.checkpoints import keep_metrics_through
    from services.trainer.plots import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    keep_metrics_through(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path)


def test_a_checkpoint_save_cut_short_leaves_nothing_half_written(tmp_path):
    """A signal (`ssb train` turns SIGTERM into an exit) or an error while a checkpoint is written removes its
    temporary directory and goes on up; the complete checkpoint before it stays. One process, no model: a stand-in
    for the accelerator and an adapter whose save is interrupted."""
    import types

    from services.trainer.checkpoints import save_checkpoint

    class Interrupted:
        def save_pretrained(self, directory):
            (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    alone = types.SimpleNamespace(is_main_process=True, process_index=0, wait_for_everyone=lambda: None)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-1").mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(checkpoints, 2, Interrupted(), None, None, {}, alone, keep=2)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1"]


def test_data_order_is_a_seeded_permutation_per_epoch():
    config = TrainConfig(batch_size=2, grad_accum=2, seed=5)
    assert count_steps_per_epoch(9, config) == 3
    epoch = [
        i for step in range(3) for micro in micro_batch_indices(9, config, epoch=0, step_in_epoch=step) for i in micro
    ]
    assert sorted(epoch) == list(range(9))
    assert micro_batch_indices(9, config, epoch=0, step_in_epoch=2) == [[epoch[8]]]
    assert micro_batch_indices(9, config, epoch=0, step_in_epoch=0) == micro_batch_indices(
        9, config, epoch=0, step_in_epoch=0
    )
    assert micro_batch_indices(9, config, epoch=1, step_in_epoch=0) != micro_batch_indices(
        9, config, epoch=0, step_in_epoch=0
    )
    # Two processes: equal shares (wrapped around), together covering every example.
    shares = [
        [
            i
            for step in range(count_steps_per_epoch(9, config, 2))
            for micro in micro_batch_indices(9, config, epoch=0, step_in_epoch=step, process_index=p, num_processes=2)
            for i in micro
        ]
        for p in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == 5 and set(shares[0]) | set(shares[1]) == set(range(9))


def test_bfloat16_with_gradient_checkpointing_matches_float32_on_the_first_step(model_path, pairs_dir, tmp_path):
    """A GPU's settings (bfloat16 weights, the decoder recomputed in backward) through the same code on the CPU: the
    first step's loss and gradient norm agree with float32 to bfloat16's precision, and the adapter saves."""
    metrics = {}
    for dtype in ("float32", "bfloat16"):
        checkpointing = dtype == "bfloat16"
        config = TrainConfig(**SMALL, dtype=dtype, gradient_checkpointing=checkpointing, batch_size=1, max_steps=1)
        steps = []
        train(pairs_dir, tmp_path / dtype, model_path, config, on_step=steps.append)
        metrics[dtype] = steps[0]
    assert (tmp_path / "bfloat16" / "adapter_model.safetensors").exists()
    assert metrics["bfloat16"].kl == pytest.approx(metrics["float32"].kl, rel=0.05)
    assert metrics["bfloat16"].grad_norm == pytest.approx(metrics["float32"].grad_norm, rel=0.1)


def test_learning_rate_schedule_never_steps_at_zero_and_is_hf_after_warm_up():
    """15 steps at 10% warm-up (the demo's run): W = 2; the warm-up climbs 1/3, 2/3 of the peak, then HF's cosine."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    factors = [learning_rate_factor(i, warmup_steps=2, total_steps=15, kind="cosine") for i in range(15)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 12 / 13))) and factors[-1] > 0
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))  # decays after the peak
    for kind, reference in (("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        hf = reference(optimizer, num_warmup_steps=2, num_training_steps=15)
        hf_factors = []
        for _ in range(15):
            hf_factors.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            hf.step()
        ours = [learning_rate_factor(i, warmup_steps=2, total_steps=15, kind=kind) for i in range(15)]
        assert hf_factors[0] == 0.0  # what this schedule avoids
        assert ours[2:] == pytest.approx(hf_factors[2:], abs=1e-12), kind
        assert min(ours) > 0, kind
    assert [learning_rate_factor(i, warmup_steps=1, total_steps=3, kind="constant") for i in range(3)] == [0.5, 1, 1]
    assert learning_rate_factor(0, warmup_steps=0, total_steps=1, kind="cosine") == 1.0


def test_teacher_defaults_to_the_exact_one_unless_the_temperature_is_one():
    assert TrainConfig().teacher == "online" and TrainConfig().temperature == 2.0
    assert TrainConfig(temperature=1.0).teacher == "stored"
    assert TrainConfig(temperature=0.5).teacher == "online"
    assert TrainConfig(temperature=1.0, teacher="online").teacher == "online"
    assert TrainConfig(temperature=2.0, teacher="stored").teacher == "stored"
    assert TrainConfig.model_validate(TrainConfig().model_dump(mode="json")) == TrainConfig()
    assert TrainConfig.model_validate({"temperature": "1"}).teacher == "stored"  # resolved after parsing


def test_settings_no_retry_can_mend_are_training_errors(model_path, pairs_dir, tmp_path):
    """LoRA target modules the model lacks end the run with the reason (the trainer service fails such a run at once
    instead of retrying it), and a seed NumPy cannot take is refused with the other settings."""
    config = TrainConfig(**{**SMALL, "target_modules": ("q_projection",)}, max_steps=1)
    with pytest.raises(TrainingError, match="the LoRA adapter cannot be built on .*q_projection"):
        train(pairs_dir, tmp_path / "run", model_path, config, model=load_model(model_path))
    assert not (tmp_path / "run" / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="less than or equal to 4294967295"):
        TrainConfig(seed=2**32)


def test_a_resume_on_other_pairs_under_the_same_ids_is_refused(model_path, pairs_dir, tmp_path):
    """Another curation of the same problems keeps their ids: a run resumed on it would go on training on other
    explanations than it started with, and is refused."""
    config = TrainConfig(**SMALL, batch_size=3, max_steps=2, checkpoint_every=1)

    def stop_after_step_1(metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(pairs_dir, tmp_path / "run", model_path, config, model=load_model(model_path), on_step=stop_after_step_1)
    other = PairStore(shutil.copytree(pairs_dir, tmp_path / "other"))
    pair = other.load_pair(other.pair_ids()[0])
    other.pair_path(pair.record.problem_id).unlink()
    other.write_pair(pair.model_copy(update={"token_ids": [*pair.token_ids[:-1], pair.token_ids[-1] + 1]}))
    with pytest.raises(TrainingError, match="holds other pairs than it was trained on"):
        train(other.root, tmp_path / "run", model_path, config, model=load_model(model_path), resume=True)
    # A checkpoint of an earlier version, without the contents' digest, is compared by the pairs' ids alone.
    state_path = tmp_path / "run" / "checkpoints" / "step-1" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({name: value for name, value in state.items() if name != "pairs_content"}))
    resumed = train(pairs_dir, tmp_path / "run", model_path, config, model=load_model(model_path), resume=True)
    assert resumed.steps == 2


def test_a_run_clears_what_an_attempt_left_before_its_first_checkpoint_and_holds_its_directory(
    model_path, pairs_dir, tmp_path
):
    """An attempt killed before its first checkpoint (here mid-write of it) blocked every new run there; the run now
    clears what it left, and only that, and trains. While a run trains, its directory is its own: another is refused
    (it would clear or overwrite the first's files)."""
    from services.trainer.inputs import claimed_output_dir

    out = tmp_path / "run"
    (out / "checkpoints" / ".step-1.tmp").mkdir(parents=True)
    for name in ("metrics.jsonl", "pair_ids.txt", "training_config.json", "notes.txt"):
        (out / name).write_text("left\n")
    config = TrainConfig(**SMALL, batch_size=3, max_steps=1)
    with claimed_output_dir(out):
        with pytest.raises(TrainingError, match=f"{out} is in use by another training run"):
            train(pairs_dir, out, model_path, config, model=load_model(model_path))
    assert (out / "metrics.jsonl").read_text() == "left\n"
    result = train(pairs_dir, out, model_path, config, model=load_model(model_path))
    assert result.steps == 1 and (out / "notes.txt").read_text() == "left\n"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "checkpoints").exists() and (out / "adapter_config.json").is_file()
    # The trainer service keeps its attempts apart by their records: an attempt that takes a stalled one over
    # resumes while the stalled one, still holding the directory, runs on until its next write.
    with claimed_output_dir(tmp_path / "service-run"):
        taken_over = train(pairs_dir, tmp_path / "service-run", model_path, config, model=load_model(model_path),
                           hold_output_dir=False)
    assert taken_over.steps == 1
