"""Dynamic sampling: which groups are worth a trainer step.

Under GRPO a sample's advantage is its reward minus its group's mean (divided by the group's
std), so a group whose rewards are all equal has every advantage exactly 0: it costs a forward
and backward pass and moves nothing (DAPO's "dynamic sampling" drops such groups). The worker
drops them before pushing (``rollout.dynamic_sampling``), hands their admission slots back
(reason ``zero_variance``) and counts them (tests/unit/rollout_workers/test_rollout_workers_
dynamic.py, tests/integration/test_text_task.py).
"""

from __future__ import annotations

from collections.abc import Sequence

ZERO_VARIANCE = "zero_variance"
"""The reason a filtered group's slot is handed back with (the gate's ``rejected_by``)."""


def zero_variance(rewards: Sequence[float]) -> bool:
    """True when every reward equals the first (a group of one sample is always so): its GRPO
    advantages are all 0. Exact equality: rewards are compared as the floats the reward
    returned, and any difference gives a nonzero advantage."""
    return all(r == rewards[0] for r in rewards[1:]) if rewards else True


def filtering_on(setting: bool | None, task_decodes: bool) -> bool:
    """``rollout.dynamic_sampling``: an explicit true/false, or None = on for a task that
    scores text (the text task), off for the synthetic built-ins (their benchmarks and tests
    count every group)."""
    return task_decodes if setting is None else setting
