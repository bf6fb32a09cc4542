"""A LoRA adapter merged into a copy of its base model's weights, so that an engine serves it at the base model's speed.

The CPU build of vLLM runs a LoRA several times slower than the base model, and its cost per engine step grows with
the tokens batched into the step (a 57-request prefill with a LoRA outlasted vLLM's 300 s step timeout on a slow
CPU). A merged copy computes W' x = (W + (alpha / r) B A) x, the same function as the LoRA's W x + (alpha / r) B A x;
tests/services/teacher/test_merging.py checks that the merged engine answers as the LoRA one does.

    merged = merge_adapter("runs/demo/adapter", base_model_path, out_dir)   # a checkpoint vLLM and transformers load
    engine.load_weights(merged.path)   # the base model's engine now answers as the adapter (services/teacher/engine.py)

The merge runs in float32 and is saved in float32; the engine casts to its own dtype when it loads, as it does for the
base model. In float32 that keeps the adapter's update; in bfloat16 (8 bits of mantissa) W + dW is rounded as a whole,
and an update small against W (a short training run) is partly lost or distorted, where a LoRA engine keeps it in a
path of its own. `Merged.update_error` measures how much, for the engine's dtype: the relative error of the update
the rounded weights apply, ||(round(W + dW) - round(W)) - dW|| / ||dW|| over every adapted layer (below 1e-4 in
float32).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class Merged(NamedTuple):
    path: Path
    update_error: float  # of the update the engine's rounded weights apply, relative to it (module docstring)


def update_error(peft_model, dtype) -> float:
    """||(round(W + dW) - round(W)) - dW|| / ||dW|| over every LoRA layer of `peft_model` (not merged yet), rounding to
    the torch `dtype` an engine computes in; one layer at a time."""
    from peft.tuners.lora import LoraLayer

    error = total = 0.0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            weight = module.base_layer.weight.detach().float()
            delta = module.get_delta_weight("default").detach().float()
            applied = (weight + delta).to(dtype).float() - weight.to(dtype).float()
            error += (applied - delta).pow(2).sum().item()
            total += delta.pow(2).sum().item()
    return math.sqrt(error / total) if total else 0.0


def adapts_a_tied_embedding(peft_model) -> bool:
    """Whether a LoRA adapts an input embedding whose weights the output layer shares (tied embeddings, as in the
    small default model): merging it in place would change both."""
    from peft.tuners.lora import LoraLayer
    from torch import nn

    output = peft_model.get_output_embeddings()
    if output is None:
        return False
    return any(
        isinstance(module, LoraLayer)
        and isinstance(module.base_layer, nn.Embedding)
        and module.base_layer.weight is output.weight
        for module in peft_model.modules()
    )


def tied_embedding_refusal(adapter: str, base_model: str) -> str:
    """Why a LoRA on the input embedding of a model whose output layer shares its weights is not merged."""
    return (
        f"{adapter}: a LoRA on the input embedding of {base_model}, whose output layer shares its weights: merged, the "
        "update would move the output layer too, which the adapter as trained and as vLLM serves it leaves alone; "
        "serve it as a LoRA (--adapter-serving lora)"
    )


def targets_a_tied_embedding(base_model: str, lora: dict) -> bool:
    """Whether a LoRA of these settings (an adapter's `adapter_config.json`, or a run's `target_modules`) adapts an
    input embedding the output layer shares, told before any weights load: the model is built on the meta device
    from its config, and its embedding's name matched as PEFT matches target modules. A model that cannot be built so
    (an attention kernel not installed, say) is not judged here: `merge_adapter` checks the loaded model anyway."""
    import re

    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model)
    if not getattr(config, "tie_word_embeddings", False):
        return False
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 (any reason: the merge's own check decides)
        return False
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if output is None or output.weight is not embedding.weight:  # the config says tied, the model does not tie
        return False
    keys = ("target_modules", "target_parameters", "exclude_modules", "modules_to_save", "layers_to_transform",
            "layers_pattern")
    settings = LoraConfig(**{key: lora[key] for key in keys if lora.get(key) is not None})
    return any(
        module is embedding and (match is True or isinstance(match, re.Match))
        for name, module in model.named_modules()
        for match in [check_target_module_exists(settings, name)]
    )


def merge_adapter(
    adapter_dir: str | Path, base_model: str, out_dir: str | Path, engine_dtype: str = "float32"
) -> Merged:
    """Write the base model with the adapter merged into `out_dir` (created; must be empty); return it, with the error
    rounding to `engine_dtype` makes in the adapter's update."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {adapter_dir}: peft_type is {config['peft_type']!r}; only LoRA adapters merge")
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir))
    if adapts_a_tied_embedding(adapted):
        raise ValueError(tied_embedding_refusal(f"adapter {adapter_dir}", base_model))
    error = update_error(adapted, getattr(torch, engine_dtype))
    merged = adapted.merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out_dir)
    base_dir = Path(base_model)
    for name in TOKENIZER_FILES:  # the base checkpoint's own files win (its generation config stops at end of turn)
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
    return Merged(out_dir, error)
