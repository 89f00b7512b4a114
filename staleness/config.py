"""Config sections owned by ``staleness``: the staleness limit and the loss settings.

``LossConfig`` is the one declaration of the loss's settings and their defaults; the trainer's
section extends it (``trainer.eps_low`` ...) and ``staleness.loss`` takes it as it is.
Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
