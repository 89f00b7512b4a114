"""Reward functions run off the event loop, with a timeout and a finiteness check.

A reward function is ``fn(prompt: Prompt, output_ids: list[int]) -> float``: the task's own
``reward`` or ``rollout.reward_fn = "module:function"``. ``RewardRunner.score`` runs it in a
thread pool so a slow reward never stalls generation, and turns every way it can fail into a
``RewardFailure`` whose ``reason`` (``reward_error`` | ``reward_timeout`` | ``reward_nonfinite``)
is what the worker records when it rejects the group.

A call that times out keeps running in its thread (Python threads cannot be killed); the pool
has ``threads`` threads, so a reward that hangs for ever eventually blocks scoring, and every
such group is rejected with ``reward_timeout`` meanwhile: visible in the gate's
``rejected_by`` counts.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from rollout_workers.tasks.base import Prompt, Task

RewardFn = Callable[[Prompt, list[int]], float]


class RewardFailure(Exception):
    """Scoring failed; ``reason`` is the short tag recorded with the rejected slot."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def resolve_reward_fn(task: Task, spec: str | None) -> RewardFn:
    """``spec`` (``rollout.reward_fn``, ``module:function``) when given, else the task's
    ``reward``. ``TaskError`` naming the field when the module or function is not found; a
    ``sluice`` command also looks for the module beside the run config and in the current
    directory (``sluice.config.add_module_dirs``)."""
    if not spec:
        return task.reward
    from rollout_workers.tasks.base import TaskError
    from rollout_workers.tasks.jsonl import load_reward_fn

    try:
        return load_reward_fn(spec)
    except TaskError as e:
        raise TaskError(f"rollout.reward_fn: {e}") from e


class RewardRunner:
    def __init__(self, fn: RewardFn, *, timeout_s: float, threads: int = 4) -> None:
        if not timeout_s > 0:
            raise ValueError(f"reward timeout must be > 0, got {timeout_s}")
        self.fn = fn
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reward")

    async def score(self, prompt: Prompt, output_ids: list[int]) -> float:
        """The reward as a finite float, or ``RewardFailure``."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, self.fn, prompt, list(output_ids))
        try:
            value = await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise RewardFailure(
                "reward_timeout", f"reward took longer than {self.timeout_s}s"
            ) from None
        except Exception as e:  # the user's function raised: reject the group, say why
            raise RewardFailure("reward_error", f"{type(e).__name__}: {e}") from e
        try:
            r = float(value)
        except (TypeError, ValueError):
            raise RewardFailure(
                "reward_error", f"reward returned {value!r}, not a number"
            ) from None
        if not math.isfinite(r):
            raise RewardFailure("reward_nonfinite", f"reward returned {r}")
        return r

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
