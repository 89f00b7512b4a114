"""Behaviour importance weights and the rollout-trainer log-prob gap, as pure tensor functions.

Shapes: ``[B, T]`` tensors padded to the longest sample, with a float ``mask [B, T]`` that is
1 on generated tokens the loss sees and 0 on padding (and on prompt tokens, if present).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

WeightMode = Literal["none", "truncate", "mask"]
WeightLevel = Literal["token", "sequence"]
WEIGHT_MODES: tuple[str, ...] = ("none", "truncate", "mask")
WEIGHT_LEVELS: tuple[str, ...] = ("token", "sequence")


@dataclass(frozen=True)
class BehaviourWeights:
    """What ``behaviour_weights`` returns."""

    weights: torch.Tensor
    """[B, T] float, detached: the weight applied to each token's loss; 0 on padding and on
    tokens (or samples) the ``mask`` mode removed."""
    mask: torch.Tensor
    """[B, T] float: the effective mask, the input mask with masked-out tokens set to 0."""
    stats: dict[str, torch.Tensor]
    """``w_mean``, ``w_max``, ``w_min`` of the raw weight ``exp(p - b)`` (before truncation or
    masking) over valid tokens; ``w_frac_masked`` and ``w_frac_truncated``: fractions of valid
    tokens that ``mask`` removed / ``truncate`` capped. All 0 when no token is valid. 0-dim
    tensors on the inputs' device: computing them never waits for the device."""

    @property
    def metrics(self) -> dict[str, float]:
        """``stats`` as floats (one device sync)."""
        return to_floats(self.stats)


def to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors as floats, read from the device in one transfer."""
    if not stats:
        return {}
    values = torch.stack([v.detach().double() for v in stats.values()]).tolist()
    return dict(zip(stats, values, strict=True))


def masked_mean_max_min(
    x: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, max and min of ``x`` over ``valid`` as 0-dim tensors (all 0 when nothing is
    valid), without boolean indexing: no device sync."""
    n = valid.sum()
    any_valid = n > 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mean = torch.where(valid, x, zero).sum() / n.clamp_min(1).to(x.dtype)
    mx = torch.where(valid, x, torch.full_like(x, float("-inf"))).amax()
    mn = torch.where(valid, x, torch.full_like(x, float("inf"))).amin()
    return mean, torch.where(any_valid, mx, zero), torch.where(any_valid, mn, zero)


def _check_2d(name: str, t: torch.Tensor, shape: torch.Size | None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be [B, T]; got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def behaviour_weights(
    prox_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: WeightMode = "none",
    level: WeightLevel = "token",
    *,
    cap: float | None = None,
    lo: float | None = None,
    hi: float | None = None,
) -> BehaviourWeights:
    """Importance weights that correct for sampling from the behaviour policy.

    ``w = exp(p - b)`` with ``p`` the proximal log-prob (recomputed by the trainer) and ``b`` the
    behaviour log-prob (reported by the inference server when it sampled the token).

    * ``level="token"``: one weight per token.
    * ``level="sequence"``: one weight per sample, the geometric mean of its token weights,
      ``exp(sum_t m_t (p_t - b_t) / sum_t m_t)``, broadcast over the sample's tokens. If every
      token of a sample has the same ``p - b`` the two levels agree.
    * ``mode="none"``: ``w`` as is. ``mode="truncate"``: ``min(w, cap)`` (truncated IS, TIS).
      ``mode="mask"``: ``w`` where ``lo <= w <= hi``, else the token (token level) or the
      whole sample (sequence level) is masked out (MIS / icepop-style).

    Invariants: weights are detached (gradients never flow into ``p`` or ``b`` through them),
    are 0 wherever the effective mask is 0, and ``0 <= weights <= cap`` under ``truncate``.
    Parameters a mode does not use (``cap`` outside ``truncate``, ``lo``/``hi`` outside
    ``mask``) are ignored.
    """
    _check_2d("mask", mask, None)
    _check_2d("prox_logp", prox_logp, mask.shape)
    _check_2d("behav_logp", behav_logp, mask.shape)
    if mode not in WEIGHT_MODES:
        raise ValueError(f"behaviour_weights: mode={mode!r}; allowed: {', '.join(WEIGHT_MODES)}")
    if level not in WEIGHT_LEVELS:
        raise ValueError(f"behaviour_weights: level={level!r}; allowed: {', '.join(WEIGHT_LEVELS)}")
    if mode == "truncate" and (cap is None or not cap > 0 or cap == float("inf")):
        raise ValueError(
            f"behaviour_weights: mode='truncate' needs a finite cap > 0; got cap={cap!r}"
        )
    if mode == "mask" and (lo is None or hi is None or not 0 <= lo < hi):
        raise ValueError(
            f"behaviour_weights: mode='mask' needs 0 <= lo < hi; got lo={lo!r}, hi={hi!r}"
        )

    with torch.no_grad():
        m = mask.detach().to(prox_logp.dtype)
        valid = m > 0
        # where(), not multiply: padding may hold -inf or garbage log-probs.
        log_w = torch.where(valid, prox_logp.detach() - behav_logp.detach(), torch.zeros_like(m))
        if level == "sequence":
            per_seq = (log_w * m).sum(-1) / m.sum(-1).clamp_min(1.0)
            log_w = per_seq.unsqueeze(-1).expand_as(m)
        raw = torch.exp(log_w)
        n_valid = valid.sum().clamp_min(1).to(m.dtype)
        zero = torch.zeros((), dtype=m.dtype, device=m.device)

        eff_mask = m.clone()
        w = raw
        frac_masked = zero
        frac_truncated = zero
        if mode == "truncate":
            assert cap is not None
            over = (raw > cap) & valid
            frac_truncated = over.sum().to(m.dtype) / n_valid
            w = raw.clamp(max=cap)
        elif mode == "mask":
            assert lo is not None and hi is not None
            keep = (raw >= lo) & (raw <= hi)
            removed = valid & ~keep
            frac_masked = removed.sum().to(m.dtype) / n_valid
            eff_mask = torch.where(keep, m, torch.zeros_like(m))
        weights = w * eff_mask

        w_mean, w_max, w_min = masked_mean_max_min(raw, valid)
        stats = {
            "w_mean": w_mean,
            "w_max": w_max,
            "w_min": w_min,
            "w_frac_masked": frac_masked,
            "w_frac_truncated": frac_truncated,
        }
    return BehaviourWeights(weights=weights, mask=eff_mask, stats=stats)


def logprob_gap(
    trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the trainer's log-probs are from the inference server's on the same tokens.

    On ``mask`` (pass the tokens generated under the trainer's current version, where the two
    policies are the same weights) with ``d = trainer_logp - rollout_logp``:

    * ``logp_abs_diff``: mean ``|d|``;
    * ``logp_k3_kl``: mean ``exp(d) - 1 - d``, the k3 estimator of KL(rollout || trainer) from
      samples of the rollout policy; >= 0 per token, 0 iff ``d == 0``;
    * ``logp_gap_tokens``: how many tokens were compared.

    Both are ~0 with deterministic inference; a large gap means the trainer's and the server's
    numerics (or weights) disagree. All 0.0 when the mask is empty.
    """
    _check_2d("mask", mask, None)
    _check_2d("trainer_logp", trainer_logp, mask.shape)
    _check_2d("rollout_logp", rollout_logp, mask.shape)
    return dict(
        zip(
            ("logp_abs_diff", "logp_k3_kl", "logp_gap_tokens"),
            _gap_means(logprob_gap_sums(trainer_logp, rollout_logp, mask).tolist()),
            strict=True,
        )
    )


def _gap_means(sums: list[float]) -> list[float]:
    abs_sum, k3_sum, n = sums
    return [abs_sum / n, k3_sum / n, n] if n else [0.0, 0.0, 0.0]


def logprob_gap_sums(
    trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """float64[3] on the inputs' device: ``sum |d|``, ``sum exp(d) - 1 - d`` and the token
    count over ``mask`` (``logprob_gap``'s sums, for callers that add several batches before
    reading anything back)."""
    with torch.no_grad():
        valid = mask > 0
        d = torch.where(
            valid, trainer_logp.detach() - rollout_logp.detach(), torch.zeros_like(trainer_logp)
        ).double()
        return torch.stack([d.abs().sum(), (torch.expm1(d) - d).sum(), valid.sum().double()])
