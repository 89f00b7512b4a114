"""One validated config per run, shared by every process (``sluice serve|rollout|train|demo``).

A YAML file plus dotted overrides (``--set trainer.lr=1e-5``). Every field has a type, bounds and
a help string; a bad value stops the process at start-up naming the field, the value and what
is allowed. Importing this module does not import torch.

Each section is declared by the package that owns it (``buffer.config``, ``staleness.config``,
``inference.config``, ``rollout_workers.config``, ``trainer.config``); this module composes them
into the one run file and adds the run's identity (``run``).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from buffer.config import RedisConfig
from inference.config import InferenceConfig, ModelConfig
from rollout_workers.config import RolloutConfig, TaskConfig
from sluice.errors import InputError
from staleness.config import StalenessConfig
from trainer.config import TrainerConfig


class ConfigError(InputError):
    """A config file or override that does not validate; the message names every bad field
    (exit 2, ``sluice.errors``)."""


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
        if err["type"] == "extra_forbidden":
            lines.append(f"  {unknown_key_message(err['loc'])}")
            continue
        val = err.get("input")
        if loc == "redis.url" and isinstance(val, str):
            from buffer.connection import redact_url

            val = redact_url(val)
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc} = {val!r}: {msg}")
    return "\n".join(lines)


def _section_model(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model of the section at dotted ``path`` (() = the whole config), or None."""
    model: type[BaseModel] = SluiceConfig
    for part in path:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    """``"; did you mean PREFIX.X?"`` for the closest of ``choices`` to ``word``, else
    ``"; valid: a, b, c"`` (``""`` when there are no choices)."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; valid: {', '.join(choices)}" if choices else ""


def unknown_key_message(loc: tuple[Any, ...]) -> str:
    """``staleness.etta: unknown key; did you mean staleness.eta?`` for the unknown key at
    ``loc``, suggesting the closest field of its section (or the closest section)."""
    dotted = ".".join(str(p) for p in loc)
    parent = tuple(loc[:-1])
    model = _section_model(parent)
    what = "unknown section" if not parent else "unknown key"
    if model is None:
        return f"{dotted}: {what}"
    prefix = ".".join(str(p) for p in parent) + "." if parent else ""
    return f"{dotted}: {what}" + did_you_mean(str(loc[-1]), list(model.model_fields), prefix)


def _check_task_options(cfg: SluiceConfig) -> list[str]:
    """One line per unknown option of a built-in task (the task checks its values)."""
    from rollout_workers.tasks import task_options

    opts = task_options(cfg.task.name)
    if opts is None:
        return []
    names = [o.name for o in opts]
    out = []
    for k in cfg.task.options:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1, cutoff=0.6)
            hint = f"; did you mean task.options.{close[0]}?" if close else ""
            out.append(
                f"  task.options.{k}: unknown option of task {cfg.task.name!r}{hint} "
                f"(options: {', '.join(names)}; `sluice config show` lists them)"
            )
    return out


def task_options(cfg: SluiceConfig) -> dict[str, Any]:
    """``task.options`` as the task is built with: a task that takes a ``tokenizer`` option
    (the text task) gets ``model.path`` when the option is unset, so one model directory
    gives both the weights and the tokenizer."""
    from rollout_workers.tasks import task_options as options_of

    opts = dict(cfg.task.options)
    names = {o.name for o in options_of(cfg.task.name) or []}
    if "tokenizer" in names and not opts.get("tokenizer") and cfg.model.path:
        opts["tokenizer"] = cfg.model.path
    return opts


def build_task(cfg: SluiceConfig) -> Any:
    """The run's task (``get_task`` with ``task_options(cfg)``); ``TaskError`` naming what is
    wrong (a bad row as ``FILE:ROW: reason``)."""
    from rollout_workers.tasks import get_task

    return get_task(cfg.task.name, **task_options(cfg))


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
    """Read ``path`` (YAML; None = defaults), apply dotted ``overrides``, validate; relative
    dataset paths are resolved (``resolve_task_paths``)."""
    if path is None:
        return validate_config({}, overrides, "defaults")
    return resolve_task_paths(validate_config(read_config_file(path), overrides, str(path)), path)


TASK_PATH_OPTIONS = ("path", "eval_path", "tokenizer")
"""Task options that name files or directories."""


def resolve_task_paths(cfg: SluiceConfig, config_path: str | Path | None) -> SluiceConfig:
    """Make the task's relative file options (``TASK_PATH_OPTIONS``) absolute: against the
    current directory when the path exists there, else against the config file's directory
    (``examples/text-task.yaml`` names ``data/reverse-text.jsonl`` beside it). A path found in
    neither is left as it is, for the task to report."""
    opts = dict(cfg.task.options)
    for k in TASK_PATH_OPTIONS:
        v = opts.get(k)
        if not isinstance(v, str) or not v or Path(v).is_absolute():
            continue
        for base in [Path.cwd(), *([Path(config_path).resolve().parent] if config_path else [])]:
            if (base / v).exists():
                opts[k] = str((base / v).resolve())
                break
    cfg.task.options = opts
    return cfg


def validate_config(data: dict[str, Any], overrides: list[str] | None, source: str) -> SluiceConfig:
    """Apply dotted ``overrides`` to ``data`` (a config's sections, read from ``source``) and
    validate. Error messages name each override's key, not its value (it may hold a password)."""
    for o in overrides or []:
        apply_override(data, o)
        source += f" + --set {o.split('=', 1)[0]}=..."
    try:
        cfg = SluiceConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
    bad = _check_task_options(cfg)
    if bad:
        raise ConfigError("\n".join([f"invalid config ({source}):", *bad]))
    return cfg


def module_dirs(config_path: str | Path | None) -> list[Path]:
    """Where modules a config names (``module:function`` rewards) are looked for besides the
    installed packages: the config file's directory, then the current directory."""
    dirs = [Path(config_path).resolve().parent] if config_path is not None else []
    return [*dirs, Path.cwd()]


def add_module_dirs(config_path: str | Path | None) -> list[Path]:
    """Append ``module_dirs(config_path)`` to ``sys.path`` (after the installed packages, so
    they never shadow one) and to ``$PYTHONPATH`` (so processes this one starts, the demo's,
    find them too); returns the directories added."""
    added = []
    for d in module_dirs(config_path):
        if str(d) not in sys.path:
            sys.path.append(str(d))
            added.append(d)
        env = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(d) not in env:
            os.environ["PYTHONPATH"] = os.pathsep.join([*env, str(d)])
    return added


def dump_config(cfg: SluiceConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
