"""One validated config per run, shared by every process (``sluice serve|rollout|train|demo``).

A YAML file plus dotted overrides (``--set trainer.lr=1e-5``). Every field has a type, bounds and
a help string; a bad value stops the process at start-up naming the field, the value and what
is allowed. Importing this module does not import torch.

Sections are added by the packages that own them; each is a ``Section`` subclass below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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


class ModelConfig(Section):
    path: str = Field(
        "",
        description="Hugging Face causal-LM directory (config.json + safetensors). Empty: the run "
        "creates a tiny random-init model for the task under RUN_DIR/model.",
    )
    layers: int = Field(2, ge=1, le=64, description="Tiny model layers (when path is empty).")
    hidden: int = Field(
        64, ge=8, le=8192, description="Tiny model hidden size (when path is empty)."
    )
    heads: int = Field(
        4, ge=1, le=128, description="Tiny model attention heads (when path is empty)."
    )
    arch: Literal["llama", "qwen2"] = Field("llama", description="Tiny model architecture.")


class TaskConfig(Section):
    name: str = Field(
        "reverse", description="Task: reverse | long-tail | jsonl (built in) or a registered name."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Task options, e.g. {digits: 4} for reverse, {path: data.jsonl, reward: mod:fn} for jsonl.",
    )


class InferenceConfig(Section):
    engine: Literal["auto", "sglang", "cpu"] = Field(
        "auto",
        description="Inference engine: sglang (GPU), cpu (reference server), auto = sglang when it imports and CUDA is present.",
    )
    servers: list[str] = Field(
        default_factory=list, description="URLs of running inference servers (empty: launch them)."
    )
    launch: int = Field(1, ge=0, le=64, description="Servers to launch when `servers` is empty.")
    threads: int = Field(1, ge=1, le=256, description="Torch threads per CPU server.")
    mem_fraction: float | None = Field(
        None, gt=0, le=1, description="SGLang --mem-fraction-static."
    )
    tp_size: int = Field(1, ge=1, le=64, description="SGLang tensor-parallel size.")
    deterministic: bool = Field(False, description="SGLang --enable-deterministic-inference.")
    admin_api_key: str | None = Field(
        None, description="SGLang --admin-api-key (sent as a Bearer token)."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Extra server launch arguments."
    )


class RolloutConfig(Section):
    n_samples: int = Field(8, ge=1, le=4096, description="Samples per group (GRPO group size).")
    max_inflight_groups: int = Field(
        8, ge=1, le=100_000, description="Groups generated concurrently per worker."
    )
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="Top-k (-1 = whole vocabulary).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Output budget per sample (default: the task's)."
    )
    lease_ttl_s: float = Field(
        60.0,
        gt=0,
        description="Prompt lease TTL: prompts held by a dead worker are served again after it.",
    )
    heartbeat_ttl_s: float = Field(
        15.0, gt=0, description="Worker heartbeat TTL: a silent worker's slots are reaped after it."
    )
    reward_timeout_s: float = Field(
        30.0, gt=0, description="A reward call slower than this rejects the group."
    )
    reward_fn: str | None = Field(None, description="module:function overriding the task's reward.")
    eval_every: int = Field(
        0, ge=0, description="Evaluate held-out prompts every N versions (0 = never)."
    )
    eval_prompts: int = Field(
        64, ge=1, le=100_000, description="Eval prompts per evaluation (the task's first N)."
    )
    update_mode: Literal["abort_all", "pause"] = Field(
        "abort_all",
        description="Weight update: abort_all = one update_weights_from_disk(abort_all_requests) "
        "per server (fast); pause = pause -> update -> continue (servers shared by other clients).",
    )
    ignore_eos: bool = Field(
        False, description="Generate max_new_tokens every time (benchmarks, interruption tests)."
    )
    health_interval_s: float = Field(
        1.0, gt=0, le=600, description="Seconds between server health polls."
    )
    log_every: int = Field(
        50, ge=1, description="One JSON metrics line on stderr per this many pushed groups."
    )
    metrics_interval_s: float = Field(
        2.0, gt=0, le=600, description="Seconds between metrics writes to Redis."
    )
    shutdown_grace_s: float = Field(
        10.0,
        gt=0,
        le=25,
        description="On SIGTERM, seconds to let aborted groups hand back their slots before "
        "cancelling them (exit stays within 30 s).",
    )


class TrainerConfig(Section):
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_steps: int = Field(100, ge=1, description="Train steps before the trainer stops.")
    eps_low: float = Field(0.2, ge=0, le=1, description="PPO clip: ratio lower bound 1 - eps_low.")
    eps_high: float = Field(
        0.28, ge=0, le=10, description="PPO clip: ratio upper bound 1 + eps_high."
    )
    dual_clip: float | None = Field(
        None, gt=1, description="Dual-clip constant c (> 1) for negative advantages; None = off."
    )
    is_mode: Literal["none", "truncate", "mask"] = Field(
        "truncate",
        description="Behaviour importance correction: none | truncate (TIS) | mask (MIS).",
    )
    is_level: Literal["token", "sequence"] = Field(
        "token", description="Importance weights per token or per sequence (geometric mean)."
    )
    is_cap: float = Field(2.0, gt=0, description="Truncation cap C for is_mode=truncate.")
    is_lo: float = Field(0.5, ge=0, description="Lower bound for is_mode=mask.")
    is_hi: float = Field(2.0, gt=0, description="Upper bound for is_mode=mask.")
    aggregation: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = Field(
        "token_mean", description="Loss aggregation."
    )
    normalize_adv_std: bool = Field(
        True, description="GRPO: divide advantages by the group's reward std."
    )
    prox_logp: Literal["recompute", "behaviour"] = Field(
        "recompute",
        description="Proximal log-probs: recomputed by one no-grad forward pass, or the behaviour ones.",
    )
    micro_batch_tokens: int = Field(16384, ge=1, description="Token budget per micro-batch.")
    publish_every: int = Field(1, ge=1, description="Publish weights every N steps.")
    keep_weights: int = Field(3, ge=1, description="Weight versions kept on disk.")
    checkpoint_every: int = Field(
        10, ge=1, description="Checkpoint every N steps (bounds replay after a crash)."
    )
    reclaim_idle_ms: int = Field(
        60_000, ge=1, description="Reclaim groups pending on a consumer idle this long."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device.")
    threads: int | None = Field(
        None, ge=1, description="Torch threads for training (None: torch default)."
    )
    reward_target: float | None = Field(
        None, ge=0, le=1, description="Stop once the mean reward of a step reaches this."
    )
    consumer: str = Field(
        "trainer-0",
        pattern=r"^[A-Za-z0-9_.\-]{1,100}$",
        description="Stable consumer name (suffixed -r{rank} under torchrun): a restarted "
        "trainer finds its own pending groups and checkpoint under it.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    wait_log_s: float = Field(
        30.0, gt=0, description="Log a line every this many seconds while waiting for data."
    )
    weight_sync: Literal["disk", "distributed"] = Field(
        "disk",
        description="How new weights reach the servers: disk (safetensors dir per version) or "
        "distributed (broadcast from the trainer to the servers; docs/weight-sync.md).",
    )
    bucket_mb: int = Field(
        256, ge=1, le=65536, description="distributed: MiB of parameters per broadcast bucket."
    )
    disk_every: int = Field(
        10, ge=1, description="distributed: also write the disk copy every N versions."
    )
    sync_master_addr: str = Field(
        "127.0.0.1", min_length=1, description="distributed: address the servers reach rank 0 at."
    )
    sync_port: int = Field(
        0, ge=0, le=65535, description="distributed: rendezvous port (0: pick a free one)."
    )
    sync_timeout_s: float = Field(
        60.0, gt=0, description="distributed: seconds to wait for servers to join or receive."
    )


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
