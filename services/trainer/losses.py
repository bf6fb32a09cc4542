"""Distillation losses: KL(teacher || student) at a temperature, on explanation positions only.

Pure functions of tensors (torch only). The trainer calls the chunked forms; the plain forms are the
readable reference that the chunked ones are tested against.

Conventions, shared by every function here:

- Shapes: B batch, S sequence, V vocabulary, H hidden size, k teacher top-k, N = number of valid positions.
  All per-position tensors are aligned with the student's logits: position s holds the distribution of the
  token *predicted* at s (the caller does the usual shift by one).
- ``mask`` (B, S) bool marks explanation positions; padding and prompt are False. Valid positions are selected
  first (``x[mask]``, row-major), so whatever padding holds never reaches the arithmetic.
- Per position the loss is ``T^2 * KL(p_T || q_T)``: p_T, q_T are the teacher's and the student's distributions
  at temperature T (``log_softmax(logits / T)``), and T^2 keeps gradient scale comparable across temperatures.
- Every loss returns ``LossSum(total, count)``: ``total`` is the SUM over valid positions (float32 scalar,
  carries the gradient) and ``count`` the number of valid positions (int64 scalar tensor, no host sync).
  The batch loss is ``total / count`` (``LossSum.mean()``); with gradient accumulation or data parallelism,
  add totals and counts over micro-batches / ranks first and divide once, so every position weighs the same.
- The teacher side never receives gradient.

Top-k teacher and its tail bucket (``kl_on_topk``):
The teacher is stored as the top-k token ids and their log-probabilities at temperature 1, a_i = log p_i.
The rest of the vocabulary (the tail, R) is one bucket holding the teacher's remaining mass
r = 1 - sum_i p_i (computed as log1mexp(logsumexp(a)), 0 when rounding makes the known mass reach 1).
The KL is taken over k + 1 categories: the k known tokens and the tail bucket. The student side is exact:
q_T = log_softmax(z / T) over the full vocabulary, gathered at the k ids, and its tail is
logsumexp of q_T over the complement of the ids (not 1 minus the top-k mass, which cancels badly when the
top-k hold nearly everything).

Tempering the teacher's tail needs its shape, which top-k does not store: the tail's tempered weight is
W = sum_{j in R} p_j^(1/T), and only sum_{j in R} p_j = r is known. We assume the teacher's tail is shaped
like the student's own tail at temperature 1, p_j = r * q_j / Q with Q = sum_{j in R} q_j, which gives

    log W = (log r - log Q) / T + logsumexp_{j in R}(log q_j / T)        (held constant: no gradient)

and the teacher's tempered bucket distribution is log_softmax([a_1/T, ..., a_k/T, log W]).
Why this estimate: teacher and student are the same base model (the student adds a LoRA adapter), so the
student's tail is the best shape at hand; the result is exact at T = 1 (W = r for any shape), exact when
k = V (no tail; then ``kl_on_topk`` equals ``kl_dense`` in value and gradient), and, whenever the teacher's
tail has the student's shape, it equals the dense full-vocabulary KL at any T. The alternative of spreading r
evenly over the V - k tail tokens, W = (V - k)^(1 - 1/T) r^(1/T), is by concavity the largest W any tail
shape allows for T > 1; on a 150k vocabulary at T = 2 it dominates the target and would push the student
toward a flat tail at every step. Token ids within a row must be distinct.

The output step (``OutputLayer``): the chunked forms take the hidden states and the model's output layer, and form
the logits as the model does, ``softcap(scale * (hidden @ weight.T + bias))``: a plain projection for most models, a
bias for some, a logit scale for Cohere and Granite, a final soft-cap ``c * tanh(x / c)`` for Gemma 2 and 3.
``services/trainer/modeling.py`` reads these from the model and checks them against the model's own logits.

Memory and time (``*_chunked``): the student's (B, S, V) logits are never built. Valid rows of the hidden
states are taken (N, H) and split into chunks of ``chunk_size`` rows. In the forward pass each chunk's logits
are formed, upcast to float32, reduced to the chunk's loss and, right there, to the loss's gradient with respect
to the chunk's hidden rows (and to the output weight, if it trains), then dropped. Backward only scales the
stored (N, H) gradient by the incoming one: the logits are neither kept nor recomputed, so the output layer
costs what a dense step costs (one product forward, one backward), at a peak of a few chunk_size x V float32
tensors instead of several N x V ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossSum(NamedTuple):
    """A loss summed over valid positions, and how many there were.

    total: () float32, the sum of per-position losses (carries the gradient).
    count: () int64, the number of valid positions.
    """

    total: torch.Tensor
    count: torch.Tensor

    def mean(self) -> torch.Tensor:
        """() float32: total / count, and 0 (still attached to the graph) when there are no valid positions."""
        return self.total / self.count.clamp(min=1).to(self.total.dtype)


class OutputLayer(NamedTuple):
    """A causal LM's output step, final hidden states to logits: ``softcap(scale * (hidden @ weight.T + bias))``.

    weight: (V, H) output projection. bias: (V,) or None. scale: a factor on the logits (Cohere's ``logit_scale``,
    1 / Granite's ``logits_scaling``). softcap: None, or c in ``c * tanh(x / c)`` (Gemma 2's
    ``final_logit_softcapping``), applied after the scale. Only the weight can carry a gradient.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (..., V) float32 logits; the product is formed in the weight's dtype."""
        logits = (hidden @ self.weight.T).float()
        if self.bias is not None:
            logits = logits + self.bias.detach().float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def as_output_layer(output_layer: OutputLayer | torch.Tensor) -> OutputLayer:
    """An OutputLayer as given, or a plain projection when given only its (V, H) weight."""
    return output_layer if isinstance(output_layer, OutputLayer) else OutputLayer(output_layer)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012). Any shape in, same shape out.

    x = 0 gives -inf; x = -inf gives 0.
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_on_topk(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
) -> LossSum:
    """T^2 * KL(teacher || student) over the teacher's top-k tokens plus one tail bucket (see module docstring).

    student_logits: (B, S, V) any float dtype; computed in float32.
    topk_ids: (B, S, k) int64, distinct ids per position, k <= V.
    topk_logprobs: (B, S, k) teacher log-probabilities at temperature 1.
    mask: (B, S) bool, True on explanation positions.
    Returns LossSum: total () float32 summed over valid positions, count () int64.
    """
    _check_temperature(temperature)
    _check_topk_shapes(student_logits, topk_ids, topk_logprobs, mask)
    per_row = _kl_topk_rows(student_logits[mask], topk_ids[mask], topk_logprobs[mask], temperature)
    return LossSum(per_row.sum(), mask.sum())


def kl_dense(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
) -> LossSum:
    """Exact full-vocabulary T^2 * KL(teacher || student).

    student_logits: (B, S, V) any float dtype; computed in float32.
    teacher_logits: (B, S, V) logits or log-probabilities (the same thing up to a per-row shift); no gradient.
    mask: (B, S) bool, True on explanation positions.
    Returns LossSum: total () float32 summed over valid positions, count () int64.
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != mask.shape:
        raise ValueError(
            f"expected student/teacher logits (B, S, V) and mask (B, S); got {tuple(student_logits.shape)}, "
            f"{tuple(teacher_logits.shape)}, {tuple(mask.shape)}"
        )
    per_row = _kl_dense_rows(student_logits[mask], teacher_logits[mask], temperature)
    return LossSum(per_row.sum(), mask.sum())


def kl_on_topk_chunked(
    hidden_states: torch.Tensor,
    output_layer: OutputLayer | torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
    chunk_size: int = 256,
) -> LossSum:
    """``kl_on_topk`` on the logits ``output_layer.logits(hidden_states)``, built chunk_size valid rows at a time.

    hidden_states: (B, S, H) student's final hidden states (after the final norm), any float dtype.
    output_layer: the model's OutputLayer, or its (V, H) weight alone (a plain projection); the product is formed in
        the weight's dtype and upcast to float32.
    topk_ids: (B, S, k) int64; topk_logprobs: (B, S, k); mask: (B, S) bool, as in ``kl_on_topk``.
    Returns LossSum: total () float32 summed over valid positions, count () int64.
    """
    _check_temperature(temperature)
    layer = as_output_layer(output_layer)
    _check_hidden_shapes(hidden_states, layer.weight, mask)
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != mask.shape:
        raise ValueError(
            f"expected topk_ids/topk_logprobs (B, S, k) matching mask (B, S); got {tuple(topk_ids.shape)}, "
            f"{tuple(topk_logprobs.shape)}, {tuple(mask.shape)}"
        )

    def loss_of_chunk(
        weight: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor
    ) -> torch.Tensor:
        logits = layer._replace(weight=weight).logits(hidden)
        return _kl_topk_rows(logits, ids, logprobs, temperature).sum()

    total = _sum_over_chunks(
        loss_of_chunk, chunk_size, layer.weight, hidden_states[mask], topk_ids[mask], topk_logprobs[mask]
    )
    return LossSum(total, mask.sum())


def kl_dense_chunked(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    output_layer: OutputLayer | torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
    chunk_size: int = 256,
    teacher_mask: torch.Tensor | None = None,
) -> LossSum:
    """``kl_dense`` with both sides' logits built from hidden states, chunk_size valid rows at a time.

    The online teacher: the same model with the adapter off, on the hinted prompt, sharing the output layer.
    student_hidden: (B, S, H) student's final hidden states.
    teacher_hidden: (B, S_t, H) teacher's final hidden states; no gradient flows into them.
    output_layer: the shared OutputLayer, or its (V, H) weight alone.
    mask: (B, S) bool, the student's explanation positions.
    teacher_mask: (B, S_t) bool, the teacher's explanation positions (default: ``mask``). Its valid rows,
        taken in row-major order, must pair one to one with the student's (same count per example),
        so prompts of different lengths on the two sides need no re-padding.
    Returns LossSum: total () float32 summed over valid positions, count () int64.
    """
    _check_temperature(temperature)
    layer = as_output_layer(output_layer)
    _check_hidden_shapes(student_hidden, layer.weight, mask)
    teacher_mask = mask if teacher_mask is None else teacher_mask
    _check_hidden_shapes(teacher_hidden, layer.weight, teacher_mask)
    student_rows, teacher_rows = student_hidden[mask], teacher_hidden[teacher_mask].detach()
    if student_rows.shape[0] != teacher_rows.shape[0]:
        raise ValueError(f"student has {student_rows.shape[0]} valid positions, teacher {teacher_rows.shape[0]}")

    def loss_of_chunk(weight: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        chunk_layer = layer._replace(weight=weight)
        with torch.no_grad():
            teacher_logits = chunk_layer.logits(teacher)
        return _kl_dense_rows(chunk_layer.logits(student), teacher_logits, temperature).sum()

    total = _sum_over_chunks(loss_of_chunk, chunk_size, layer.weight, student_rows, teacher_rows)
    return LossSum(total, mask.sum())


def ce_chunked(
    hidden_states: torch.Tensor,
    output_layer: OutputLayer | torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int = 256,
) -> LossSum:
    """Cross-entropy of the explanation tokens (no temperature), chunk_size valid rows at a time.

    hidden_states: (B, S, H); output_layer: the model's OutputLayer, or its (V, H) weight alone.
    target_ids: (B, S) int64, the token predicted at each position (already shifted by the caller).
    mask: (B, S) bool, True on explanation positions.
    Returns LossSum: total () float32 summed over valid positions (nats), count () int64.
    """
    layer = as_output_layer(output_layer)
    _check_hidden_shapes(hidden_states, layer.weight, mask)
    if target_ids.shape != mask.shape:
        raise ValueError(f"expected target_ids {tuple(mask.shape)}; got {tuple(target_ids.shape)}")

    def loss_of_chunk(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(layer._replace(weight=weight).logits(hidden), targets, reduction="sum")

    total = _sum_over_chunks(loss_of_chunk, chunk_size, layer.weight, hidden_states[mask], target_ids[mask])
    return LossSum(total, mask.sum())


def _kl_topk_rows(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-row T^2 * KL over k known tokens + tail bucket. logits (N, V); ids, logprobs (N, k). Returns (N,)."""
    logits = logits.float()
    teacher_known = topk_logprobs.float() / temperature  # (N, k) tempered, unnormalised
    student_logp = torch.log_softmax(logits, dim=-1)  # (N, V) at T = 1
    scaled = student_logp / temperature  # (N, V): log q_j / T
    scaled_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (N, 1): log sum_V q_j^(1/T)
    student_logp_t = scaled - scaled_norm  # (N, V) at T
    student_known = student_logp_t.gather(-1, topk_ids)  # (N, k)
    vocab, k = logits.shape[-1], topk_ids.shape[-1]
    if k == vocab:
        teacher_t = torch.log_softmax(teacher_known, dim=-1)
        student_t = student_known
    else:
        in_tail = torch.ones_like(student_logp, dtype=torch.bool).scatter(-1, topk_ids, False)  # (N, V)
        student_tail = _logsumexp_where(student_logp_t, in_tail)  # (N,) exact tempered tail mass
        with torch.no_grad():
            known_mass = torch.logsumexp(topk_logprobs.float(), dim=-1).clamp(max=0.0)
            teacher_tail_mass = log1mexp(known_mass)  # log r, -inf when the top-k hold everything
            student_tail_mass = _logsumexp_where(student_logp, in_tail)  # log Q
            tail_shape_t = student_tail + scaled_norm[:, 0]  # log sum_R q_j^(1/T)
            teacher_tail = (teacher_tail_mass - student_tail_mass) / temperature + tail_shape_t  # log W
            teacher_t = torch.log_softmax(torch.cat([teacher_known, teacher_tail[:, None]], dim=-1), dim=-1)
        student_t = torch.cat([student_known, student_tail[:, None]], dim=-1)
    return temperature**2 * _kl_from_logprobs(teacher_t.detach(), student_t)


def _kl_dense_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row T^2 * KL(teacher || student) over the full vocabulary. Both (N, V). Returns (N,)."""
    with torch.no_grad():
        teacher_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_t = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * _kl_from_logprobs(teacher_t, student_t)


def _kl_from_logprobs(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (log p_c - log q_c) along the last dim; categories with p_c = 0 add exactly 0. (N, C) -> (N,)."""
    terms = teacher_logp.exp() * (teacher_logp - student_logp)
    return torch.where(teacher_logp > -math.inf, terms, torch.zeros_like(terms)).sum(-1)


def _logsumexp_where(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of the entries where keep is True. x, keep (N, V) -> (N,)."""
    return torch.logsumexp(x.masked_fill(~keep, -math.inf), dim=-1)


def _sum_over_chunks(
    loss_of_chunk: Callable[..., torch.Tensor],
    chunk_size: int,
    weight: torch.Tensor,
    hidden: torch.Tensor,
    *rows: torch.Tensor,
) -> torch.Tensor:
    """Sum loss_of_chunk(weight, hidden chunk, *row chunks) over consecutive chunk_size slices of the rows.

    weight: (V, H) output projection; hidden: (N, H), the rows that carry the gradient; rows: (N, ...) each, the
    per-row data (no gradient). The gradients are formed chunk by chunk in the forward pass (`_ChunkedLoss`).
    With N = 0 the (empty) rows still go through once, so the zero total stays attached to the graph.
    Returns () float32.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLoss.apply(loss_of_chunk, chunk_size, weight, hidden, *rows)


class _ChunkedLoss(torch.autograd.Function):
    """A loss summed over chunks of rows whose gradient is computed in the forward pass, one chunk at a time.

    Forward: for each chunk, the loss and (where the inputs need it) its gradients with respect to the chunk's
    hidden rows and the weight, by autograd on that chunk alone; only the (N, H) hidden-row gradient (and a
    (V, H) weight gradient, when the weight trains) outlives the chunk. Backward: those gradients times the
    incoming scalar gradient. Used once per step, so no double backward.
    """

    @staticmethod
    def forward(ctx, loss_of_chunk, chunk_size, weight, hidden, *rows):
        want_weight, want_hidden = ctx.needs_input_grad[2:4]
        weight_grad = torch.zeros_like(weight) if want_weight else None
        hidden_grad = torch.zeros_like(hidden) if want_hidden else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, max(hidden.shape[0], 1), chunk_size):
            end = start + chunk_size
            with torch.enable_grad():
                w = weight.detach().requires_grad_(want_weight)
                h = hidden[start:end].detach().requires_grad_(want_hidden)
                loss = loss_of_chunk(w, h, *(r[start:end] for r in rows))
                if loss.requires_grad:  # some input wants a gradient
                    grads = iter(torch.autograd.grad(loss, [t for t in (w, h) if t.requires_grad]))
                    if want_weight:
                        weight_grad += next(grads)
                    if want_hidden:
                        hidden_grad[start:end] = next(grads)
            total += loss.detach().float()
        ctx.save_for_backward(weight_grad, hidden_grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.saved_tensors]
        return (None, None, *scaled, *([None] * (len(ctx.needs_input_grad) - 4)))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_topk_shapes(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor
) -> None:
    if (
        logits.shape[:-1] != mask.shape
        or topk_ids.shape != topk_logprobs.shape
        or topk_ids.shape[:-1] != mask.shape
        or topk_ids.shape[-1] > logits.shape[-1]
    ):
        raise ValueError(
            f"expected logits (B, S, V), topk_ids/topk_logprobs (B, S, k<=V), mask (B, S); got "
            f"{tuple(logits.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}, {tuple(mask.shape)}"
        )


def _check_hidden_shapes(hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> None:
    if hidden.shape[:-1] != mask.shape or weight.ndim != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"expected hidden (B, S, H), output weight (V, H), mask (B, S); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(mask.shape)}"
        )
