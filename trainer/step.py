"""One optimizer step on a list of samples: proximal log-probs, decoupled-PPO loss over
micro-batches, gradient clipping, AdamW + scheduler.

Invariants:
- The gradient equals that of the loss aggregated over the *whole step batch* (all
  micro-batches and, under data parallelism, all ranks): each micro-batch's loss is rescaled by
  ``its denominator / the global denominator`` (tokens for ``token_mean``, samples otherwise),
  so splitting the batch into micro-batches or ranks changes nothing but float rounding
  (``tests/integration/test_trainer_ddp.py``).
- The model runs with dropout off (``eval()``): before the update ``θ == p`` exactly, so the
  trust-region ratio starts at 1 and only the behaviour weight ``exp(p - b)`` corrects for
  staleness.
- Exactly one optimizer step per call, including on a rank with no samples (it contributes a
  zero gradient so every rank joins the same collectives).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.batch import (
    MicroBatch,
    TrainSample,
    pack_micro_batches,
    token_logprobs,
    token_logprobs_entropy,
)
from trainer.config import TrainerConfig

CrashHook = Callable[[str], None]


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
    "entropy",
)


def train_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    samples: Sequence[TrainSample],
    tc: TrainerConfig,
    *,
    temperature: float,
    pad_id: int = 0,
    device: torch.device,
    current_version: int | None,
    dist: DistInfo = DistInfo(),
    crash_hook: CrashHook | None = None,
) -> StepStats:
    """One optimizer step on this rank's ``samples`` (formula: ``staleness.loss``).

    ``tc`` gives the loss settings (``TrainerConfig`` extends ``staleness.config.LossConfig``)
    and ``micro_batch_tokens``, ``prox_logp``, ``max_grad_norm``; ``temperature`` is the
    sampling temperature the log-probs are taken at, ``pad_id`` the token padding is filled
    with. ``model`` may be wrapped in ``DistributedDataParallel``. ``current_version`` is the
    version whose weights are in the model now (None if the model has moved since the last
    publication): the rollout-trainer log-prob gap is measured on tokens of that version.
    ``crash_hook(point)`` is called after the first backward ("mid_step").
    """
    raw = model.module if hasattr(model, "module") else model
    raw.eval()
    # Samples of similar length share a micro-batch: far less padding than arrival order on
    # long-tailed outputs (the loss is a sum over micro-batches, so order changes only rounding).
    ordered = sorted(samples, key=lambda s: s.length)
    cpu_mbs = pack_micro_batches(ordered, tc.micro_batch_tokens, pad_id)
    denoms = [_local_denominator(mb, tc.aggregation) for mb in cpu_mbs]
    g_denom = _global_denominator(denoms, dist)
    mbs = [mb.to(device, non_blocking=True) for mb in cpu_mbs]
    # Every statistic is summed on the device and read back once, at the end of the step: no
    # micro-batch waits for the device to report a number.
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
    prox = _proximal_logps(raw, mbs, tc, temperature, device)
    if current_version is not None and tc.prox_logp == "recompute":
        _add_gap(sums, mbs, prox, current_version)
    optimizer.zero_grad(set_to_none=False)
    w_max = _accumulate_gradients(
        model, mbs, prox, tc, temperature, g_denom, denoms, sums, device, dist, crash_hook
    )
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a DTensor
        grad_norm = grad_norm.full_tensor()
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return _step_stats(sums, w_max, grad_norm, lr, dist)


def _rows(mb: MicroBatch) -> int:
    """How many rows of ``mb`` (on the CPU) have at least one output token."""
    return int((mb.mask.sum(-1) > 0).sum())


def _local_denominator(mb: MicroBatch, aggregation: str) -> float:
    """``mb``'s share of the loss denominator: tokens for ``token_mean``, samples otherwise."""
    return float(mb.mask.sum()) if aggregation == "token_mean" else float(_rows(mb))


def _global_denominator(denoms: list[float], dist: DistInfo) -> float:
    """The denominator of the whole step's loss over every rank's batch: the sum of every
    micro-batch's share (``_local_denominator``) on every rank."""
    return float(_all_reduce(torch.tensor([sum(denoms)], dtype=torch.float64), dist)[0])


def _proximal_logps(
    raw: Any, mbs: list[MicroBatch], tc: TrainerConfig, temperature: float, device: torch.device
) -> list[torch.Tensor]:
    """Per micro-batch the proximal log-probs ``p``: one no-grad forward at the weights of the
    start of the step (``prox_logp=recompute``), or the behaviour ones."""
    prox: list[torch.Tensor] = []
    with torch.no_grad(), _autocast(device):
        for mb in mbs:
            if tc.prox_logp == "recompute":
                prox.append(token_logprobs(raw, mb, temperature).detach())
            else:
                prox.append(mb.behav_logp)
    return prox


def _add_gap(
    sums: torch.Tensor, mbs: list[MicroBatch], prox: list[torch.Tensor], version: int
) -> None:
    """Add the rollout-trainer log-prob gap on the tokens sampled at ``version`` (the weights
    the model holds) to ``sums`` (on the device)."""
    from staleness.weights import logprob_gap_sums

    i = _SUMS.index("gap_abs")
    for mb, p in zip(mbs, prox, strict=True):
        cur = ((mb.versions == version) & (mb.mask > 0)).float()
        sums[i : i + 3] += logprob_gap_sums(p, mb.behav_logp, cur)


def _accumulate_gradients(
    model: Any,
    mbs: list[MicroBatch],
    prox: list[torch.Tensor],
    tc: TrainerConfig,
    temperature: float,
    g_denom: float,
    denoms: list[float],
    sums: torch.Tensor,
    device: torch.device,
    dist: DistInfo,
    crash_hook: CrashHook | None,
) -> torch.Tensor:
    """Backward every micro-batch's loss, rescaled to its share (``denoms``) of the step's
    global denominator; add its statistics to ``sums``; return the largest behaviour weight
    seen (0-dim, on the device). A rank without micro-batches backwards an exact zero so it
    joins the all-reduce."""
    from staleness import LossInputs, decoupled_ppo_loss
    from trainer.lora import adapter_dropout

    w_max = torch.zeros((), dtype=torch.float64, device=device)
    for i, (mb, p, local_denom) in enumerate(zip(mbs, prox, denoms, strict=True)):
        sync = i == len(mbs) - 1
        # DDP: one all-reduce, after the last micro-batch. FSDP2 (no ``no_sync``) reduce-
        # scatters after each one: deferring would hold the unsharded gradients.
        defer = dist.enabled and not sync and hasattr(model, "no_sync")
        ctx = model.no_sync() if defer else contextlib.nullcontext()
        with ctx:
            ent = None
            with _autocast(device), adapter_dropout(model):
                if tc.entropy_coef > 0:
                    logp, ent = token_logprobs_entropy(model, mb, temperature)
                else:
                    logp = token_logprobs(model, mb, temperature)
            out = decoupled_ppo_loss(
                LossInputs(logp, p, mb.behav_logp, mb.advantages, mb.mask, settings=tc, entropy=ent)
            )
            scale = local_denom / g_denom if g_denom > 0 else 0.0
            # DDP (and FSDP2's reduce-scatter) average gradients over ranks; undo it so ranks
            # sum like micro-batches do.
            loss = out.loss * (scale * dist.world_size)
            torch.autograd.backward(loss)
        if crash_hook is not None and i == 0:
            crash_hook("mid_step")
        _add_micro_batch(sums, mb, out.stats, scale)
        w_max = torch.maximum(w_max, out.stats["w_max"].double())
    if not mbs:
        # No samples here: join the gradient all-reduce with an exact zero gradient.
        dummy = torch.zeros((1, 2), dtype=torch.long, device=device)
        with _autocast(device):
            zero = model(input_ids=dummy, use_cache=False).logits.float().sum() * 0.0
        zero.backward()
    return w_max


def _add_micro_batch(
    sums: torch.Tensor, mb: MicroBatch, m: dict[str, torch.Tensor], scale: float
) -> None:
    """Add one micro-batch's loss metrics (token-weighted) and rewards to ``sums``, on the
    device."""
    n = m["tokens"].double()
    r = mb.rewards.double()
    rows = (mb.mask.sum(-1) > 0).sum().double()
    sums += torch.stack(
        [
            n,
            rows,
            m["loss"].double() * scale,
            m["clip_frac"].double() * n,
            m["dual_clip_frac"].double() * n,
            m["w_mean"].double() * n,
            m["w_frac_masked"].double() * n,
            m["w_frac_truncated"].double() * n,
            m["approx_kl"].double() * n,
            torch.zeros_like(n),  # gap_abs, gap_k3, gap_tokens: _add_gap
            torch.zeros_like(n),
            torch.zeros_like(n),
            r.sum(),
            (r**2).sum(),
            m["entropy"].double() * n if "entropy" in m else torch.zeros_like(n),
        ]
    )


def _step_stats(
    sums: torch.Tensor,
    w_max: torch.Tensor,
    grad_norm: torch.Tensor,
    lr: float,
    dist: DistInfo,
) -> StepStats:
    """Sum ``sums`` (max ``w_max``) over ranks and turn them into the step's statistics: the
    one point of the step that reads numbers back from the device."""
    vec = torch.cat([sums, w_max.reshape(1), grad_norm.detach().double().reshape(1)]).cpu()
    mx = _all_reduce(vec[-2:-1].clone(), dist, op="max")
    grad = float(vec[-1])
    vec = _all_reduce(vec[: len(_SUMS)].clone(), dist)
    s = dict(zip(_SUMS, vec.tolist(), strict=True))
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
    if s["entropy"]:
        metrics["entropy"] = s["entropy"] / tok
    return StepStats(
        loss=s["loss"],
        tokens=int(s["tokens"]),
        samples=int(s["rows"]),
        grad_norm=grad,
        lr=lr,
        metrics=metrics,
    )
