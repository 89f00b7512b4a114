"""Reward functions for tests/integration/test_rollout_worker.py (loaded as ``rollout_reward_fns:NAME``)."""

from __future__ import annotations

import time

from rollout_workers.tasks import get_task
from rollout_workers.tasks.base import Prompt

_TASK = get_task("reverse")


def flaky(prompt: Prompt, output_ids: list[int]) -> float:
    """By the prompt's first digit mod 4: raise, NaN, too slow, or the task's reward."""
    kind = prompt.answer[-1] % 4
    if kind == 0:
        raise RuntimeError(f"reward exploded on {prompt.id}")
    if kind == 1:
        return float("nan")
    if kind == 2:
        time.sleep(1.0)
    return _TASK.reward(prompt, output_ids)


def text_length(prompt: Prompt, output_ids: list[int], text: str) -> float:
    """A text reward: the decoded answer's length in tenths, capped at 1."""
    return min(1.0, len(text) / 10)


def text_constant(prompt: Prompt, output_ids: list[int], text: str) -> float:
    """A text reward that never varies: every group has zero variance."""
    return 0.5
