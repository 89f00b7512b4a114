"""One validated config per run, shared by every process (``sluice serve|rollout|train|demo``).

A YAML file plus dotted overrides (``--set trainer.lr=1e-5``). Every field has a type, bounds and
a help string; a bad value stops the process at start-up naming the field, the value and what
is allowed. Importing this module does not import torch.

Sections are added by the packages that own them; each is a ``Section`` subclass below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names every bad field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RedisConfig(Section):
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL: redis:// or rediss:// (TLS), optional user:password@, db. "
        "The password may instead come from $SLUICE_REDIS_PASSWORD.",
    )


class RunConfig(Section):
    name: str = Field(
        "demo",
        pattern=r"^[A-Za-z0-9_.\-]{1,128}$",
        description="Run name: the Redis namespace sluice:{name}:... shared by all processes of the run.",
    )
    dir: str = Field(
        "runs/demo", description="Run directory: weights, checkpoints, metrics, report."
    )
    seed: int = Field(0, ge=0, description="Run seed (prompt order, sampling seeds, init).")


class StalenessConfig(Section):
    eta: int = Field(
        2,
        ge=0,
        le=1000,
        description="Staleness limit: a group started under version v is trained at a version <= v + eta. "
        "0 = synchronous RL.",
    )
    batch_groups: int = Field(
        8, ge=1, le=100_000, description="Groups consumed per train step (B)."
    )


class SluiceConfig(Section):
    redis: RedisConfig = Field(default_factory=RedisConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    staleness: StalenessConfig = Field(default_factory=StalenessConfig)


def _format_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        val = err.get("input")
        lines.append(f"  {loc} = {val!r}: {err['msg']}")
    return "\n".join(lines)


def _parse_scalar(text: str) -> Any:
    """Parse an override value as YAML (``1e-5``, ``true``, ``[1, 2]``), else keep the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.field=value")
    path, _, raw = assignment.partition("=")
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {assignment!r} has an empty key")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {assignment!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = _parse_scalar(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SluiceConfig:
    """Read ``path`` (YAML; None = defaults), apply dotted ``overrides``, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
        data = loaded
    for o in overrides or []:
        apply_override(data, o)
        source += f" + --set {o}"
    try:
        return SluiceConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def dump_config(cfg: SluiceConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
