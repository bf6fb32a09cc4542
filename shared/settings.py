"""Settings: every knob of curation declared once, documented where it is declared, defaults from the paper.

`CurationConfig` holds what one curation run does (the CLI's flags map onto it, and pairs record it).
`Settings` holds where things live and which model to use; it reads `SSB_*` environment variables once.
`ServiceSettings` adds what every service and worker of the distributed topology shares (Redis, the data volume, the
teacher's URLs and key); each service's own settings class extends it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.grading import DEFAULT_EXTRACTION_ORDER, check_extraction_order
from shared.schemas import MaxTokens, SamplingSettings, Seed, Temperature, TopK

# Answer extraction strategies, first match wins: at least one, each a known one.
ExtractionOrder = Annotated[tuple[str, ...], AfterValidator(check_extraction_order)]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def refuse_blank_key(key: SecretStr | None) -> SecretStr | None:
    if key is not None and not key.get_secret_value().strip():
        raise ValueError("set but empty, which would leave the service open: set a key, or leave the variable out")
    value = key.get_secret_value() if key is not None else ""
    if not (value.isascii() and value.isprintable()) or value != value.strip():
        raise ValueError("holds characters an HTTP header cannot carry: use printable ASCII, without spaces around it")
    return key


# A service's API key: none (no check), or a key; a blank one is refused (`KEY=` left in an .env file).
ApiKey = Annotated[SecretStr | None, AfterValidator(refuse_blank_key)]


class Settings(BaseSettings):
    """Machine-level settings, from `SSB_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SSB_", extra="ignore")

    home: Path = Field(default=Path.home() / ".cache" / "ssb", description="Where pulled models are kept.")
    model: str = Field(default=DEFAULT_MODEL, description="Default model: the small default's name, a path or a HF id.")
    kv_cache_gib: float = Field(default=2, gt=0, description="vLLM KV cache size on the CPU, in GiB (e.g. 0.5).")
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

    @field_validator("*", mode="after")
    @classmethod
    def expand_home(cls, value):
        """`~` in a directory setting (`SSB_HOME=~/.cache/ssb`) means the home directory, as in a shell."""
        return value.expanduser() if isinstance(value, Path) else value


class ServiceSettings(Settings):
    """What the services and workers share, from `SSB_*` environment variables (see `.env.example`)."""

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis for the job queues and the services' state (`redis://[:password@]host:port/db`).",
    )
    key_prefix: str = Field(
        default="ssb",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Prefix of every Redis key, queue name and job id, so several deployments (or tests) share one "
        "Redis: letters, digits, `_` and `-` (the characters RQ allows in a job id).",
    )
    data_dir: Path = Field(
        default=Path("ssb-data"),
        description="The volume shared by workers, trainer and teacher: datasets' pair stores, runs, adapters. On "
        "several machines, a shared filesystem mounted at the same path.",
    )
    adapters_dir: Path | None = Field(
        default=None,
        description="Where trained adapters are written and the only directory the teacher loads them from "
        "(default: DATA_DIR/adapters).",
    )
    teacher_urls: Annotated[list[str], NoDecode] = Field(
        default=["http://127.0.0.1:8000"],
        description="The teacher service or services (comma-separated); workers spread their calls across them.",
    )
    teacher_api_key: ApiKey = Field(
        default=None, description="The teacher's key, when it has one (sent as `Authorization: Bearer`)."
    )
    trainer_url: str = Field(
        default="http://127.0.0.1:8002",
        description="The trainer service: the curator starts a dataset's training request there when curation ends.",
    )
    trainer_api_key: ApiKey = Field(
        default=None,
        description="When set, the trainer's endpoints (but its probes and docs) need `Authorization: Bearer <key>`; "
        "the curator sends it.",
    )
    max_request_bytes: int = Field(
        default=64 * 2**20,
        ge=1024,
        description="Largest request body the teacher and the trainer accept (413 above it, refused as it arrives); "
        "the curator's uploads have `max_upload_bytes`.",
    )
    job_timeout_seconds: int = Field(default=3600, ge=10, description="A job running longer than this is failed.")
    job_retries: int = Field(
        default=3, ge=1, description="Times a failed job (or one whose worker died) is run again before it fails."
    )
    worker_heartbeat_seconds: int = Field(
        default=5,
        ge=1,
        description="How often a worker reports that its job is alive; a job silent for three of these counts as "
        "abandoned (its worker died) and is run again by another worker.",
    )
    maintenance_interval_seconds: int = Field(
        default=10, ge=1, description="How often each worker looks for abandoned jobs to run again."
    )

    @model_validator(mode="after")
    def default_adapters_dir(self):
        if self.adapters_dir is None:
            self.adapters_dir = self.data_dir / "adapters"
        return self

    @field_validator("teacher_urls", mode="before")
    @classmethod
    def split_urls(cls, value):
        if isinstance(value, str):
            value = [url.strip() for url in value.split(",")]
        urls = [url.rstrip("/") for url in value if url]
        if not urls:
            raise ValueError("at least one teacher URL is needed")
        return urls

    def teacher_key(self) -> str | None:
        return self.teacher_api_key.get_secret_value() if self.teacher_api_key else None

    def trainer_key(self) -> str | None:
        return self.trainer_api_key.get_secret_value() if self.trainer_api_key else None


class CurationConfig(BaseModel):
    """One curation run (steps 1-5 of SSB). Defaults follow the paper where it gives one."""

    k: int = Field(default=4, ge=2, le=64, description="Rollouts per problem (paper: 4).")
    rollout_temperature: Temperature = Field(default=0.8, description="Rollout sampling temperature (paper: 0.8).")
    rollout_top_k: TopK = Field(default=50, description="Rollout top-k sampling (paper: 50; -1 is off).")
    rollout_top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Rollout nucleus sampling.")
    rollout_max_tokens: MaxTokens = Field(default=512, description="Longest rollout, in tokens.")
    explanation_temperature: Temperature = Field(
        default=0.4, description="Hinted explanation temperature (paper: 0.4)."
    )
    explanation_max_tokens: MaxTokens = Field(default=768, description="Longest explanation, in tokens.")
    explanation_attempts: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Hinted explanations sampled per problem with a mix (one engine call, n samples); the first that "
        "passes (ends by itself with the gold answer, and does not speak of the attempts it was shown) becomes the "
        "pair (paper: 1). Each attempt costs one explanation's tokens.",
    )
    topk: int = Field(default=20, ge=1, le=256, description="Teacher log-probabilities kept per explanation token.")
    seed: Seed = Field(default=0, description="Seeds sampling and the tie-breaking draws.")
    worked_example: bool = Field(default=False, description="Put one worked example turn before every question.")
    extraction_order: ExtractionOrder = Field(
        default=DEFAULT_EXTRACTION_ORDER, description="How final answers are pulled from text, first match wins."
    )
    # 64 rather than 32: the demo's curation 1.10-1.16x faster (fewer engine calls, each ending with a few long
    # answers decoded alone); larger batches gain little more and report progress less often (docs/BENCHMARKS.md).
    batch_size: int = Field(
        default=64, ge=1, description="Problems per engine call (their rollouts, with the previous batch's explanations)."
    )

    @model_validator(mode="after")
    def attempts_need_sampling(self) -> CurationConfig:
        if self.explanation_attempts > 1 and self.explanation_temperature == 0:
            raise ValueError("explanation_attempts above 1 needs explanation_temperature above 0 (greedy repeats itself)")
        return self

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
            n=self.explanation_attempts,
            temperature=self.explanation_temperature,
            max_tokens=self.explanation_max_tokens,
            seed=self.seed,
            logprobs=self.topk,
        )
