"""An episode's appended tokens (loss mask 0) get exactly zero gradient through the real train
step; its sampled tokens get a gradient; GRPO advantages are per episode within one prompt's
group, or per turn when the episodes scored their turns; the entropy bonus's gradient is the
hand-derived one. A model whose logits are one parameter makes each position's gradient
visible."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from buffer.schema import Sample, TrajectoryGroup
from trainer.batch import make_micro_batch, samples_from_groups
from trainer.config import TrainerConfig
from trainer.step import train_step

V = 16


class LogitsModel(torch.nn.Module):
    """``logits`` is the parameter: ``logits.grad[b, j]`` is the gradient at position ``j``."""

    def __init__(self, b: int, length: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.logits = torch.nn.Parameter(torch.randn(b, length, V, generator=g))

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.logits[:b, :n])


def _group(mask: list[int], turn_rewards: list[list[float]] | None = None) -> TrajectoryGroup:
    out = np.array([7, 8, 9, 10, 11], np.int32)
    scored = turn_rewards or [None, None]
    return TrajectoryGroup(
        run_id="r",
        prompt_id="p",
        prompt_ids=np.array([5, 6], np.int32),
        samples=[
            Sample(
                out,
                np.full(5, -2.0, np.float32),
                np.zeros(5, np.int32),
                r,
                "stop",
                i,
                loss_mask=np.array(mask, np.int32),
                turn_starts=np.array([0, 3], np.int32),
                turn_rewards=None if tr is None else np.array(tr, np.float32),
            )
            for i, (r, tr) in enumerate(
                zip(
                    [1.0, 0.0] if turn_rewards is None else map(sum, turn_rewards),
                    scored,
                    strict=True,
                )
            )
        ],
        worker_id="w",
        admission_version=0,
    )


def _grads(samples: list, tc: TrainerConfig, b: int = 2) -> tuple[torch.Tensor, Any]:
    """The gradient on the logits of one real train step (lr 0: nothing moves), and the
    step's statistics."""
    model = LogitsModel(b, 7)
    grads: list[torch.Tensor] = []
    model.logits.register_hook(lambda g: grads.append(g.clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train_step(
        model,
        opt,
        None,
        samples,
        tc,
        temperature=1.0,
        device=torch.device("cpu"),
        current_version=0,
    )
    return torch.stack(grads).sum(0), stats


@pytest.mark.timeout(30)
def test_appended_tokens_get_exactly_zero_gradient() -> None:
    # Output token i sits at shifted position j = P - 1 + i = 1 + i: the appended tokens
    # (i = 1, 2) are predicted by positions 2 and 3, the sampled ones (0, 3, 4) by 1, 4, 5.
    samples = samples_from_groups([_group([1, 0, 0, 1, 1])])
    assert [s.turns for s in samples] == [2, 2]
    g, stats = _grads(samples, TrainerConfig())
    assert stats.tokens == 2 * 3  # only sampled tokens count
    for row in range(2):
        assert torch.equal(g[row, 2], torch.zeros(V)) and torch.equal(g[row, 3], torch.zeros(V))
        for j in (1, 4, 5):
            assert g[row, j].abs().sum() > 0
        assert torch.equal(g[row, 0], torch.zeros(V))  # the prompt is not trained either


def test_micro_batch_mask_is_the_loss_mask_and_ids_are_untouched() -> None:
    samples = samples_from_groups([_group([1, 0, 0, 1, 1])])
    mb = make_micro_batch(samples)
    assert mb.mask[0].tolist() == [0, 1, 0, 0, 1, 1]
    # The trained ids are the sampled and appended ids, in order, never re-derived.
    assert mb.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11]


def test_grpo_advantages_are_per_episode_within_the_prompt() -> None:
    # Rewards 1 and 0 in one group: mean 0.5, std 0.5 -> advantages +-0.5 / (0.5 + 1e-6) (the
    # std's epsilon) per episode, whatever the episodes' turns or trained tokens.
    adv = [s.advantage for s in samples_from_groups([_group([1, 0, 0, 1, 1])])]
    a = 0.5 / (0.5 + 1e-6)
    assert adv == pytest.approx([a, -a], abs=1e-9)


def test_scored_turns_give_each_turn_its_own_advantage() -> None:
    # Turn rewards [0.5, 0.5] and [0.0, 0.25]: returns [1.0, 0.5] and [0.25, 0.25]; baselines
    # 0.625 and 0.375 -> the call turn (tokens 0-2) +-0.375, the answer turn (3-4) +-0.125.
    samples = samples_from_groups(
        [_group([1, 0, 0, 1, 1], [[0.5, 0.5], [0.0, 0.25]])], normalize_std=False
    )
    assert [s.reward for s in samples] == [1.0, 0.25]
    assert samples[0].token_advantages.tolist() == pytest.approx([0.375] * 3 + [0.125] * 2)
    assert samples[1].token_advantages.tolist() == pytest.approx([-0.375] * 3 + [-0.125] * 2)
    mb = make_micro_batch(samples)
    assert mb.advantages.shape == (2, 6)  # per token, in the shifted frame
    assert mb.advantages[0, 1:].tolist() == pytest.approx([0.375] * 3 + [0.125] * 2)


def test_a_turn_whose_returns_are_equal_gets_no_gradient() -> None:
    # Same answer reward, different calls: the answer turn's tokens (positions 4, 5) get
    # exactly zero gradient, the call's sampled token (position 1) does not.
    samples = samples_from_groups(
        [_group([1, 0, 0, 1, 1], [[0.5, 0.25], [0.0, 0.25]])], normalize_std=False
    )
    g, _ = _grads(samples, TrainerConfig())
    for row in range(2):
        assert g[row, 1].abs().sum() > 0
        assert torch.equal(g[row, 4], torch.zeros(V)) and torch.equal(g[row, 5], torch.zeros(V))


def test_entropy_bonus_gradient_is_hand_derived() -> None:
    # Equal rewards: every advantage is 0, so the whole gradient is the entropy bonus's. The
    # loss is -beta * mean_t H_t over the 3 sampled positions of each row (token_mean over 6),
    # and dH/dz_v = -p_v (log p_v + H): the gradient on z at a sampled position is
    # beta / 6 * p_v (log p_v + H).
    beta = 0.1
    g = _group([1, 0, 0, 1, 1])
    for s in g.samples:
        s.reward = 0.5
    samples = samples_from_groups([g])
    assert [s.advantage for s in samples] == [0.0, 0.0]
    grad, _ = _grads(samples, TrainerConfig(entropy_coef=beta))
    z = LogitsModel(2, 7).logits.detach()
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    h = -(p * logp).sum(-1, keepdim=True)
    want = beta / 6 * p * (logp + h)
    for row in range(2):
        for j in (1, 4, 5):
            assert torch.allclose(grad[row, j], want[row, j], atol=1e-7)
        for j in (0, 2, 3, 6):
            assert torch.equal(grad[row, j], torch.zeros(V))
