"""Unit tests for services/trainer/losses.py: hand-computed KL values, top-k vs dense parity, chunked vs plain
parity, masking, numerical edge cases, and the chunked loss's saved-for-backward memory.

Run: python -m pytest tests/services/trainer/test_losses.py
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from services.trainer.losses import (
    LossSum,
    OutputLayer,
    ce_chunked,
    kl_dense,
    kl_dense_chunked,
    kl_on_topk,
    kl_on_topk_chunked,
)

TEMPERATURES = [1.0, 2.0]


def _one_position(values: list[float]) -> torch.Tensor:
    """(1, 1, n) float32 tensor from a list."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1)


def _all_true(b: int = 1, s: int = 1) -> torch.Tensor:
    return torch.ones(b, s, dtype=torch.bool)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


# --- hand-computed values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_three_token_kl_matches_hand_computation(temperature: float) -> None:
    teacher = [0.7, 0.2, 0.1]
    z = [1.0, 0.5, -1.0]
    if temperature == 1.0:
        norm = math.exp(1.0) + math.exp(0.5) + math.exp(-1.0)
        student = [math.exp(1.0) / norm, math.exp(0.5) / norm, math.exp(-1.0) / norm]
        expected = 1.0 * (
            0.7 * (math.log(0.7) - math.log(student[0]))
            + 0.2 * (math.log(0.2) - math.log(student[1]))
            + 0.1 * (math.log(0.1) - math.log(student[2]))
        )
    else:  # T = 2: teacher p^(1/2) renormalised, student softmax(z / 2), times T^2 = 4
        t_norm = math.sqrt(0.7) + math.sqrt(0.2) + math.sqrt(0.1)
        teacher_t = [math.sqrt(0.7) / t_norm, math.sqrt(0.2) / t_norm, math.sqrt(0.1) / t_norm]
        s_norm = math.exp(0.5) + math.exp(0.25) + math.exp(-0.5)
        student_t = [math.exp(0.5) / s_norm, math.exp(0.25) / s_norm, math.exp(-0.5) / s_norm]
        expected = 4.0 * sum(p * (math.log(p) - math.log(q)) for p, q in zip(teacher_t, student_t))

    logprobs = _one_position([math.log(p) for p in teacher])
    ids = torch.tensor([[[0, 1, 2]]])
    sparse = kl_on_topk(_one_position(z), ids, logprobs, _all_true(), temperature)
    dense = kl_dense(_one_position(z), logprobs, _all_true(), temperature)
    assert sparse.total.item() == pytest.approx(expected, abs=1e-6)
    assert dense.total.item() == pytest.approx(expected, abs=1e-6)
    assert sparse.count.item() == 1


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_top2_of_4_with_tail_bucket_matches_hand_computation(temperature: float) -> None:
    # Teacher knows tokens 0 and 1 (0.6, 0.3); the tail {2, 3} holds r = 0.1.
    z = [2.0, 1.0, 0.0, -1.0]
    q = _softmax(z)  # student at T = 1
    if temperature == 1.0:
        expected = _kl([0.6, 0.3, 0.1], [q[0], q[1], q[2] + q[3]])
    else:
        s = _softmax([x / 2.0 for x in z])  # student at T = 2: exact, tail bucket = s2 + s3
        # Teacher tail shaped like the student's: p_j = r q_j / Q, so W = (r / Q)^(1/2) (q2^(1/2) + q3^(1/2)).
        tail_weight = math.sqrt(0.1 / (q[2] + q[3])) * (math.sqrt(q[2]) + math.sqrt(q[3]))
        norm = math.sqrt(0.6) + math.sqrt(0.3) + tail_weight
        teacher_t = [math.sqrt(0.6) / norm, math.sqrt(0.3) / norm, tail_weight / norm]
        expected = 4.0 * _kl(teacher_t, [s[0], s[1], s[2] + s[3]])

    got = kl_on_topk(
        _one_position(z), torch.tensor([[[0, 1]]]), _one_position([math.log(0.6), math.log(0.3)]), _all_true(),
        temperature,
    )
    assert got.total.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0])
def test_topk_equals_dense_when_teacher_tail_has_student_shape(temperature: float) -> None:
    z = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    q = torch.softmax(z, dim=-1)
    tail = torch.tensor([2, 3, 4])
    teacher = torch.tensor([0.6, 0.3, 0.0, 0.0, 0.0])
    teacher[tail] = 0.1 * q[tail] / q[tail].sum()
    dense = kl_dense(z.reshape(1, 1, -1), teacher.log().reshape(1, 1, -1), _all_true(), temperature)
    sparse = kl_on_topk(
        z.reshape(1, 1, -1), torch.tensor([[[1, 0]]]), _one_position([math.log(0.3), math.log(0.6)]),
        _all_true(), temperature,
    )
    assert sparse.total.item() == pytest.approx(dense.total.item(), abs=1e-5)  # float32 noise times T^2


# --- parity ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_topk_with_k_equal_vocab_equals_dense_in_value_and_gradient(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    b, s, v = 2, 4, 7
    teacher_logits = 3.0 * torch.randn(b, s, v, generator=gen)
    student_logits = (3.0 * torch.randn(b, s, v, generator=gen)).requires_grad_()
    mask = torch.tensor([[True, True, False, True], [False, True, True, False]])
    topk_logprobs, topk_ids = torch.log_softmax(teacher_logits, dim=-1).topk(v, dim=-1)

    sparse = kl_on_topk(student_logits, topk_ids, topk_logprobs, mask, temperature)
    (sparse_grad,) = torch.autograd.grad(sparse.mean(), student_logits)
    dense = kl_dense(student_logits, teacher_logits, mask, temperature)
    (dense_grad,) = torch.autograd.grad(dense.mean(), student_logits)

    assert sparse.count.item() == dense.count.item() == 5
    assert sparse.total.item() == pytest.approx(dense.total.item(), abs=1e-5)
    torch.testing.assert_close(sparse_grad, dense_grad, atol=1e-5, rtol=0)
    assert dense.total.item() > 0.1  # the case is not trivially zero


def test_topk_is_invariant_to_vocabulary_order() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 9, generator=gen)
    ids = torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(3)]).unsqueeze(0)
    logprobs = torch.log_softmax(torch.randn(1, 3, 9, generator=gen), dim=-1).gather(-1, ids)
    perm = torch.randperm(9, generator=gen)  # new id of old token i is perm[i]
    permuted_logits = torch.empty_like(logits)
    permuted_logits[..., perm] = logits
    mask = _all_true(1, 3)
    base = kl_on_topk(logits, ids, logprobs, mask)
    permuted = kl_on_topk(permuted_logits, perm[ids], logprobs, mask)
    assert permuted.total.item() == pytest.approx(base.total.item(), rel=1e-5)  # the sum's order moves the last bits


def _chunk_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, s, h, v, k = 2, 5, 6, 11, 4
    hidden = torch.randn(b, s, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    mask = torch.tensor([[True, True, True, False, False], [False, True, True, True, True]])  # N = 7
    teacher_hidden = torch.randn(b, s, h, generator=gen)
    topk_logprobs, topk_ids = torch.log_softmax(teacher_hidden @ weight.T, dim=-1).topk(k, dim=-1)
    targets = torch.randint(0, v, (b, s), generator=gen)
    return hidden, weight, mask, teacher_hidden, topk_ids, topk_logprobs, targets


def _value_and_grads(fn, hidden: torch.Tensor, weight: torch.Tensor):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    result = fn(hidden, weight)
    assert isinstance(result, LossSum)
    grads = torch.autograd.grad(result.mean(), (hidden, weight))
    return result.total.detach(), result.count, grads


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_chunked_losses_match_plain_in_value_and_gradients(chunk_size: int) -> None:
    hidden, weight, mask, teacher_hidden, ids, logprobs, targets = _chunk_case()
    pairs = {
        "topk": (
            lambda h, w: kl_on_topk(h @ w.T, ids, logprobs, mask, 2.0),
            lambda h, w: kl_on_topk_chunked(h, w, ids, logprobs, mask, 2.0, chunk_size),
        ),
        "dense": (
            lambda h, w: kl_dense(h @ w.T, teacher_hidden @ w.T, mask, 2.0),
            lambda h, w: kl_dense_chunked(h, teacher_hidden, w, mask, 2.0, chunk_size),
        ),
        "ce": (
            lambda h, w: LossSum(
                torch.nn.functional.cross_entropy((h @ w.T)[mask], targets[mask], reduction="sum"), mask.sum()
            ),
            lambda h, w: ce_chunked(h, w, targets, mask, chunk_size),
        ),
    }
    for name, (plain_fn, chunked_fn) in pairs.items():
        plain_total, plain_count, plain_grads = _value_and_grads(plain_fn, hidden, weight)
        total, count, grads = _value_and_grads(chunked_fn, hidden, weight)
        assert count.item() == plain_count.item() == 7, name
        assert total.item() == pytest.approx(plain_total.item(), abs=1e-5), name
        for got, want in zip(grads, plain_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_output_layer_applies_bias_then_scale_then_softcap_by_hand() -> None:
    # hidden [1, 2] through W (3, 2): products [1, 2, 3]; plus the bias [1, 0, -2]: [2, 2, 1]; times 0.5:
    # [1, 1, 0.5]; soft-capped at 1: tanh of each.
    hidden = torch.tensor([[1.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    bias = torch.tensor([1.0, 0.0, -2.0])
    assert OutputLayer(weight).logits(hidden).tolist() == [[1.0, 2.0, 3.0]]
    assert OutputLayer(weight, bias).logits(hidden).tolist() == [[2.0, 2.0, 1.0]]
    assert OutputLayer(weight, bias, scale=0.5).logits(hidden).tolist() == [[1.0, 1.0, 0.5]]
    capped = OutputLayer(weight, bias, scale=0.5, softcap=1.0).logits(hidden)
    torch.testing.assert_close(capped, torch.tensor([[math.tanh(1.0), math.tanh(1.0), math.tanh(0.5)]]))


@pytest.mark.parametrize("chunk_size", [2, 100])
def test_chunked_losses_through_a_scaled_soft_capped_output_layer_match_plain(chunk_size: int) -> None:
    """Value and gradient (hidden and weight) with bias, scale and soft-cap, against autograd on the plain losses."""
    hidden, weight, mask, teacher_hidden, ids, logprobs, targets = _chunk_case(seed=5)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(6))

    def layer(w: torch.Tensor) -> OutputLayer:
        return OutputLayer(w, bias, scale=0.7, softcap=1.5)

    pairs = {
        "topk": (
            lambda h, w: kl_on_topk(layer(w).logits(h), ids, logprobs, mask, 2.0),
            lambda h, w: kl_on_topk_chunked(h, layer(w), ids, logprobs, mask, 2.0, chunk_size),
        ),
        "dense": (
            lambda h, w: kl_dense(layer(w).logits(h), layer(w).logits(teacher_hidden).detach(), mask, 2.0),
            lambda h, w: kl_dense_chunked(h, teacher_hidden, layer(w), mask, 2.0, chunk_size),
        ),
        "ce": (
            lambda h, w: LossSum(
                torch.nn.functional.cross_entropy(layer(w).logits(h)[mask], targets[mask], reduction="sum"),
                mask.sum(),
            ),
            lambda h, w: ce_chunked(h, layer(w), targets, mask, chunk_size),
        ),
    }
    for name, (plain_fn, chunked_fn) in pairs.items():
        plain_total, _, plain_grads = _value_and_grads(plain_fn, hidden, weight)
        total, _, grads = _value_and_grads(chunked_fn, hidden, weight)
        assert total.item() == pytest.approx(plain_total.item(), abs=1e-5), name
        for got, want in zip(grads, plain_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_chunked_loss_with_a_frozen_output_layer_gives_the_hidden_gradient_only() -> None:
    """The trainer's case: the output weight does not train; the hidden rows' gradient still matches the plain loss,
    scaled by whatever multiplies the loss afterwards."""
    hidden, weight, mask, _, ids, logprobs, _ = _chunk_case(seed=3)
    plain_hidden = hidden.clone().requires_grad_()
    (3.5 * kl_on_topk(plain_hidden @ weight.T, ids, logprobs, mask).total).backward()
    chunked_hidden = hidden.clone().requires_grad_()
    (3.5 * kl_on_topk_chunked(chunked_hidden, weight, ids, logprobs, mask, chunk_size=2).total).backward()
    assert weight.grad is None
    torch.testing.assert_close(chunked_hidden.grad, plain_hidden.grad, atol=1e-5, rtol=1e-5)


def test_dense_chunked_pairs_rows_through_a_separate_teacher_mask() -> None:
    hidden, weight, mask, teacher_hidden, *_ = _chunk_case()
    # The teacher's prompt is two positions longer: its explanation rows sit two places later.
    shifted = torch.cat([torch.randn(2, 2, hidden.shape[-1]), teacher_hidden], dim=1)
    shifted_mask = torch.cat([torch.zeros(2, 2, dtype=torch.bool), mask], dim=1)
    aligned = kl_dense_chunked(hidden, teacher_hidden, weight, mask, 2.0, chunk_size=3)
    offset = kl_dense_chunked(hidden, shifted, weight, mask, 2.0, chunk_size=3, teacher_mask=shifted_mask)
    assert offset.total.item() == pytest.approx(aligned.total.item(), abs=1e-6)
    with pytest.raises(ValueError):
        kl_dense_chunked(hidden, teacher_hidden, weight, mask, 2.0, teacher_mask=torch.ones_like(mask))


def test_chunked_accepts_bfloat16_and_sums_in_float32() -> None:
    hidden, weight, mask, _, ids, logprobs, _ = _chunk_case()
    plain = kl_on_topk_chunked(hidden, weight, ids, logprobs, mask, chunk_size=2)
    low = kl_on_topk_chunked(hidden.bfloat16(), weight.bfloat16(), ids, logprobs, mask, chunk_size=2)
    assert low.total.dtype == torch.float32
    assert low.total.item() == pytest.approx(plain.total.item(), rel=0.05)


# --- masking -----------------------------------------------------------------------------------------------------


def test_masked_positions_do_not_contribute() -> None:
    hidden, weight, mask, teacher_hidden, ids, logprobs, targets = _chunk_case()
    logits = hidden @ weight.T
    garbage_logits, garbage_ids, garbage_logprobs = logits.clone(), ids.clone(), logprobs.clone()
    garbage_logits[~mask] = float("nan")
    garbage_ids[~mask] = 0  # duplicate ids on padding must not matter either
    garbage_logprobs[~mask] = float("nan")
    clean = kl_on_topk(logits, ids, logprobs, mask)
    dirty = kl_on_topk(garbage_logits, garbage_ids, garbage_logprobs, mask)
    assert dirty.total.item() == pytest.approx(clean.total.item(), abs=1e-6)
    garbage_teacher = teacher_hidden @ weight.T
    garbage_teacher[~mask] = float("nan")
    assert kl_dense(garbage_logits, garbage_teacher, mask).total.item() == pytest.approx(
        kl_dense(logits, teacher_hidden @ weight.T, mask).total.item(), abs=1e-6
    )


def test_all_masked_batch_gives_zero_and_finite_gradients() -> None:
    hidden, weight, mask, teacher_hidden, ids, logprobs, targets = _chunk_case()
    none = torch.zeros_like(mask)
    cases = {
        "topk": lambda h, w: kl_on_topk(h @ w.T, ids, logprobs, none),
        "dense": lambda h, w: kl_dense(h @ w.T, teacher_hidden @ w.T, none, 2.0),
        "topk_chunked": lambda h, w: kl_on_topk_chunked(h, w, ids, logprobs, none, chunk_size=2),
        "dense_chunked": lambda h, w: kl_dense_chunked(h, teacher_hidden, w, none, chunk_size=2),
        "ce_chunked": lambda h, w: ce_chunked(h, w, targets, none, chunk_size=2),
    }
    for name, fn in cases.items():
        total, count, grads = _value_and_grads(fn, hidden, weight)
        assert total.item() == 0.0 and count.item() == 0, name
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads), name


# --- numerical edge cases --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "teacher_logprobs",
    [
        [math.log(0.9), math.log(0.1000001)],  # known mass rounds above 1: tail clamps to 0
        [0.0, -math.inf],  # all mass on one token, an impossible second one
        [-1e30, -1e30],  # known tokens carry nothing: all mass in the tail
        [-0.1053605, -2.3025851],  # stored logprobs that sum to 1 within float32 noise
    ],
)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_topk_is_finite_at_extreme_teacher_and_student(teacher_logprobs: list[float], temperature: float) -> None:
    for z in ([2.0, 1.0, 0.0, -1.0, 0.5], [1e4, -1e4, -1e4, -1e4, 0.0], [-1e4, 1e4, 0.0, 0.0, 0.0]):
        logits = _one_position(z).requires_grad_()
        result = kl_on_topk(logits, torch.tensor([[[0, 1]]]), _one_position(teacher_logprobs), _all_true(),
                            temperature)
        (grad,) = torch.autograd.grad(result.mean(), logits)
        assert torch.isfinite(result.total) and result.total.item() >= -1e-6, (teacher_logprobs, z)
        assert torch.isfinite(grad).all(), (teacher_logprobs, z)


def test_zero_kl_when_student_matches_teacher_exactly() -> None:
    logits = torch.tensor([3.0, 1.0, 0.0, -2.0, -2.5, 0.3]).reshape(1, 1, -1)
    logprobs, ids = torch.log_softmax(logits, dim=-1).topk(3, dim=-1)
    for temperature in (0.7, 1.0, 2.0):
        assert kl_on_topk(logits, ids, logprobs, _all_true(), temperature).total.item() == pytest.approx(0, abs=1e-6)


def test_rejects_bad_arguments() -> None:
    hidden, weight, mask, _, ids, logprobs, _ = _chunk_case()
    with pytest.raises(ValueError):
        kl_on_topk(hidden @ weight.T, ids, logprobs, mask, temperature=0.0)
    with pytest.raises(ValueError):
        kl_on_topk_chunked(hidden, weight, ids, logprobs, mask, chunk_size=0)
    with pytest.raises(ValueError):
        kl_on_topk(hidden @ weight.T, ids[:, :-1], logprobs[:, :-1], mask)


# --- memory ------------------------------------------------------------------------------------------------------


def _largest_saved_numel(fn) -> int:
    """Run fn() under a hook that sees every tensor autograd saves; return the largest numel of those still held
    for backward when fn() returns (a graph built and dropped inside the forward keeps nothing)."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.numel(), weakref.ref(tensor)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    gc.collect()
    held = max([numel for numel, ref in saved if ref() is not None], default=0)
    result.mean().backward()  # the graph built under the hook still runs
    return held


def test_chunked_topk_saves_no_logits_sized_tensor_for_backward() -> None:
    gen = torch.Generator().manual_seed(2)
    b, s, h, v, k, chunk = 2, 8, 2, 1000, 5, 4
    hidden = torch.randn(b, s, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, :2] = False  # N = 14
    logprobs, ids = torch.log_softmax(torch.randn(b, s, v, generator=gen), dim=-1).topk(k, dim=-1)
    n = int(mask.sum())

    plain = _largest_saved_numel(lambda: kl_on_topk(hidden @ weight.T, ids, logprobs, mask))
    assert plain >= n * v  # the probe does see the plain loss keep N x V values

    for fn in (
        lambda: kl_on_topk_chunked(hidden, weight, ids, logprobs, mask, chunk_size=chunk),
        lambda: kl_dense_chunked(hidden, torch.randn(b, s, h, generator=gen), weight, mask, chunk_size=chunk),
        lambda: ce_chunked(hidden, weight, ids[..., 0], mask, chunk_size=chunk),
    ):
        # Not even one chunk's logits outlive the forward: only (V, H) and (N, H) inputs and gradients are kept.
        assert _largest_saved_numel(fn) < chunk * v
