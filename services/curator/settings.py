"""The curator's settings: what every service shares (`shared.settings.ServiceSettings`: Redis, key prefix, data
volume, teacher URLs and key, job timeouts and retries) plus the intake API's own, read once from `SSB_*` environment
variables (see `.env.example`). `ssb serve curator` and `ssb worker curate` both read this one class."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shared.settings import ApiKey, ServiceSettings


class CuratorSettings(ServiceSettings):
    """Every knob of `ssb serve curator` and `ssb worker curate`; command flags override the environment."""

    curator_host: str = Field(default="127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    curator_port: int = Field(default=8001, ge=1, le=65535, description="Port to listen on.")
    curator_api_key: ApiKey = Field(
        default=None,
        description="When set, every endpoint but the probes and the API's docs needs `Authorization: Bearer <key>`; "
        "`ssb submit` sends it.",
    )
    curator_url: str = Field(
        default="http://127.0.0.1:8001", description="Where `ssb submit` sends datasets (a client setting)."
    )
    max_upload_bytes: int = Field(
        default=64 * 2**20, ge=1024, description="Largest dataset upload accepted (413 above it)."
    )
    max_problems: int = Field(default=100_000, ge=1, description="Most problems one dataset may hold (413 above it).")

    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    def dataset_dir(self, dataset_id: str) -> Path:
        """A dataset's directory: its problems, its metadata, and its pair store (`pairs/`, `dropped/`)."""
        return self.datasets_dir() / dataset_id

    def curator_key(self) -> str | None:
        return self.curator_api_key.get_secret_value() if self.curator_api_key else None
