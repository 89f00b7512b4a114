"""One optimizer step on a list of samples: proximal log-probs, decoupled-PPO loss over
micro-batches, gradient clipping, AdamW + scheduler.

Invariants:
- The gradient equals that of the loss aggregated over the *whole step batch* (all
  micro-batches and, under data parallelism, all ranks): each micro-batch's loss is rescaled by
  ``its denominator / the global denominator`` (tokens for ``token_mean``, samples otherwise),
  so splitting the batch into micro-batches or ranks changes nothing but float rounding
  (``tests/test_trainer_ddp.py``).
- The model runs with dropout off (``eval()``): before the update ``θ == p`` exactly, so the
  trust-region ratio starts at 1 and only the behaviour weight ``exp(p - b)`` corrects for
  staleness.
- Exactly one optimizer step per call, including on a rank with no samples (it contributes a
  zero gradient so every rank joins the same collectives).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.batch import TrainSample, pack_micro_batches, token_logprobs


@dataclass(frozen=True)
class LossSettings:
    """The loss-related part of ``TrainerConfig`` plus the sampling temperature."""

    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    is_mode: str = "truncate"
    is_level: str = "token"
    is_cap: float = 2.0
    is_lo: float = 0.5
    is_hi: float = 2.0
    aggregation: str = "token_mean"
    prox_logp: str = "recompute"
    micro_batch_tokens: int = 16384
    max_grad_norm: float = 1.0
    pad_id: int = 0

    @classmethod
    def from_config(cls, tc: Any, temperature: float, pad_id: int = 0) -> LossSettings:
        return cls(
            temperature=temperature,
            eps_low=tc.eps_low,
            eps_high=tc.eps_high,
            dual_clip=tc.dual_clip,
            is_mode=tc.is_mode,
            is_level=tc.is_level,
            is_cap=tc.is_cap,
            is_lo=tc.is_lo,
            is_hi=tc.is_hi,
            aggregation=tc.aggregation,
            prox_logp=tc.prox_logp,
            micro_batch_tokens=tc.micro_batch_tokens,
            max_grad_norm=tc.max_grad_norm,
            pad_id=pad_id,
        )


@dataclass
class StepStats:
    """What one step measured, summed over ranks."""

    loss: float = 0.0
    tokens: int = 0
    samples: int = 0
    grad_norm: float = 0.0
    lr: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _all_reduce(t: torch.Tensor, dist: DistInfo, op: str = "sum") -> torch.Tensor:
    if dist.enabled:
        import torch.distributed as td

        td.all_reduce(t, op=td.ReduceOp.SUM if op == "sum" else td.ReduceOp.MAX)
    return t


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Order of the summed statistics vector exchanged between ranks.
_SUMS = (
    "tokens",
    "rows",
    "loss",
    "clip",
    "dual_clip",
    "w_sum",
    "w_masked",
    "w_trunc",
    "kl",
    "gap_abs",
    "gap_k3",
    "gap_tokens",
    "reward_sum",
    "reward_sq",
)


def train_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    samples: Sequence[TrainSample],
    settings: LossSettings,
    *,
    device: torch.device,
    current_version: int | None,
    dist: DistInfo = DistInfo(),
    crash_hook: Any = None,
) -> StepStats:
    """One optimizer step on this rank's ``samples`` (formula: ``staleness.loss``).

    ``model`` may be wrapped in ``DistributedDataParallel``. ``current_version`` is the
    version whose weights are in the model now (None if the model has moved since the last
    publication): the rollout-trainer log-prob gap is measured on tokens of that version.
    ``crash_hook(point)`` is called after the first backward ("mid_step").
    """
    from staleness import LossInputs, decoupled_ppo_loss, logprob_gap

    raw = model.module if hasattr(model, "module") else model
    raw.eval()
    mbs = [mb.to(device) for mb in pack_micro_batches(samples, settings.micro_batch_tokens)]

    # Global denominators, so the step's loss is one aggregate over every rank's batch.
    local_rows = sum(int((mb.mask.sum(-1) > 0).sum()) for mb in mbs)
    local_tokens = sum(int(mb.mask.sum()) for mb in mbs)
    denom = _all_reduce(torch.tensor([local_tokens, local_rows], dtype=torch.float64), dist)
    g_tokens, g_rows = float(denom[0]), float(denom[1])
    g_denom = g_tokens if settings.aggregation == "token_mean" else g_rows

    sums = dict.fromkeys(_SUMS, 0.0)
    w_max = 0.0
    prox: list[torch.Tensor] = []
    with torch.no_grad(), _autocast(device):
        for mb in mbs:
            if settings.prox_logp == "recompute":
                prox.append(token_logprobs(raw, mb, settings.temperature).detach())
            else:
                prox.append(mb.behav_logp)
    for mb, p in zip(mbs, prox, strict=True):
        if current_version is not None:
            cur = ((mb.versions == current_version) & (mb.mask > 0)).float()
            if settings.prox_logp == "recompute":
                gap = logprob_gap(p, mb.behav_logp, cur)
                n = gap["logp_gap_tokens"]
                sums["gap_abs"] += gap["logp_abs_diff"] * n
                sums["gap_k3"] += gap["logp_k3_kl"] * n
                sums["gap_tokens"] += n

    optimizer.zero_grad(set_to_none=False)
    n_mb = len(mbs)
    for i, (mb, p) in enumerate(zip(mbs, prox, strict=True)):
        sync = i == n_mb - 1
        ctx = model.no_sync() if (dist.enabled and not sync) else contextlib.nullcontext()
        with ctx:
            with _autocast(device):
                logp = token_logprobs(model, mb, settings.temperature)
            out = decoupled_ppo_loss(
                LossInputs(
                    logp=logp,
                    prox_logp=p,
                    behav_logp=mb.behav_logp,
                    advantages=mb.advantages,
                    mask=mb.mask,
                    eps_low=settings.eps_low,
                    eps_high=settings.eps_high,
                    dual_clip=settings.dual_clip,
                    is_mode=settings.is_mode,  # type: ignore[arg-type]
                    is_level=settings.is_level,  # type: ignore[arg-type]
                    is_cap=settings.is_cap,
                    is_lo=settings.is_lo,
                    is_hi=settings.is_hi,
                    aggregation=settings.aggregation,  # type: ignore[arg-type]
                )
            )
            local_denom = (
                float(mb.mask.sum())
                if settings.aggregation == "token_mean"
                else float((mb.mask.sum(-1) > 0).sum())
            )
            scale = local_denom / g_denom if g_denom > 0 else 0.0
            # DDP averages gradients over ranks; undo it so ranks sum like micro-batches do.
            loss = out.loss * (scale * dist.world_size)
            loss.backward()
        if crash_hook is not None and i == 0:
            crash_hook("mid_step")
        m = out.metrics
        n = m["tokens"]
        sums["tokens"] += n
        sums["rows"] += float((mb.mask.sum(-1) > 0).sum())
        sums["loss"] += float(out.loss.detach()) * scale
        sums["clip"] += m["clip_frac"] * n
        sums["dual_clip"] += m["dual_clip_frac"] * n
        sums["w_sum"] += m["w_mean"] * n
        sums["w_masked"] += m["w_frac_masked"] * n
        sums["w_trunc"] += m["w_frac_truncated"] * n
        sums["kl"] += m["approx_kl"] * n
        sums["reward_sum"] += float(mb.rewards.sum())
        sums["reward_sq"] += float((mb.rewards.double() ** 2).sum())
        w_max = max(w_max, m["w_max"])
    if n_mb == 0:
        # No samples here: join the gradient all-reduce with an exact zero gradient.
        dummy = torch.zeros((1, 2), dtype=torch.long, device=device)
        with _autocast(device):
            zero = model(input_ids=dummy, use_cache=False).logits.float().sum() * 0.0
        zero.backward()

    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), settings.max_grad_norm)
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    vec = _all_reduce(torch.tensor([sums[k] for k in _SUMS], dtype=torch.float64), dist)
    s = dict(zip(_SUMS, vec.tolist(), strict=True))
    mx = _all_reduce(torch.tensor([w_max], dtype=torch.float64), dist, op="max")
    tok = max(s["tokens"], 1.0)
    rows = max(s["rows"], 1.0)
    r_mean = s["reward_sum"] / rows
    r_var = max(0.0, s["reward_sq"] / rows - r_mean * r_mean)
    metrics = {
        "clip_frac": s["clip"] / tok,
        "dual_clip_frac": s["dual_clip"] / tok,
        "w_mean": s["w_sum"] / tok,
        "w_max": float(mx[0]),
        "w_frac_masked": s["w_masked"] / tok,
        "w_frac_truncated": s["w_trunc"] / tok,
        "approx_kl": s["kl"] / tok,
        "reward_mean": r_mean,
        "reward_std": math.sqrt(r_var),
        "logp_gap_tokens": s["gap_tokens"],
        "logp_abs_diff": s["gap_abs"] / s["gap_tokens"] if s["gap_tokens"] else float("nan"),
        "logp_k3_kl": s["gap_k3"] / s["gap_tokens"] if s["gap_tokens"] else float("nan"),
    }
    return StepStats(
        loss=s["loss"],
        tokens=int(s["tokens"]),
        samples=int(s["rows"]),
        grad_norm=float(grad_norm),
        lr=lr,
        metrics=metrics,
    )
