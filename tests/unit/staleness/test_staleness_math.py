"""The pure staleness math against hand-derived values (derivations in the comments)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from gate_model import GateBackend, GateMachine, PureGate
from hypothesis import HealthCheck, settings

from staleness import (
    BehaviourWeights,
    LossInputs,
    admission_capacity,
    behaviour_weights,
    decoupled_ppo_loss,
    grpo_advantages,
    logprob_gap,
    staleness,
)
from staleness.config import LossConfig

pytestmark = pytest.mark.timeout(60)
TOL = dict(rtol=0, atol=1e-6)


# ------------------------------------------------------------------ admission capacity
def test_capacity_formula() -> None:
    # (V + eta + 1) * B - (admitted - rejected) = (2 + 1 + 1) * 4 - (10 - 3) = 16 - 7 = 9
    assert admission_capacity(2, 1, 4, 10, 3) == 9
    # synchronous (eta = 0) at the start: one batch may be in flight: (0 + 0 + 1) * 8 - 0 = 8
    assert admission_capacity(0, 0, 8, 0, 0) == 8
    # over-admitted (eta lowered on a live run): (0 + 0 + 1) * 2 - (5 - 1) = -2 -> clamped to 0
    assert admission_capacity(0, 0, 2, 5, 1) == 0


@pytest.mark.parametrize(
    ("args", "word"),
    [
        ((-1, 0, 1, 0, 0), "version"),
        ((0, -1, 1, 0, 0), "eta"),
        ((0, 0, 0, 0, 0), "batch_groups"),
        ((0, 0, 1, 1, 2), "rejected=2 exceeds admitted=1"),
        ((0, 0, 1.5, 0, 0), "batch_groups"),
    ],
)
def test_capacity_rejects_bad_input(args: tuple[int, ...], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        admission_capacity(*args)


def test_staleness_is_current_minus_oldest_token() -> None:
    # 7 - min(5, 6, 7) = 2, whatever container carries the versions
    assert staleness(7, [6, 5, 7]) == 2
    assert staleness(7, torch.tensor([[6, 5, 7]])) == 2
    assert staleness(7, np.array([6, 5, 7], dtype=np.int32)) == 2
    assert staleness(3, [3, 3]) == 0
    with pytest.raises(ValueError, match="empty"):
        staleness(3, [])
    with pytest.raises(ValueError, match="empty"):
        staleness(3, torch.zeros(2, 0))
    assert staleness(3, torch.zeros(2, 0), admission_version=1) == 2


# ------------------------------------------------------------------ behaviour weights
def _three_tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # p - b = [ln 2, 0, -ln 4]  =>  w = exp(p - b) = [2, 1, 0.25]
    p = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    b = p - torch.tensor([[math.log(2), 0.0, -math.log(4)]], dtype=torch.float64)
    return p, b, torch.ones(1, 3, dtype=torch.float64)


def test_weights_none_token() -> None:
    p, b, m = _three_tokens()
    out = behaviour_weights(p, b, m)
    torch.testing.assert_close(
        out.weights, torch.tensor([[2.0, 1.0, 0.25]], dtype=torch.float64), **TOL
    )
    # mean (2 + 1 + 0.25) / 3 = 1.0833333
    assert out.metrics["w_mean"] == pytest.approx(3.25 / 3, abs=1e-9)
    assert out.metrics["w_max"] == pytest.approx(2.0, abs=1e-9)
    assert out.metrics["w_min"] == pytest.approx(0.25, abs=1e-9)
    assert out.metrics["w_frac_masked"] == 0.0
    assert not out.weights.requires_grad


def test_weights_truncate() -> None:
    p, b, m = _three_tokens()
    out = behaviour_weights(p, b, m, "truncate", cap=1.5)
    # min(w, 1.5) = [1.5, 1, 0.25]; one token of three was capped
    torch.testing.assert_close(
        out.weights, torch.tensor([[1.5, 1.0, 0.25]], dtype=torch.float64), **TOL
    )
    torch.testing.assert_close(out.mask, m)
    assert out.metrics["w_frac_truncated"] == pytest.approx(1 / 3)
    assert out.metrics["w_max"] == pytest.approx(2.0)  # raw weights in the metrics


def test_weights_mask() -> None:
    p, b, m = _three_tokens()
    out = behaviour_weights(p, b, m, "mask", lo=0.5, hi=1.5)
    # keep 0.5 <= w <= 1.5: only the middle token (w = 1) survives
    torch.testing.assert_close(
        out.weights, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), **TOL
    )
    torch.testing.assert_close(out.mask, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    assert out.metrics["w_frac_masked"] == pytest.approx(2 / 3)


def test_weights_sequence_level() -> None:
    p, b, m = _three_tokens()
    # geometric mean: exp((ln 2 + 0 - ln 4) / 3) = exp(-ln 2 / 3) = 2 ** (-1/3) = 0.7937005
    g = 2 ** (-1 / 3)
    out = behaviour_weights(p, b, m, "none", "sequence")
    torch.testing.assert_close(out.weights, torch.full((1, 3), g, dtype=torch.float64), **TOL)
    # masking at sequence level removes the whole sample (0.794 < 0.8) or keeps it whole
    gone = behaviour_weights(p, b, m, "mask", "sequence", lo=0.8, hi=2.0)
    assert gone.weights.abs().sum().item() == 0.0 and gone.metrics["w_frac_masked"] == 1.0
    kept = behaviour_weights(p, b, m, "mask", "sequence", lo=0.5, hi=2.0)
    torch.testing.assert_close(kept.weights, torch.full((1, 3), g, dtype=torch.float64), **TOL)


def test_weights_padding_is_zero_and_ignored() -> None:
    # row 2 has one real token (w = e^0.5) and padding holding -inf log-probs
    p = torch.tensor([[-1.0, -1.0], [-0.5, float("-inf")]])
    b = torch.tensor([[-1.0, -1.0], [-1.0, float("-inf")]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    for level in ("token", "sequence"):
        out = behaviour_weights(p, b, m, "none", level)  # type: ignore[arg-type]
        assert torch.isfinite(out.weights).all()
        assert out.weights[1, 1].item() == 0.0
        assert out.weights[1, 0].item() == pytest.approx(math.exp(0.5), abs=1e-6)
        # mean over the 3 valid tokens: (1 + 1 + e^0.5) / 3
        assert out.metrics["w_mean"] == pytest.approx((2 + math.exp(0.5)) / 3, abs=1e-6)


def test_sequence_equals_token_when_ratio_is_shared() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    shift = torch.randn(4, 1, generator=gen, dtype=torch.float64) * 0.3  # one ratio per sample
    b = p - shift
    m = torch.ones(4, 5, dtype=torch.float64)
    m[2, 3:] = 0
    for mode, kw in (("none", {}), ("truncate", {"cap": 1.1}), ("mask", {"lo": 0.8, "hi": 1.2})):
        tok = behaviour_weights(p, b, m, mode, "token", **kw)  # type: ignore[arg-type]
        seq = behaviour_weights(p, b, m, mode, "sequence", **kw)  # type: ignore[arg-type]
        torch.testing.assert_close(tok.weights, seq.weights, rtol=0, atol=1e-12)
        torch.testing.assert_close(tok.mask, seq.mask)
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    logp = p + 0.1 * torch.randn(4, 5, generator=gen, dtype=torch.float64)
    losses = [
        decoupled_ppo_loss(
            LossInputs(
                logp, p, b, adv, m, _settings(is_mode="truncate", is_cap=1.1, is_level=level)
            )
        ).loss
        for level in ("token", "sequence")
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)


def test_weights_bad_arguments() -> None:
    p, b, m = _three_tokens()
    with pytest.raises(ValueError, match="cap"):
        behaviour_weights(p, b, m, "truncate")
    with pytest.raises(ValueError, match="lo"):
        behaviour_weights(p, b, m, "mask", lo=2.0, hi=1.0)
    with pytest.raises(ValueError, match="mode"):
        behaviour_weights(p, b, m, "clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        behaviour_weights(p, b, m, "none", "batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        behaviour_weights(p[:, :2], b, m)
    assert isinstance(behaviour_weights(p, b, m), BehaviourWeights)


# ------------------------------------------------------------------ the loss
def _settings(**changes: Any) -> LossConfig:
    """The settings every hand derivation below assumes unless it names others: symmetric
    clip eps 0.2 (``eps_high=0.2``, not the run default 0.28) and no behaviour correction
    (``is_mode="none"``, not the run default "truncate"); ``changes`` override them."""
    return LossConfig(**{"eps_low": 0.2, "eps_high": 0.2, "is_mode": "none", **changes})


def _loss_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # theta - p = [ln 1.5, 0, ln 0.5]  =>  r = [1.5, 1, 0.5];  A = [1, -1, -2];  eps = 0.2
    # token 1: min(1.5 * 1, 1.2 * 1) = 1.2 (clipped)          -> loss -1.2
    # token 2: min(1 * -1, 1 * -1) = -1                        -> loss +1
    # token 3: min(0.5 * -2, 0.8 * -2) = min(-1, -1.6) = -1.6 (clipped) -> loss +1.6
    p = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    logp = p + torch.tensor([[math.log(1.5), 0.0, math.log(0.5)]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -2.0]], dtype=torch.float64)
    return logp, p, adv


def test_loss_hand_values() -> None:
    logp, p, adv = _loss_case()
    m = torch.ones(1, 3, dtype=torch.float64)
    out = decoupled_ppo_loss(LossInputs(logp.requires_grad_(), p, p, adv, m, _settings()))
    torch.testing.assert_close(
        out.per_token_loss, torch.tensor([[-1.2, 1.0, 1.6]], dtype=torch.float64), **TOL
    )
    # token mean: (-1.2 + 1 + 1.6) / 3 = 0.4666667
    assert out.loss.item() == pytest.approx(1.4 / 3, abs=1e-9)
    assert out.metrics["clip_frac"] == pytest.approx(2 / 3)
    # k3 = (r - 1) - ln r: [0.5 - ln 1.5, 0, -0.5 + ln 2] = [0.0945349, 0, 0.1931472]; mean 0.0958940
    k3 = (0.5 - math.log(1.5) + (-0.5 + math.log(2))) / 3
    assert out.metrics["approx_kl"] == pytest.approx(k3, abs=1e-9)
    assert out.metrics["ratio_max"] == pytest.approx(1.5)
    # gradient: clipped tokens get none; token 2: d(-r A)/d theta = -r A = 1, / 3 tokens
    out.loss.backward()
    assert logp.grad is not None
    torch.testing.assert_close(
        logp.grad, torch.tensor([[0.0, 1 / 3, 0.0]], dtype=torch.float64), **TOL
    )


def test_loss_with_truncated_behaviour_weights() -> None:
    logp, p, adv = _loss_case()
    # w = exp(p - b) = [2, 1, 0.25], truncated at 1.5 -> [1.5, 1, 0.25]
    b = p - torch.tensor([[math.log(2), 0.0, -math.log(4)]], dtype=torch.float64)
    m = torch.ones(1, 3, dtype=torch.float64)
    out = decoupled_ppo_loss(
        LossInputs(logp, p, b, adv, m, _settings(is_mode="truncate", is_cap=1.5))
    )
    # [-1.2 * 1.5, 1 * 1, 1.6 * 0.25] = [-1.8, 1, 0.4]; mean -0.4 / 3
    torch.testing.assert_close(
        out.per_token_loss, torch.tensor([[-1.8, 1.0, 0.4]], dtype=torch.float64), **TOL
    )
    assert out.loss.item() == pytest.approx(-0.4 / 3, abs=1e-9)
    assert out.metrics["w_frac_truncated"] == pytest.approx(1 / 3)
    # masked instead ([0.5, 1.5] keeps token 2 only): loss = (0 + 1 + 0) / 3, denominator unchanged
    out = decoupled_ppo_loss(
        LossInputs(logp, p, b, adv, m, _settings(is_mode="mask", is_lo=0.5, is_hi=1.5))
    )
    assert out.loss.item() == pytest.approx(1 / 3, abs=1e-9)
    assert out.metrics["w_frac_masked"] == pytest.approx(2 / 3)


def test_loss_dual_clip() -> None:
    # r = 5, A = -1: min(5 * -1, 1.2 * -1) = -5 -> loss 5; dual clip c = 3: max(-5, -3) -> loss 3
    p = torch.tensor([[-2.0]], dtype=torch.float64)
    logp = p + math.log(5)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    m = torch.ones(1, 1, dtype=torch.float64)
    assert decoupled_ppo_loss(
        LossInputs(logp, p, p, adv, m, _settings())
    ).loss.item() == pytest.approx(5.0)
    out = decoupled_ppo_loss(LossInputs(logp, p, p, adv, m, _settings(dual_clip=3.0)))
    assert out.loss.item() == pytest.approx(3.0)
    assert out.metrics["dual_clip_frac"] == 1.0
    with pytest.raises(ValueError, match="dual_clip"):
        decoupled_ppo_loss(LossInputs(logp, p, p, adv, m, _settings(dual_clip=0.5)))


def test_loss_aggregations() -> None:
    # row 1: the three tokens above, losses [-1.2, 1, 1.6] (sum 1.4)
    # row 2: r = 1, A = 0.5 on two tokens, third is padding: losses [-0.5, -0.5] (sum -1.0)
    logp1, p1, adv1 = _loss_case()
    p = torch.cat([p1, torch.tensor([[-1.0, -1.0, 0.0]], dtype=torch.float64)])
    logp = torch.cat([logp1, torch.tensor([[-1.0, -1.0, 5.0]], dtype=torch.float64)])
    adv = torch.cat([adv1, torch.tensor([[0.5, 0.5, 99.0]], dtype=torch.float64)])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    expected = {
        "token_mean": (1.4 - 1.0) / 5,  # 0.08
        "seq_mean_token_sum": (1.4 - 1.0) / 2,  # 0.2
        "seq_mean_token_mean": (1.4 / 3 - 1.0 / 2) / 2,  # -0.0166667
    }
    for agg, value in expected.items():
        out = decoupled_ppo_loss(LossInputs(logp, p, p, adv, m, _settings(aggregation=agg)))
        assert out.loss.item() == pytest.approx(value, abs=1e-9), agg
    assert out.per_token_loss[1, 2].item() == 0.0
    # per-sample advantages [B] broadcast like the equivalent [B, T]
    a_seq = torch.tensor([0.3, -0.7], dtype=torch.float64)
    one = decoupled_ppo_loss(LossInputs(logp, p, p, a_seq, m, _settings())).loss
    two = decoupled_ppo_loss(
        LossInputs(logp, p, p, a_seq[:, None].expand(2, 3), m, _settings())
    ).loss
    torch.testing.assert_close(one, two, rtol=0, atol=1e-12)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"is_mode": "truncate", "is_cap": 1.2, "dual_clip": 2.0},
        {"is_mode": "mask", "is_lo": 0.5, "is_hi": 2.0, "is_level": "sequence", "eps_high": 0.28},
    ],
)
def test_loss_gradcheck(agg: str, extra: dict[str, object]) -> None:
    gen = torch.Generator().manual_seed(1)
    shape = (3, 4)
    p = torch.randn(shape, generator=gen, dtype=torch.float64)
    b = p + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    m = torch.ones(shape, dtype=torch.float64)
    m[1, 2:] = 0
    logp = (p + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()

    def f(x: torch.Tensor) -> torch.Tensor:
        return decoupled_ppo_loss(
            LossInputs(x, p, b, adv, m, _settings(aggregation=agg, **extra))
        ).loss

    assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-8)


def test_loss_empty_mask_is_zero_and_differentiable() -> None:
    x = torch.zeros(2, 3, requires_grad=True)
    out = decoupled_ppo_loss(
        LossInputs(x, x.detach(), x.detach(), torch.ones(2), torch.zeros(2, 3), _settings())
    )
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.metrics["tokens"] == 0.0
    assert x.grad is not None and x.grad.abs().sum().item() == 0.0


def test_loss_bad_shapes() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        decoupled_ppo_loss(LossInputs(x, x, x, torch.zeros(3), torch.ones(2, 3), _settings()))
    with pytest.raises(ValueError, match="prox_logp"):
        decoupled_ppo_loss(
            LossInputs(x, x[:, :2], x, torch.zeros(2), torch.ones(2, 3), _settings())
        )
    with pytest.raises(ValueError, match="aggregation"):
        decoupled_ppo_loss(
            LossInputs(x, x, x, torch.zeros(2), torch.ones(2, 3), _settings(aggregation="sum"))
        )


def test_logprob_gap() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    rollout = torch.tensor([[-1.1, -2.0, -2.5]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    gap = logprob_gap(trainer, rollout, m)
    # d = [0.1, 0] on the mask: mean |d| = 0.05; k3 = mean(e^d - 1 - d) = (e^0.1 - 1.1) / 2
    assert gap["logp_abs_diff"] == pytest.approx(0.05, abs=1e-9)
    assert gap["logp_k3_kl"] == pytest.approx((math.exp(0.1) - 1.1) / 2, abs=1e-9)
    assert gap["logp_gap_tokens"] == 2.0
    assert logprob_gap(trainer, trainer, m)["logp_k3_kl"] == 0.0


# ------------------------------------------------------------------ GRPO advantages
def test_grpo_advantages() -> None:
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0], dtype=torch.float64)
    # group a: mean 0.5, deviations [0.5, -0.5, 0], population var (0.25 + 0.25) / 3 = 1/6,
    # std 0.4082483 -> [1.2247419, -1.2247419, 0]; group b: all equal -> 0
    s = math.sqrt(1 / 6)
    expected = torch.tensor(
        [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.0, 0.0, 0.0], dtype=torch.float64
    )
    for ids in (["a", "a", "a", "b", "b"], torch.tensor([7, 7, 7, 3, 3])):
        torch.testing.assert_close(grpo_advantages(r, ids), expected, **TOL)
    torch.testing.assert_close(
        grpo_advantages(r, ["a", "a", "a", "b", "b"], normalize_std=False),
        torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0], dtype=torch.float64),
        **TOL,
    )
    # equal rewards give exactly 0, with no rounding residue
    same = grpo_advantages(torch.tensor([0.1, 0.1, 0.1]), [0, 0, 0])
    assert same.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="group ids"):
        grpo_advantages(r, [0, 1])


# ------------------------------------------------------------------ the gate, as a pure model
class PureGateMachine(GateMachine):
    def make_backend(self, eta: int, batch_groups: int) -> GateBackend:
        return PureGate(eta, batch_groups)


def test_gate_model_straggler_is_dropped_and_slot_returned() -> None:
    # eta = 1, B = 1. w0 admits g0, g1 at v0; g1 and two later groups finish first and are
    # trained (v -> 3); g0 arrives with staleness 3 > 1 and is dropped, its slot handed back:
    # capacity = (3 + 1 + 1) * 1 - (admitted 4 - rejected 1) = 2.
    m = PureGateMachine()
    m.start(eta=1, batch_groups=1)
    m.admit("w0", 2)
    for _ in range(3):
        m.finish(0)  # newest first: g0 straggles
        m.train()
        m.conserved()
        if m.version < 3:
            m.admit("w1", 1)
    assert m.version == 3 and m.dropped == 0
    m.finish(0)
    m.train()
    m.conserved()
    assert m.dropped == 1
    c = m.gate.counters()
    assert (c.admitted, c.finished, c.rejected, c.capacity) == (4, 3, 1, 2)


PureGateMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPureGate = PureGateMachine.TestCase


def test_entropy_bonus_is_subtracted_and_reported() -> None:
    from staleness import LossInputs, decoupled_ppo_loss
    from staleness.config import LossConfig

    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    ent = torch.tensor([[0.5, 1.5, 9.0]])  # the padded position's 9.0 is never read
    adv = torch.tensor([1.0])
    plain = decoupled_ppo_loss(LossInputs(logp, logp, logp, adv, mask, settings=LossConfig()))
    cfg = LossConfig(entropy_coef=0.1)
    out = decoupled_ppo_loss(LossInputs(logp, logp, logp, adv, mask, settings=cfg, entropy=ent))
    # token_mean: -(A) - 0.1 * (0.5 + 1.5) / 2
    assert float(plain.loss) == pytest.approx(-1.0)
    assert float(out.loss) == pytest.approx(-1.0 - 0.1)
    assert float(out.stats["entropy"]) == pytest.approx(1.0)
    assert "entropy" not in plain.stats
    with pytest.raises(ValueError, match="entropy is required when entropy_coef > 0"):
        decoupled_ppo_loss(LossInputs(logp, logp, logp, adv, mask, settings=cfg))
