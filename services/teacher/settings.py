"""The teacher service's settings: what every service shares (`shared.settings.ServiceSettings`: model, KV cache,
context length, max_logprobs, its key in SSB_TEACHER_API_KEY, the adapters directory) plus where and how it serves,
read once from `SSB_*` environment variables (see `.env.example`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from shared.settings import ServiceSettings

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the largest-rank bounds vLLM accepts


def lora_rank_bound(rank: int) -> int:
    """The smallest largest-rank bound of vLLM's that serves LoRAs of rank `rank` (on a CPU every request costs more
    with a larger one, adapter or not); above vLLM's largest, that largest, which refuses such a LoRA."""
    return next((bound for bound in LORA_RANKS if bound >= rank), LORA_RANKS[-1])


class TeacherSettings(ServiceSettings):
    """Every knob of `ssb serve teacher`; the command's flags override the environment."""

    teacher_host: str = Field(default="127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    teacher_port: int = Field(default=8000, ge=1, le=65535, description="Port to listen on.")
    max_pending_requests: int = Field(
        default=1024,
        ge=1,
        description="Engine requests (one per prompt; per prompt and sample on the OpenAI routes) admitted at once, "
        "running or waiting; above it new work gets 429 with Retry-After instead of queueing without bound (a single "
        "request of more than this: 400).",
    )
    retry_after_seconds: int = Field(default=2, ge=1, description="The Retry-After sent with 429 and 503.")
    seed: int = Field(default=0, description="The engine's seed (requests carry their own seeds).")
    enable_lora: bool = Field(
        default=True,
        description="Build the engine for LoRA adapters (/v1/adapters, `adapter` in requests). On a CPU an engine "
        "built for LoRA runs every request at about half the speed (docs/BENCHMARKS.md): turn it off for a teacher "
        "that only curates.",
    )
    max_lora_rank: int = Field(
        default=32,
        description="The largest LoRA rank the engine serves: one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (vLLM's); "
        "the trainer's default rank is 32. On a CPU every request costs more with a larger one, adapter or not (rank "
        "8: about 1.5x the tokens/s of 32, docs/BENCHMARKS.md): set it to your adapters' rank.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.05,
        le=0.98,
        description="The share of the GPU's memory the engine takes for weights and KV cache (vLLM's default 0.9); "
        "lower it when the trainer worker shares the GPU, e.g. 0.45 on one 80 GB card (ignored on a CPU).",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _a_rank_vllm_serves(cls, rank: int) -> int:
        if rank not in LORA_RANKS:
            raise ValueError(f"{rank} is not one of the ranks vLLM serves: {', '.join(map(str, LORA_RANKS))}")
        return rank
