"""Training examples from stored pairs, without re-tokenizing, and the collate function that batches them.

The student reads its rendered prompt (system prompt + bare question, P tokens, the chat template's assistant turn
opened) followed by the explanation's T stored token ids. A causal LM's output at position s predicts token s + 1,
so the explanation's token t (at input position P + t) is predicted at position P - 1 + t: the loss mask, the
teacher's top-k at step t and the target id t all sit at positions P - 1 .. P + T - 2. The last input token (the final
explanation token) predicts nothing that is trained. The online teacher's input is laid out the same way after the
stored hinted prompt.

    examples = load_examples("runs/demo/pairs", teacher="stored")
    batch = collate_examples(examples[:4], pad_id=0)   # Batch of (B, S) and (B, S, k) tensors
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from services.trainer.inputs import PairDataError, pair_store
from shared.schemas import Pair


@dataclass(frozen=True)
class TrainExample:
    """One pair as token ids and teacher arrays. T explanation tokens, k stored top-k width.

    input_ids: (P + T,) int64, student prompt then explanation.
    topk_ids: (T, k) int64 and topk_logprobs: (T, k) float32, the stored teacher signal (k = 0 with the online teacher).
    teacher_input_ids: (P_t + T,) int64, hinted prompt then explanation; None unless the teacher is online.
    """

    problem_id: str
    input_ids: torch.Tensor
    prompt_length: int
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    teacher_input_ids: torch.Tensor | None = None
    teacher_prompt_length: int | None = None

    @property
    def explanation_length(self) -> int:
        return self.input_ids.shape[0] - self.prompt_length


@dataclass(frozen=True)
class Batch:
    """A padded batch (right padding). B examples, S longest student input, S_t longest teacher input, k top-k width.

    input_ids, attention_mask: (B, S) int64; padding has attention 0.
    loss_mask: (B, S) bool, True at the positions that predict an explanation token.
    target_ids: (B, S) int64, the explanation token predicted at each masked position (pad id elsewhere).
    topk_ids: (B, S, k) int64, topk_logprobs: (B, S, k) float32, the teacher's top-k at each masked position
        (id 0 and log-probability 0 elsewhere, which the mask keeps out of the loss).
    teacher_input_ids, teacher_attention_mask, teacher_loss_mask: (B, S_t), only for the online teacher; the
        teacher's masked positions pair one to one, in order, with the student's.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    target_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    teacher_input_ids: torch.Tensor | None = None
    teacher_attention_mask: torch.Tensor | None = None
    teacher_loss_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{name: None if t is None else t.to(device, non_blocking=True) for name, t in moved.items()})

    @property
    def num_tokens(self) -> int:
        """Non-padding student tokens in the batch."""
        return int(self.attention_mask.sum())

    @property
    def num_explanation_tokens(self) -> int:
        """Explanation tokens in the batch (positions the loss is taken on)."""
        return int(self.loss_mask.sum())


def build_example(pair: Pair, *, teacher: Literal["stored", "online"] = "stored") -> TrainExample:
    """One pair as a training example; raises PairDataError when it cannot be trained on."""
    record = pair.record
    name = record.problem_id
    prompt = record.student_prompt.token_ids
    explanation = pair.token_ids
    if not prompt:
        raise PairDataError(f"pair {name}: the student prompt has no tokens")
    if not explanation:
        raise PairDataError(f"pair {name}: the explanation has no tokens")
    k = len(pair.topk_ids[0]) if pair.topk_ids else 0
    topk_ids = torch.tensor(pair.topk_ids, dtype=torch.int64).reshape(len(pair.topk_ids), k)
    topk_logprobs = torch.tensor(pair.topk_logprobs, dtype=torch.float32).reshape(len(pair.topk_logprobs), k)
    if topk_ids.shape != topk_logprobs.shape:
        raise PairDataError(
            f"pair {name}: top-k ids {tuple(topk_ids.shape)} and log-probabilities {tuple(topk_logprobs.shape)} differ"
        )
    if teacher == "stored" and (topk_ids.shape[0] != len(explanation) or topk_ids.shape[1] == 0):
        raise PairDataError(
            f"pair {name}: {len(explanation)} explanation tokens but a stored teacher signal of shape "
            f"{tuple(topk_ids.shape)}; train with the online teacher, or curate with top-k log-probabilities"
        )
    # NaN, or above 0 (past rounding), is no log-probability; -inf is a token the teacher gives no chance.
    bad = torch.isnan(topk_logprobs) | (topk_logprobs > 1e-3)
    if teacher == "stored" and bool(bad.any()):
        position = int(bad.any(dim=1).nonzero()[0])
        raise PairDataError(
            f"pair {name}: the teacher's top-k at explanation token {position} holds "
            f"{topk_logprobs[position][bad[position]][0].item()}, not a log-probability"
        )
    teacher_ids = teacher_prompt_length = None
    if teacher == "online":
        # The online teacher replaces the stored signal, whatever its width (or absence).
        topk_ids = torch.zeros((len(explanation), 0), dtype=torch.int64)
        topk_logprobs = torch.zeros((len(explanation), 0), dtype=torch.float32)
        if not record.teacher_prompt.token_ids:
            raise PairDataError(f"pair {name}: the teacher prompt has no tokens")
        teacher_ids = torch.tensor(record.teacher_prompt.token_ids + explanation, dtype=torch.int64)
        teacher_prompt_length = len(record.teacher_prompt.token_ids)
    return TrainExample(
        problem_id=name,
        input_ids=torch.tensor(prompt + explanation, dtype=torch.int64),
        prompt_length=len(prompt),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        teacher_input_ids=teacher_ids,
        teacher_prompt_length=teacher_prompt_length,
    )


def load_examples(
    pairs_dir: str | Path,
    *,
    teacher: Literal["stored", "online"] = "stored",
    problem_ids: Sequence[str] | None = None,
) -> list[TrainExample]:
    """Every pair of a curation output directory (or only those of `problem_ids`: the pairs a resumed run started
    on), in problem-id order, as training examples.

    Raises PairDataError for a directory without pairs, a pair of `problem_ids` that is gone, a pair that cannot be
    trained on (`build_example`: no tokens, a stored top-k of the wrong shape or with values that are no
    log-probabilities), or top-k widths that differ between pairs (one run trains on one width).
    """
    store = pair_store(pairs_dir)
    if problem_ids is None:
        problem_ids = store.pair_ids()
    else:
        missing = [problem_id for problem_id in problem_ids if not store.pair_path(problem_id).exists()]
        if missing:
            raise PairDataError(f"{store.root}: the run trained on pairs that are gone: {', '.join(missing[:5])}")
    examples = [build_example(store.load_pair(problem_id), teacher=teacher) for problem_id in sorted(problem_ids)]
    if teacher == "stored":
        widths = {e.topk_ids.shape[1]: e.problem_id for e in examples}
        if len(widths) > 1:
            seen = ", ".join(f"{k} (e.g. pair {pid})" for k, pid in sorted(widths.items()))
            raise PairDataError(f"{store.root}: pairs have different top-k widths: {seen}; one run needs one width")
    return examples


def check_vocabulary(examples: Sequence[TrainExample], vocab_size: int) -> None:
    """Raise PairDataError when a token id is outside the model's vocabulary (pairs curated with another model)."""
    for e in examples:
        tensors = [e.input_ids, e.topk_ids] + ([e.teacher_input_ids] if e.teacher_input_ids is not None else [])
        largest = max(int(t.max()) for t in tensors if t.numel())
        if largest >= vocab_size:
            raise PairDataError(
                f"pair {e.problem_id}: token id {largest} is outside the model's vocabulary ({vocab_size}); "
                "were these pairs curated with another model?"
            )


def collate_examples(examples: Sequence[TrainExample], pad_id: int = 0) -> Batch:
    """Pad examples to the batch's longest input (right padding) and place the loss arrays (see module docstring)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    widths = {e.topk_ids.shape[1] for e in examples}
    if len(widths) > 1:
        raise PairDataError(f"examples have different top-k widths {sorted(widths)}")
    k = widths.pop()
    batch_size = len(examples)
    length = max(e.input_ids.shape[0] for e in examples)
    input_ids = torch.full((batch_size, length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.int64)
    loss_mask = torch.zeros((batch_size, length), dtype=torch.bool)
    target_ids = torch.full((batch_size, length), pad_id, dtype=torch.int64)
    topk_ids = torch.zeros((batch_size, length, k), dtype=torch.int64)
    topk_logprobs = torch.zeros((batch_size, length, k), dtype=torch.float32)
    for row, e in enumerate(examples):
        n, start, stop = e.input_ids.shape[0], e.prompt_length - 1, e.input_ids.shape[0] - 1
        input_ids[row, :n] = e.input_ids
        attention_mask[row, :n] = 1
        loss_mask[row, start:stop] = True
        target_ids[row, start:stop] = e.input_ids[e.prompt_length :]
        topk_ids[row, start:stop] = e.topk_ids
        topk_logprobs[row, start:stop] = e.topk_logprobs

    teacher = {}
    if all(e.teacher_input_ids is not None for e in examples):
        teacher_length = max(e.teacher_input_ids.shape[0] for e in examples)
        teacher_ids = torch.full((batch_size, teacher_length), pad_id, dtype=torch.int64)
        teacher_attention = torch.zeros((batch_size, teacher_length), dtype=torch.int64)
        teacher_loss_mask = torch.zeros((batch_size, teacher_length), dtype=torch.bool)
        for row, e in enumerate(examples):
            n = e.teacher_input_ids.shape[0]
            teacher_ids[row, :n] = e.teacher_input_ids
            teacher_attention[row, :n] = 1
            teacher_loss_mask[row, e.teacher_prompt_length - 1 : n - 1] = True
        teacher = dict(
            teacher_input_ids=teacher_ids, teacher_attention_mask=teacher_attention, teacher_loss_mask=teacher_loss_mask
        )
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        target_ids=target_ids,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        **teacher,
    )
