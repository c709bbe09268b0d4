"""Settings: one typed class, read at entry points and passed down (never read at import)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "parse_models"]


def parse_models(text: str) -> dict[str, str]:
    """Parse `name=path-or-hub-id,...` into a mapping, refusing malformed entries."""
    models: dict[str, str] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"model entry {entry!r} must look like NAME=PATH")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"model name {name!r} may only hold letters, digits, '-', '_', '.'")
        models[name] = path
    return models


class Settings(BaseSettings):
    """Every knob of the farm. Environment variables use the prefix `SDFARM_`."""

    model_config = SettingsConfigDict(env_prefix="SDFARM_", extra="ignore")

    # Where the ledger and the Celery broker live (the same Redis).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # `s3://bucket/prefix` or `file:///absolute/dir`.
    storage_url: str = "file:///tmp/sdfarm-images"
    # Endpoint of an S3-compatible store (MinIO, SeaweedFS); None means AWS itself.
    s3_endpoint_url: str | None = None
    # How long a presigned image URL stays valid.
    presign_expiry_s: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    # Models the farm knows: name -> diffusers directory, single-file checkpoint or hub id.
    models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # The model a job gets when it names none (the first configured one when unset).
    default_model: str | None = None
    # Where clients find the API.
    api_url: str = "http://127.0.0.1:8000"
    # Server side: accepted API keys (comma separated); empty means no authentication.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Client side: the key sent as `Authorization: Bearer ...`.
    api_key: str | None = None

    # Most jobs rendered together in one batched pass.
    max_batch: int = Field(default=8, ge=1, le=256)
    # Chunks kept waiting in a model's Celery queue per live worker of that model.
    queue_chunks_per_worker: int = Field(default=2, ge=1, le=64)
    # Job and batch records expire this long after their last write.
    status_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    # A running job's lease; the worker renews it while it renders.
    lease_s: float = Field(default=60.0, gt=0)
    # A chunk sent to a queue but not started within this time is sent again.
    dispatch_timeout_s: float = Field(default=600.0, gt=0)
    # Attempts before a job is failed for good.
    max_attempts: int = Field(default=3, ge=1, le=100)
    # Celery's redelivery timeout; must exceed the longest chunk.
    visibility_timeout_s: int = Field(default=3600, ge=10)
    # Progress is written at most this often per chunk.
    progress_interval_s: float = Field(default=0.25, ge=0)
    # A worker's heartbeat record lives this long unless renewed.
    worker_ttl_s: float = Field(default=15.0, gt=0)
    # Longest accepted prompt, in characters.
    max_prompt_chars: int = Field(default=4000, ge=1)
    # Most jobs in one submitted batch.
    max_jobs_per_batch: int = Field(default=100_000, ge=1)

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        return parse_models(value) if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        if not value.startswith(("s3://", "file://")):
            raise ValueError(f"storage_url must start with s3:// or file://, got {value!r}")
        return value

    def model_names(self) -> list[str]:
        return list(self.models)

    def resolve_default_model(self) -> str | None:
        if self.default_model:
            return self.default_model
        return next(iter(self.models), None)
