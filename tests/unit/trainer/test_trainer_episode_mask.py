"""An episode's appended tokens (loss mask 0) get exactly zero gradient through the real train
step; its sampled tokens get a gradient; GRPO advantages are per episode within one prompt's
group. A model whose logits are one parameter makes each position's gradient visible."""

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


def _group(mask: list[int]) -> TrajectoryGroup:
    out = np.array([7, 8, 9, 10, 11], np.int32)
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
            )
            for i, r in enumerate([1.0, 0.0])
        ],
        worker_id="w",
        admission_version=0,
    )


@pytest.mark.timeout(30)
def test_appended_tokens_get_exactly_zero_gradient() -> None:
    # Output token i sits at shifted position j = P - 1 + i = 1 + i: the appended tokens
    # (i = 1, 2) are predicted by positions 2 and 3, the sampled ones (0, 3, 4) by 1, 4, 5.
    samples = samples_from_groups([_group([1, 0, 0, 1, 1])])
    assert [s.turns for s in samples] == [2, 2]
    model = LogitsModel(2, 7)
    grads: list[torch.Tensor] = []
    model.logits.register_hook(lambda g: grads.append(g.clone()))
    tc = TrainerConfig()
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
    assert stats.tokens == 2 * 3  # only sampled tokens count
    g = torch.stack(grads).sum(0)
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
