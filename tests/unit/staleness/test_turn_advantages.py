"""staleness.turn_advantages: per-turn GRPO advantages of episodes that score their turns, against
hand-derived values; with one reward per episode it is exactly grpo_advantages."""

from __future__ import annotations

import pytest
import torch

from staleness import grpo_advantages, turn_advantages


def test_hand_derived_returns_and_baselines() -> None:
    # Episode a scores [0.5, 0.5], b [0.0, 0.25]. Returns from each turn on: a [1.0, 0.5],
    # b [0.25, 0.25]. Turn 0's baseline is (1.0 + 0.25) / 2 = 0.625, turn 1's (0.5 + 0.25) / 2.
    got = turn_advantages([[0.5, 0.5], [0.0, 0.25]], ["g", "g"], normalize_std=False)
    assert got == [pytest.approx([0.375, 0.125]), pytest.approx([-0.375, -0.125])]
    # Normalised: each turn index by its own spread (0.375 and 0.125): +-1 everywhere.
    got = turn_advantages([[0.5, 0.5], [0.0, 0.25]], ["g", "g"], normalize_std=True)
    assert got == [pytest.approx([1.0, 1.0], abs=1e-4), pytest.approx([-1.0, -1.0], abs=1e-4)]


def test_a_later_turn_is_not_credited_with_earlier_rewards() -> None:
    # Both episodes get the same answer reward; only their calls differ: the answer turn's
    # advantage is 0 (its returns are equal), the call turn carries the whole difference.
    got = turn_advantages([[0.5, 0.25], [0.0, 0.25]], ["g", "g"], normalize_std=False)
    assert got == [[0.25, 0.0], [-0.25, 0.0]]


def test_one_reward_per_episode_is_plain_grpo() -> None:
    rewards = [1.0, 0.0, 0.5, 0.25, 0.75, 0.75]
    gids = ["a", "a", "a", "b", "b", "b"]
    want = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), gids).tolist()
    got = turn_advantages([[0.0, 0.0, r] for r in rewards], gids)
    for turns, w in zip(got, want, strict=True):
        assert turns == pytest.approx([w, w, w])


def test_turn_baselines_use_the_episodes_that_reached_the_turn() -> None:
    # a has 3 turns, b and c 2: turn 2's group is a alone (advantage exactly 0); groups do not
    # mix (d's lone episode gets 0).
    got = turn_advantages(
        [[0.0, 0.0, 1.0], [0.0, 0.5], [0.0, 0.0], [0.3]], ["g", "g", "g", "h"], normalize_std=False
    )
    assert got[0] == pytest.approx([0.5, 0.5, 0.0])
    assert got[1] == pytest.approx([0.0, 0.0])
    assert got[2] == pytest.approx([-0.5, -0.5])
    assert got[3] == [0.0]


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="1 group ids for 2 episodes"):
        turn_advantages([[1.0], [0.0]], ["g"])
    assert turn_advantages([], []) == []
    assert turn_advantages([[]], ["g"]) == [[]]
