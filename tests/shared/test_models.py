"""Which models get the worked example by default: the small default model however it is named (as given to
`--model`, or as an engine names it, by the directory it was pulled to), and no other."""

import pytest

from shared.models import needs_worked_example


@pytest.mark.parametrize(
    "model, needed",
    [
        (None, True),
        ("SmolLM2-135M-Instruct", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("/root/.cache/ssb/models/SmolLM2-135M-Instruct", True),
        ("Qwen/Qwen2.5-3B-Instruct", False),
        ("/models/Qwen2.5-1.5B-Instruct", False),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", False),
    ],
)
def test_the_worked_example_is_on_for_the_default_model_only(model, needed):
    assert needs_worked_example(model) is needed
