"""The trainer service's settings: what every service shares (`shared.settings.ServiceSettings`: Redis, key prefix,
data volume, adapters directory, the teacher's URLs and key, the trainer's key, job retries, heartbeats) plus where the trainer API
listens and how long a training job may run; read once from `SSB_*` environment variables (see
`.env.example`). `ssb serve trainer` and `ssb worker train` both read it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shared.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """Every knob of `ssb serve trainer` and `ssb worker train`; the commands' flags override the environment."""

    trainer_host: str = Field(default="127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    trainer_port: int = Field(default=8002, ge=1, le=65535, description="Port to listen on.")
    train_timeout_seconds: int = Field(
        default=86_400,
        ge=60,
        description="A training job running longer than this is stopped; like any failure it is retried (from its "
        "newest checkpoint) while SSB_JOB_RETRIES allow, then failed (job_timeout_seconds bounds evaluation jobs).",
    )
    checkpoint_every: int = Field(
        default=50,
        ge=1,
        description="Optimizer steps between resumable checkpoints when a run does not set `checkpoint_every`: a run "
        "whose worker dies resumes from the last one.",
    )
    max_eval_problems: int = Field(
        default=10_000, ge=1, description="Most problems one evaluation request may upload."
    )

    def runs_dir(self) -> Path:
        """Each run's metrics, curve, checkpoints and training config: DATA_DIR/runs/<run id>/."""
        return self.data_dir / "runs"

    def evals_dir(self) -> Path:
        """Each evaluation's problems and report: DATA_DIR/evals/<eval id>/."""
        return self.data_dir / "evals"

    def datasets_dir(self) -> Path:
        """Curated datasets (pair stores written by the curator service): DATA_DIR/datasets/<dataset id>/."""
        return self.data_dir / "datasets"
