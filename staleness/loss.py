"""The decoupled-PPO loss with behaviour-importance correction, as a pure function
``LossInputs -> LossOutputs``.

Per token, with current log-prob ``θ`` (carries the gradient), proximal log-prob ``p``
(recomputed by the trainer before the step, no gradient) and behaviour log-prob ``b`` (from the
inference server, possibly from several policy versions)::

    r = exp(θ - p)                      # trust-region ratio, clipped
    w = exp(p - b)                      # behaviour correction, truncated or masked, no gradient
    loss_t = -w * min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
    with dual clip c (A < 0 only):  loss_t = -w * max(min(...), c * A)

With an entropy bonus (``entropy_coef`` = β > 0 and the policy's entropy ``H_t`` at each token's
position given), ``loss_t`` gains ``- β * H_t`` on the valid tokens, aggregated like the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from staleness.config import LossConfig
from staleness.weights import behaviour_weights, masked_mean_max_min, to_floats

Aggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch of B padded samples of up to T generated tokens."""

    logp: torch.Tensor
    """[B, T] float: log-probs of the sampled tokens under the policy being trained (θ);
    the only input gradients flow through."""
    prox_logp: torch.Tensor
    """[B, T] float: proximal log-probs, the same tokens under the weights at the start of this
    step (p). Treated as constants."""
    behav_logp: torch.Tensor
    """[B, T] float: behaviour log-probs the inference server reported when sampling (b)."""
    advantages: torch.Tensor
    """[B, T] per token, or [B] per sample (broadcast over its tokens). Treated as constants."""
    mask: torch.Tensor
    """[B, T] float: 1 on generated tokens, 0 on padding."""
    settings: LossConfig
    """Clipping (``eps_low``, ``eps_high``, ``dual_clip``), the behaviour-weight correction
    (``is_mode``, ``is_level``, ``is_cap``, ``is_lo``, ``is_hi``) and the ``aggregation``:
    ``staleness.config.LossConfig``, the one declaration of these settings and their defaults
    (the trainer passes its ``TrainerConfig``, which extends it)."""
    entropy: torch.Tensor | None = None
    """[B, T] float: the policy's entropy at each token's position (differentiable, the same
    forward as ``logp``); required when ``settings.entropy_coef > 0``, ignored otherwise."""


@dataclass(frozen=True)
class LossOutputs:
    loss: torch.Tensor
    """0-dim: the aggregated loss, differentiable w.r.t. ``LossInputs.logp``."""
    per_token_loss: torch.Tensor
    """[B, T]: ``-w * objective`` per token; 0 on padding and on masked-out tokens."""
    weights: torch.Tensor
    """[B, T]: the behaviour weights applied (detached)."""
    mask: torch.Tensor
    """[B, T]: the effective mask after behaviour masking."""
    stats: dict[str, torch.Tensor]
    """``loss``, ``clip_frac`` (valid tokens whose clipped term was the active one, i.e. got no
    gradient), ``dual_clip_frac``, ``approx_kl`` (mean k3 ``(r - 1) - log r``), ``ratio_mean``,
    ``ratio_max``, ``tokens``, and the behaviour-weight metrics (``w_mean``, ``w_max``,
    ``w_min``, ``w_frac_masked``, ``w_frac_truncated``): detached 0-dim tensors on the
    inputs' device, so the loss never waits for the device (all 0 when no token is valid)."""

    @property
    def metrics(self) -> dict[str, float]:
        """``stats`` as floats (one device sync)."""
        return to_floats(self.stats)


def _check(inp: LossInputs) -> None:
    m = inp.mask
    if m.dim() != 2:
        raise ValueError(f"LossInputs.mask must be [B, T]; got shape {tuple(m.shape)}")
    for name in ("logp", "prox_logp", "behav_logp"):
        t = getattr(inp, name)
        if t.shape != m.shape:
            raise ValueError(
                f"LossInputs.{name} has shape {tuple(t.shape)}, expected {tuple(m.shape)}"
            )
    a = inp.advantages
    if a.shape != m.shape and a.shape != m.shape[:1]:
        raise ValueError(
            f"LossInputs.advantages has shape {tuple(a.shape)}; expected [B, T]={tuple(m.shape)} "
            f"or [B]={tuple(m.shape[:1])}"
        )
    if inp.settings.entropy_coef > 0:
        if inp.entropy is None:
            raise ValueError("LossInputs.entropy is required when entropy_coef > 0")
        if inp.entropy.shape != m.shape:
            raise ValueError(
                f"LossInputs.entropy has shape {tuple(inp.entropy.shape)}, expected "
                f"{tuple(m.shape)}"
            )
    # The settings were validated when the LossConfig was built (bounds and allowed values
    # are declared there, once).


def decoupled_ppo_loss(inp: LossInputs) -> LossOutputs:
    """The loss of one micro-batch (formula in the module docstring).

    Aggregation over the input mask ``m`` (tokens removed by behaviour masking contribute 0 but
    still count in the denominators, so masking never up-weights the tokens that remain; rows
    with no valid token are left out of the sample means):

    * ``token_mean``: ``sum_bt loss * m / sum_bt m``;
    * ``seq_mean_token_sum``: mean over samples of ``sum_t loss * m`` (Dr. GRPO style);
    * ``seq_mean_token_mean``: mean over samples of ``sum_t loss * m / sum_t m`` (GRPO).

    Invariants: with ``w == 1`` and ``θ == p`` the loss is ``-mean(A)`` under the chosen
    aggregation and its gradient is the vanilla policy gradient; the gradient is 0 on tokens
    whose clipped term is active. An all-zero mask gives a zero loss that still backpropagates.
    """
    _check(inp)
    c = inp.settings
    m = inp.mask.to(inp.logp.dtype)
    valid = m > 0
    bw = behaviour_weights(
        inp.prox_logp,
        inp.behav_logp,
        m,
        c.is_mode,
        c.is_level,
        cap=c.is_cap,
        lo=c.is_lo,
        hi=c.is_hi,
    )
    adv = inp.advantages.detach().to(inp.logp.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(m)
    adv = torch.where(valid, adv, torch.zeros_like(adv))

    log_ratio = torch.where(valid, inp.logp - inp.prox_logp.detach(), torch.zeros_like(inp.logp))
    ratio = torch.exp(log_ratio)
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - c.eps_low, 1.0 + c.eps_high) * adv
    objective = torch.minimum(surr1, surr2)
    dual_active = torch.zeros_like(valid)
    if c.dual_clip is not None:
        floor = c.dual_clip * adv
        dual_active = (adv < 0) & (floor > objective) & valid
        objective = torch.where(dual_active, floor, objective)
    per_token = -bw.weights * objective * m
    ent = None
    if c.entropy_coef > 0:
        assert inp.entropy is not None
        ent = torch.where(valid, inp.entropy, torch.zeros_like(inp.entropy))
        per_token = per_token - c.entropy_coef * ent * m

    if c.aggregation == "token_mean":
        loss = per_token.sum() / m.sum().clamp_min(1.0)
    else:
        rows = m.sum(-1)
        row_valid = (rows > 0).to(m.dtype)
        per_row = per_token.sum(-1)
        if c.aggregation == "seq_mean_token_mean":
            per_row = per_row / rows.clamp_min(1.0)
        loss = (per_row * row_valid).sum() / row_valid.sum().clamp_min(1.0)

    with torch.no_grad():
        n = valid.sum().to(m.dtype)
        clipped = (surr2.detach() < surr1.detach()) & valid
        lr = log_ratio.detach()
        ratio_mean, ratio_max, _ = masked_mean_max_min(ratio.detach(), valid)
        stats: dict[str, torch.Tensor] = {
            "loss": loss.detach(),
            "tokens": n,
            "clip_frac": clipped.sum().to(m.dtype) / n.clamp_min(1.0),
            "dual_clip_frac": dual_active.sum().to(m.dtype) / n.clamp_min(1.0),
            "approx_kl": masked_mean_max_min(torch.expm1(lr) - lr, valid)[0],
            "ratio_mean": ratio_mean,
            "ratio_max": ratio_max,
            **bw.stats,
        }
        if ent is not None:
            stats["entropy"] = ent.detach().sum() / n.clamp_min(1.0)
    return LossOutputs(
        loss=loss, per_token_loss=per_token, weights=bw.weights, mask=bw.mask, stats=stats
    )
