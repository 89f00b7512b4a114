"""Config sections owned by ``staleness``: the staleness limit and the loss settings.

``LossConfig`` is the one declaration of the loss's settings and their defaults; the trainer's
section extends it (``trainer.eps_low`` ...) and ``staleness.loss`` takes it as it is.
Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from staleness.auto_eta import AutoEtaSettings


class StalenessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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
    auto: bool = Field(
        False,
        description="Let the trainer pick eta live (`eta: auto` sets this, starting from "
        "eta_start): the smallest eta in [0, eta_max] that keeps the trainer's idle share "
        "under idle_target and the waste under waste_target (docs/staleness.md).",
    )
    eta_max: int = Field(8, ge=0, le=1000, description="eta: auto never goes above this.")
    idle_target: float = Field(
        0.02, gt=0, lt=1, description="eta: auto: largest share of its time the trainer may wait."
    )
    waste_target: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="eta: auto: largest share of generated tokens that may be thrown away.",
    )
    auto_window: int = Field(8, ge=1, description="eta: auto: steps per decision.")
    auto_retry_after: int = Field(
        6, ge=0, description="eta: auto: windows before an eta found too small is tried again."
    )

    @model_validator(mode="before")
    @classmethod
    def _eta_auto(cls, data: Any) -> Any:
        """``eta: auto`` is ``auto: true`` starting at ``eta_start`` (default 1)."""
        if isinstance(data, dict) and data.get("eta") == "auto":
            data = dict(data)
            data["eta"] = data.pop("eta_start", 1)
            data["auto"] = True
        elif isinstance(data, dict) and "eta_start" in data:
            raise ValueError("eta_start is only read with eta: auto")
        return data

    @model_validator(mode="after")
    def _auto_bounds(self) -> StalenessConfig:
        if self.auto and self.eta > self.eta_max:
            raise ValueError(f"eta: auto starts at eta={self.eta}, above eta_max={self.eta_max}")
        return self

    def auto_settings(self) -> AutoEtaSettings | None:
        """The settings of ``eta: auto``, or None when eta is fixed."""
        if not self.auto:
            return None
        return AutoEtaSettings(
            eta_max=self.eta_max,
            idle_target=self.idle_target,
            waste_target=self.waste_target,
            window=self.auto_window,
            retry_after=self.auto_retry_after,
        )


class LossConfig(BaseModel):
    """Decoupled-PPO clipping and behaviour-importance correction (``staleness.loss``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    eps_low: float = Field(
        0.2, ge=0, lt=1, description="PPO clip: ratio lower bound 1 - eps_low (> 0)."
    )
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
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="Entropy bonus: the loss subtracts entropy_coef x the policy's entropy over "
        "the sampled tokens' positions (aggregated as the loss is). 0 = off (the trainer then "
        "does not compute the entropy). Keeps a small policy from collapsing onto one answer "
        "per prompt before it learns the task (examples/tool-task.yaml uses 0.02).",
    )
