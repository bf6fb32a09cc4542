"""The base model as the trainer uses it: its decoder body, its output step, and the dtype it loads in.

The trainer never asks the model for its (batch, sequence, vocabulary) logits: it runs the decoder body to the final
hidden states and lets the chunked losses form the logits a few hundred positions at a time. That is only right if
the losses form them exactly as the model's own forward does, and some architectures do more after the output
projection than a matrix product:

    most causal LMs (Llama, Qwen2, Mistral, SmolLM, ...)   logits = hidden @ W.T
    Phi                                                   + a bias
    Cohere, Cohere2                                       * logit_scale
    Granite (and its MoE variants)                        / logits_scaling
    Gemma 2 and 3                                         then c * tanh(logits / c), c = final_logit_softcapping

`output_layer_of` reads these into an `OutputLayer` (services/trainer/losses.py), and `check_output_layer` compares
the trainer's logits with the model's own `model(...).logits` on a few tokens before training starts: a model that
does anything else after its output projection is refused with its model type and the size of the difference, rather
than trained on a loss it does not compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from services.trainer.config import TrainingError
from services.trainer.losses import OutputLayer

# Architectures that multiply their logits by a factor after the output projection: model type -> the factor.
LOGIT_SCALES: dict[str, Callable] = {
    "cohere": lambda config: config.logit_scale,
    "cohere2": lambda config: config.logit_scale,
    "cohere2_moe": lambda config: config.logit_scale,
    "granite": lambda config: 1.0 / config.logits_scaling,
    "granite_swa": lambda config: 1.0 / config.logits_scaling,
    "granitemoe": lambda config: 1.0 / config.logits_scaling,
    "granitemoe_swa": lambda config: 1.0 / config.logits_scaling,
    "granitemoehybrid": lambda config: 1.0 / config.logits_scaling,
    "granitemoeshared": lambda config: 1.0 / config.logits_scaling,
    "hyperclovax": lambda config: config.logits_scaling,
}

# How far the trainer's logits may be from the model's own, relative to the largest logit: float32 computes the same
# products (only summation order may differ); 16-bit models round the product and then the scale and soft-cap steps
# (bfloat16 keeps 8 bits: about 0.4% per rounding), which the trainer does in float32.
OUTPUT_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
OUTPUT_CHECK_TOLERANCE_16_BIT = 3e-2
OUTPUT_CHECK_TOKENS = 32


class UnsupportedModelError(TrainingError):
    """The trainer cannot form this model's logits as the model does."""


class DecoderBody(nn.Module):
    """A causal LM's decoder without its output layer: (B, S) ids -> (B, S, H) hidden states after the final norm.

    The module that data parallelism wraps: gradients flow through its forward to the LoRA weights. The output
    layer is frozen, so the losses may use it outside.
    """

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.decoder = causal_lm.get_decoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def model_type_of(model: nn.Module) -> str:
    """The model's `config.model_type` (of its text part), e.g. `llama`; `unknown` when it has none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "model_type", None) or "unknown"


def output_layer_of(model: nn.Module) -> OutputLayer:
    """The model's output step as an OutputLayer: its output projection's weight and bias, and the logit scale and
    soft-cap its architecture applies after it (see the module docstring).

    Raises UnsupportedModelError when the output layer is not a plain linear layer (e.g. it carries a LoRA adapter,
    which the chunked losses would ignore).
    """
    head = model.get_output_embeddings()
    model_type = model_type_of(model)
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise UnsupportedModelError(f"model type {model_type}: no output layer with a weight to form logits from")
    if hasattr(head, "base_layer"):
        raise UnsupportedModelError(
            f"model type {model_type}: the output layer carries an adapter, which the trainer's chunked losses do "
            "not apply; leave the output layer out of the LoRA target modules"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = float(LOGIT_SCALES[model_type](config)) if model_type in LOGIT_SCALES else 1.0
    softcap = getattr(config, "final_logit_softcapping", None)
    bias = getattr(head, "bias", None)
    return OutputLayer(
        weight=head.weight,
        bias=bias.detach() if isinstance(bias, torch.Tensor) else None,
        scale=scale,
        softcap=float(softcap) if softcap else None,
    )


def trainer_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) ids -> (B, S, V) float32 logits as the trainer forms them: decoder body, then the output layer.

    For checks and tests: training itself never builds them whole.
    """
    return output_layer_of(model).logits(DecoderBody(model)(input_ids, attention_mask))


@torch.no_grad()
def check_output_layer(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Compare the trainer's logits with the model's own `model(input_ids).logits` on the first tokens of a sequence.

    input_ids: (S,) int64, any real input (the first OUTPUT_CHECK_TOKENS are used). Returns the largest difference
    relative to the largest logit. Raises UnsupportedModelError, naming the model type and the difference, when it
    exceeds the tolerance of the model's dtype (OUTPUT_CHECK_TOLERANCE).
    """
    ids = input_ids[:OUTPUT_CHECK_TOKENS].reshape(1, -1).to(model.get_output_embeddings().weight.device)
    attention_mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()  # no dropout: both passes must see the same network
    try:
        expected = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits.float()
        got = trainer_logits(model, ids, attention_mask)
    finally:
        model.train(was_training)
    relative = float((got - expected).abs().max() / expected.abs().max().clamp(min=1.0))
    dtype = model.get_output_embeddings().weight.dtype
    tolerance = OUTPUT_CHECK_TOLERANCE.get(dtype, OUTPUT_CHECK_TOLERANCE_16_BIT)
    if not relative <= tolerance:
        layer = output_layer_of(model)
        raise UnsupportedModelError(
            f"model type {model_type_of(model)}: the trainer's logits (the final hidden states through the output "
            f"projection{', plus its bias' if layer.bias is not None else ''}, times {layer.scale:g}"
            f"{f', soft-capped at {layer.softcap:g}' if layer.softcap else ''}) differ from the model's own by "
            f"{relative:.2g} of the largest logit (tolerance {tolerance:g} in {str(dtype).removeprefix('torch.')}): "
            "this architecture does something after its output layer that the trainer does not reproduce, so "
            "training would not match the teacher it claims to"
        )
    return relative


def switch_off_dropout(model: nn.Module) -> None:
    """Zero the base model's own dropout, in place, before the LoRA layers are added: its `nn.Dropout` layers, and
    the probabilities its modules keep as numbers for functional dropout (`attention_dropout`, OPT's `dropout`, ...).
    `train()` would switch it on, and a model configured with it (GPT-2, OPT, Phi: 0.1) would then give a student
    that differs at every step and, with the online teacher, a noisy teacher. The LoRA layers' own dropout
    (`TrainConfig.dropout`) is added after, and stays."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(module, name, 0.0)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it and float32 elsewhere."""
    if dtype == "auto":
        on_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, dtype)
