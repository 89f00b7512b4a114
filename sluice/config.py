"""One validated config per run, shared by every process (``sluice serve|rollout|train|demo``).

A YAML file plus dotted overrides (``--set trainer.lr=1e-5``). Every field has a type, bounds and
a help string; a bad value stops the process at start-up naming the field, the value and what
is allowed. Importing this module does not import torch.

Each section is declared by the package that owns it (``buffer.config``, ``staleness.config``,
``inference.config``, ``rollout_workers.config``, ``trainer.config``); this module composes them
into the one run file and adds the run's identity (``run``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from buffer.config import RedisConfig
from inference.config import InferenceConfig, ModelConfig
from rollout_workers.config import RolloutConfig, TaskConfig
from staleness.config import StalenessConfig
from trainer.config import TrainerConfig


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names every bad field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class SluiceConfig(Section):
    redis: RedisConfig = Field(default_factory=RedisConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    staleness: StalenessConfig = Field(default_factory=StalenessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)


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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML config file (not yet validated); ``ConfigError`` naming the file
    when it is missing, not YAML, or not a mapping."""
    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping of sections")
    return loaded


def add_config_arguments(
    p: Any, example: str, config_help: str | None = "run config YAML (default: built-in defaults)"
) -> None:
    """``--config FILE`` (unless ``config_help`` is None) and repeatable ``--set KEY=VALUE`` for a
    command (argparse parser)."""
    if config_help is not None:
        p.add_argument("--config", default=None, help=config_help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {example} (repeatable)",
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SluiceConfig:
    """Read ``path`` (YAML; None = defaults), apply dotted ``overrides``, validate."""
    if path is None:
        return validate_config({}, overrides, "defaults")
    return validate_config(read_config_file(path), overrides, str(path))


def validate_config(data: dict[str, Any], overrides: list[str] | None, source: str) -> SluiceConfig:
    """Apply dotted ``overrides`` to ``data`` (a config's sections, read from ``source``) and
    validate. Error messages name each override's key, not its value (it may hold a password)."""
    for o in overrides or []:
        apply_override(data, o)
        source += f" + --set {o.split('=', 1)[0]}=..."
    try:
        return SluiceConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def dump_config(cfg: SluiceConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
