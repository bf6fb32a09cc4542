"""A model's name wherever it is, and which models get the worked example by default: the small default model
however it is named (as given to `--model`, as an engine names it, by the directory it was pulled to, or a checkpoint
in a Hugging Face cache), and no other."""

import pytest

from shared.models import model_name, needs_worked_example

HUB_CACHE = "/root/.cache/huggingface/hub"
REVISION = "12fd25f77366fa6b3b4b768ec3050bf629380bac"


@pytest.mark.parametrize(
    "model, needed",
    [
        (None, True),
        ("SmolLM2-135M-Instruct", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("/root/.cache/ssb/models/SmolLM2-135M-Instruct", True),
        (f"{HUB_CACHE}/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/{REVISION}/", True),
        (f"{HUB_CACHE}/models--HuggingFaceTB--SmolLM2-360M-Instruct/snapshots/{REVISION}", False),
        ("Qwen/Qwen2.5-3B-Instruct", False),
        ("/models/Qwen2.5-1.5B-Instruct", False),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", False),
    ],
)
def test_the_worked_example_is_on_for_the_default_model_only(model, needed):
    assert needs_worked_example(model) is needed


@pytest.mark.parametrize(
    "model, name",
    [
        ("Qwen/Qwen2.5-3B-Instruct", "Qwen2.5-3B-Instruct"),
        ("/models/Qwen2.5-1.5B-Instruct/", "Qwen2.5-1.5B-Instruct"),
        ("gpt2", "gpt2"),
        (f"{HUB_CACHE}/models--Qwen--Qwen2.5-3B-Instruct/snapshots/{REVISION}", "Qwen2.5-3B-Instruct"),
        (f"{HUB_CACHE}/models--gpt2/snapshots/{REVISION}/", "gpt2"),  # a repository without an owner
        ("/data/snapshots/Qwen2.5-3B-Instruct", "Qwen2.5-3B-Instruct"),  # a folder of one's own called snapshots
    ],
)
def test_a_model_is_named_by_its_checkpoint_not_by_a_caches_revision(model, name):
    assert model_name(model) == name
