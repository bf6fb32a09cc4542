"""The teacher service's settings: the machine's `shared.settings.Settings` (model, KV cache, context length,
max_logprobs) plus where and how it serves, read once from `SSB_*` environment variables (see `.env.example`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from shared.settings import Settings


class TeacherSettings(Settings):
    """Every knob of `ssb serve teacher`; the command's flags override the environment."""

    teacher_host: str = Field(default="127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    teacher_port: int = Field(default=8000, ge=1, le=65535, description="Port to listen on.")
    teacher_api_key: SecretStr | None = Field(
        default=None,
        description="When set, every endpoint but /healthz and /readyz needs `Authorization: Bearer <key>`.",
    )
    adapters_dir: Path = Field(
        default=Path("adapters"), description="The only directory LoRA adapters are loaded from (POST /v1/adapters)."
    )
    max_pending_requests: int = Field(
        default=1024,
        ge=1,
        description="Engine requests (one per prompt) admitted at once, running or waiting; above it new work gets "
        "429 with Retry-After instead of queueing without bound.",
    )
    retry_after_seconds: int = Field(default=2, ge=1, description="The Retry-After sent with 429 and 503.")
    seed: int = Field(default=0, description="The engine's seed (requests carry their own seeds).")
