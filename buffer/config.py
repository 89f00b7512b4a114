"""The ``redis`` section of the run config: where a run's Redis is and how to reach it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RedisConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL: redis:// or rediss:// (TLS), optional user:password@, db; or a "
        "Redis Cluster: redis+cluster://host:port[,host:port...] (docs/scale.md). "
        "The password may instead come from $SLUICE_REDIS_PASSWORD.",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        from buffer.connection import validate_url

        return validate_url(url)
