"""Settings: every knob of curation declared once, documented where it is declared, defaults from the paper.

`CurationConfig` holds what one curation run does (the CLI's flags map onto it, and pairs record it).
`Settings` holds where things live and which model to use; it reads `SSB_*` environment variables once.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.grading import DEFAULT_EXTRACTION_ORDER
from shared.schemas import SamplingSettings

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    """Machine-level settings, from `SSB_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SSB_", extra="ignore")

    home: Path = Field(default=Path.home() / ".cache" / "ssb", description="Where pulled models are kept.")
    model: str = Field(default=DEFAULT_MODEL, description="Default model: the small default's name, a path or a HF id.")
    kv_cache_gib: int = Field(default=2, ge=1, description="vLLM KV cache size on the CPU, in GiB.")
    dtype: str = Field(
        default="auto",
        pattern=r"^(auto|float32|bfloat16|float16)$",
        description="The engine's dtype; auto: bfloat16 on a GPU or a CPU that computes in it, float32 elsewhere.",
    )
    max_model_len: int = Field(default=4096, ge=256, description="Longest prompt plus completion the engine accepts.")
    max_logprobs: int = Field(default=64, ge=1, description="Largest top-k of log-probabilities the engine may return.")
    progress_interval: float = Field(
        default=30.0, gt=0, description="Seconds between plain progress lines when the output is not a terminal."
    )


class CurationConfig(BaseModel):
    """One curation run (steps 1-5 of SSB). Defaults follow the paper where it gives one."""

    k: int = Field(default=4, ge=2, le=64, description="Rollouts per problem (paper: 4).")
    rollout_temperature: float = Field(default=0.8, ge=0.0, description="Rollout sampling temperature (paper: 0.8).")
    rollout_top_k: int = Field(default=50, ge=-1, description="Rollout top-k sampling (paper: 50; -1 is off).")
    rollout_top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Rollout nucleus sampling.")
    rollout_max_tokens: int = Field(default=512, ge=1, description="Longest rollout, in tokens.")
    explanation_temperature: float = Field(default=0.4, ge=0.0, description="Hinted explanation temperature (paper: 0.4).")
    explanation_max_tokens: int = Field(default=768, ge=1, description="Longest explanation, in tokens.")
    topk: int = Field(default=20, ge=1, le=256, description="Teacher log-probabilities kept per explanation token.")
    seed: int = Field(default=0, description="Seeds sampling and the tie-breaking draws.")
    worked_example: bool = Field(default=False, description="Put one worked example turn before every question.")
    extraction_order: tuple[str, ...] = Field(
        default=DEFAULT_EXTRACTION_ORDER, description="How final answers are pulled from text, first match wins."
    )
    batch_size: int = Field(default=32, ge=1, description="Problems sent to the engine together.")

    def rollout_sampling(self) -> SamplingSettings:
        return SamplingSettings(
            n=self.k,
            temperature=self.rollout_temperature,
            top_k=self.rollout_top_k,
            top_p=self.rollout_top_p,
            max_tokens=self.rollout_max_tokens,
            seed=self.seed,
        )

    def explanation_sampling(self) -> SamplingSettings:
        return SamplingSettings(
            n=1,
            temperature=self.explanation_temperature,
            max_tokens=self.explanation_max_tokens,
            seed=self.seed,
            logprobs=self.topk,
        )
