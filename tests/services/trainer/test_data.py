"""Training examples and batches: the teacher's top-k and the targets sit where the student predicts each token."""

import pytest
import torch

from services.trainer.data import PairDataError, build_example, check_vocabulary, collate_examples, load_examples
from shared.schemas import Pair, PairRecord, RenderedPrompt, SamplingSettings
from shared.storage import PairStore


def make_pair(problem_id="p", prompt=(11, 12, 13), explanation=(21, 22, 23, 24), k=2, teacher_prompt=(31, 32)) -> Pair:
    record = PairRecord(
        problem_id=problem_id,
        question="q",
        gold="1",
        rollouts=[],
        correct_hint_index=0,
        incorrect_hint_index=1,
        prompt_version="v",
        teacher_prompt=RenderedPrompt(messages=[], text="t", token_ids=list(teacher_prompt)),
        student_prompt=RenderedPrompt(messages=[], text="s", token_ids=list(prompt)),
        explanation="e",
        explanation_extracted="1",
        model="m",
        rollout_sampling=SamplingSettings(),
        explanation_sampling=SamplingSettings(logprobs=k),
        topk=k,
    )
    # Row t of the teacher signal is recognisable: ids (100 t, 100 t + 1, ...), log-probabilities -(t + 1).
    return Pair(
        record=record,
        token_ids=list(explanation),
        topk_ids=[[100 * t + j for j in range(k)] for t in range(len(explanation))],
        topk_logprobs=[[-(t + 1.0)] * k for t in range(len(explanation))],
    )


def test_positions_line_up_with_the_shift():
    example = build_example(make_pair())
    batch = collate_examples([example], pad_id=0)
    prompt_length, explanation = 3, [21, 22, 23, 24]
    assert batch.input_ids[0].tolist() == [11, 12, 13, *explanation]
    # Position P - 1 + t predicts explanation token t and holds the teacher's top-k of step t.
    assert batch.loss_mask[0].tolist() == [False, False, True, True, True, True, False]
    for t, token in enumerate(explanation):
        s = prompt_length - 1 + t
        assert batch.target_ids[0, s] == token == batch.input_ids[0, s + 1]
        assert batch.topk_ids[0, s].tolist() == [100 * t, 100 * t + 1]
        assert batch.topk_logprobs[0, s].tolist() == [-(t + 1.0)] * 2
    assert batch.num_explanation_tokens == 4 and batch.num_tokens == 7
    assert batch.teacher_input_ids is None


def test_padding_is_right_side_and_masked():
    short = build_example(make_pair("a", prompt=(5,), explanation=(6, 7)))
    long = build_example(make_pair("b"))
    batch = collate_examples([short, long], pad_id=9)
    assert batch.input_ids.shape == (2, 7) and batch.topk_ids.shape == (2, 7, 2)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 9, 9, 9, 9]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch.loss_mask[0].tolist() == [True, True, False, False, False, False, False]
    assert batch.target_ids[0, :2].tolist() == [6, 7]
    assert torch.isfinite(batch.topk_logprobs).all()
    assert batch.topk_ids[0, 2:].eq(0).all() and batch.topk_logprobs[0, 2:].eq(0).all()


def test_online_teacher_positions_pair_with_the_students():
    pairs = [make_pair("a", explanation=(6, 7), teacher_prompt=(40, 41, 42, 43)), make_pair("b")]
    batch = collate_examples([build_example(p, teacher="online") for p in pairs], pad_id=0)
    assert batch.topk_ids.shape[-1] == 0  # the stored signal is not used
    assert batch.teacher_input_ids[0].tolist() == [40, 41, 42, 43, 6, 7]
    assert batch.teacher_loss_mask[0].tolist() == [False, False, False, True, True, False]
    assert batch.teacher_loss_mask[1].tolist() == [False, True, True, True, True, False]
    assert batch.teacher_loss_mask.sum(1).tolist() == batch.loss_mask.sum(1).tolist()
    # The tokens predicted at the teacher's masked positions are the student's targets, in the same order.
    teacher_next = batch.teacher_input_ids[:, 1:][batch.teacher_loss_mask[:, :-1]]
    assert teacher_next.tolist() == batch.target_ids[batch.loss_mask].tolist()


def test_load_examples_in_id_order(tmp_path):
    store = PairStore(tmp_path)
    for name in ("b", "a", "c"):
        store.write_pair(make_pair(name))
    assert [e.problem_id for e in load_examples(tmp_path)] == ["a", "b", "c"]
    # The pairs a resumed run started on, and only those; one that is gone is named.
    assert [e.problem_id for e in load_examples(tmp_path, problem_ids=["c", "a"])] == ["a", "c"]
    with pytest.raises(PairDataError, match="pairs that are gone: gone"):
        load_examples(tmp_path, problem_ids=["a", "gone"])


def test_clear_errors(tmp_path):
    with pytest.raises(PairDataError, match="no pairs/ directory"):
        load_examples(tmp_path / "missing")
    (tmp_path / "empty" / "pairs").mkdir(parents=True)
    with pytest.raises(PairDataError, match=f"{tmp_path / 'empty'}.*no pairs"):
        load_examples(tmp_path / "empty")

    store = PairStore(tmp_path / "mixed")
    store.write_pair(make_pair("a", k=2))
    store.write_pair(make_pair("b", k=3))
    with pytest.raises(PairDataError, match="different top-k widths: 2 .*a.*, 3 .*b"):
        load_examples(store.root)
    assert len(load_examples(store.root, teacher="online")) == 2  # the online teacher ignores the stored widths

    no_signal = make_pair("n").model_copy(update={"topk_ids": [], "topk_logprobs": []})
    with pytest.raises(PairDataError, match="online teacher"):
        build_example(no_signal)
    with pytest.raises(PairDataError, match="explanation has no tokens"):
        build_example(make_pair(explanation=()))
    with pytest.raises(PairDataError, match="outside the model's vocabulary"):
        check_vocabulary([build_example(make_pair())], vocab_size=50)
    check_vocabulary([build_example(make_pair())], vocab_size=1000)
