"""The trainer forms logits as the model does: tiny random models of several architectures (from_config, two layers,
hidden size 32), the trainer's log-probabilities against `model(...).logits` log-softmaxed, and a refusal for a model
that does something after its output layer that the trainer does not know.

Each architecture's post-projection step is set so that skipping it would fail the test: Granite's logits_scaling 4,
Cohere's logit_scale 0.25, Gemma 2's soft-cap at 0.5 (random weights give logits near 1, where the cap bites), and
Phi's output bias filled with large values.
"""

from __future__ import annotations

import pytest
import torch

from services.trainer.config import TrainConfig
from services.trainer.data import TrainExample, collate_examples
from services.trainer.losses import ce_chunked, kl_dense, kl_dense_chunked
from services.trainer.modeling import (
    DecoderBody,
    UnsupportedModelError,
    check_output_layer,
    output_layer_of,
    switch_off_dropout,
    trainer_logits,
)
from services.trainer.training import batch_losses

VOCAB = 128
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "phi": ("PhiConfig", {"num_key_value_heads": 4}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
    "cohere": ("CohereConfig", {"logit_scale": 0.25}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 0.5}),
}
# Only for the dropout test: OPT keeps its dropout probabilities as numbers for functional dropout.
OPT = ("OPTConfig", {"ffn_dim": 64, "word_embed_proj_dim": 32})


def tiny_model(architecture: str) -> torch.nn.Module:
    import transformers

    config_class, extra = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(**{**TINY, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if architecture == "phi":
        with torch.no_grad():
            model.get_output_embeddings().bias.normal_(0.0, 3.0)  # initialised to 0; make skipping it visible
    return model


def token_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_trainer_log_probabilities_equal_the_models_own(architecture):
    model = tiny_model(architecture)
    ids = token_ids()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        got = torch.log_softmax(trainer_logits(model, ids, mask), dim=-1)
        # The step the trainer would get wrong without the output layer's extras: hidden @ W.T alone.
        plain = torch.log_softmax(DecoderBody(model)(ids, mask) @ model.get_output_embeddings().weight.T, dim=-1)
    assert model.config.model_type == architecture
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if architecture not in ("llama", "qwen2"):  # these have no extras: the plain product is their output step
        assert (plain - expected).abs().max() > 1e-2
    assert check_output_layer(model, ids[0]) < 1e-5


@pytest.mark.parametrize("architecture", ["granite", "gemma2", "phi"])
def test_chunked_losses_use_the_output_layer(architecture):
    """The chunked CE and KL on hidden states equal the plain ones on the model's own logits."""
    model = tiny_model(architecture)
    ids = token_ids()
    mask = torch.ones_like(ids)
    loss_mask = torch.ones(ids.shape, dtype=torch.bool)
    loss_mask[:, :3] = False
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        hidden = DecoderBody(model)(ids, mask)
        layer = output_layer_of(model)
        targets = ids.roll(-1, dims=1)
        ce = ce_chunked(hidden, layer, targets, loss_mask, chunk_size=5).mean()
        expected_ce = torch.nn.functional.cross_entropy(logits[loss_mask], targets[loss_mask])
        teacher_hidden = hidden.flip(0)  # another distribution, the same output layer
        kl = kl_dense_chunked(hidden, teacher_hidden, layer, loss_mask, temperature=2.0, chunk_size=5).mean()
        expected_kl = kl_dense(logits, logits.flip(0), loss_mask, temperature=2.0).mean()
    torch.testing.assert_close(ce, expected_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, expected_kl, rtol=1e-5, atol=1e-6)


def test_batch_losses_of_the_base_model_are_its_own_cross_entropy():
    """`batch_losses` on a plain Gemma 2 (soft-capped): its CE is the model's own next-token loss."""
    model = tiny_model("gemma2")
    ids = token_ids(1, 16)[0]
    example = TrainExample(
        problem_id="p",
        input_ids=ids,
        prompt_length=5,
        topk_ids=torch.zeros((11, 0), dtype=torch.int64),
        topk_logprobs=torch.zeros((11, 0)),
        teacher_input_ids=ids,
        teacher_prompt_length=5,
    )
    batch = collate_examples([example])
    with torch.no_grad():
        losses = batch_losses(model, batch, TrainConfig(teacher="online", temperature=2.0))
        logits = model(input_ids=ids[None]).logits[0, 4:15].float()
        expected = torch.nn.functional.cross_entropy(logits, ids[5:16])
    torch.testing.assert_close(losses.ce.mean(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.kl.mean(), torch.tensor(0.0), rtol=0, atol=1e-6)  # its own teacher


def test_a_model_with_an_unknown_output_step_is_refused_by_name():
    """A Llama whose forward divides its logits by 3 after the output layer (as an architecture the trainer does not
    know might): the check names the model type and says why."""
    import transformers

    class ScaledLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits / 3.0
            return output

    torch.manual_seed(0)
    model = ScaledLlama(transformers.LlamaConfig(**TINY)).eval()
    with pytest.raises(UnsupportedModelError, match=r"model type llama: the trainer's logits .* differ"):
        check_output_layer(model, token_ids()[0])


def test_an_adapter_on_the_output_layer_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UnsupportedModelError, match="output layer carries an adapter"):
        output_layer_of(model)


@pytest.mark.parametrize(
    ("architecture", "dropout"),
    [
        ("phi", {"resid_pdrop": 0.5, "embd_pdrop": 0.5, "attention_dropout": 0.5}),
        ("llama", {"attention_dropout": 0.5}),
        ("opt", {"dropout": 0.5, "attention_dropout": 0.5, "activation_dropout": 0.5}),
    ],
)
def test_the_base_models_own_dropout_is_off_in_training(architecture, dropout):
    """Phi's residual and embedding dropout are layers, attention dropout is a number its attention modules read: in
    train mode both would make the student (and the online teacher) differ at every step."""
    import transformers

    config_class, extra = OPT if architecture == "opt" else ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(**{**TINY, **extra, **dropout})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    ids = token_ids()
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout on: the test would see it
        switch_off_dropout(model)
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
        reference = model.eval()(ids).logits
        torch.testing.assert_close(model.train()(ids).logits, reference, rtol=0, atol=0)
