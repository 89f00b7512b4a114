"""Reward functions run off the event loop, with a timeout and a finiteness check.

A reward function is ``fn(prompt, output_ids) -> float`` for a token-id task, and
``fn(prompt, output_ids, text) -> float`` for a task that decodes (``Task.decode`` returns the
answer's text: the ``text`` task). It is the task's own reward, or ``rollout.reward_fn``: a
built-in on text (``exact`` | ``numeric`` | ``math``, ``rollout_workers.reward_fns``) or
``module:function``; a ``module:function`` may be ``async def``.

``RewardRunner.score`` decodes on the worker (cheap, the tokenizer is there) and runs the
function: an ``async`` one on the event loop, a plain one in a thread pool, or with
``processes > 0`` in a process pool (``rollout.reward_processes``: CPU-heavy verifiers such as
``math`` then run in parallel, outside the GIL; the function must be importable by name, which
built-ins and ``module:function`` are). Every way it can fail is a ``RewardFailure`` whose
``reason`` (``reward_error`` | ``reward_timeout`` | ``reward_nonfinite``) is what the worker
records when it rejects the group (``sluice status`` shows them per reason).

A call that times out keeps running in its thread or process (neither can be killed safely);
the pool has ``threads`` threads (or ``processes`` processes), so a reward that hangs for ever
eventually blocks scoring, and every such group is rejected with ``reward_timeout`` meanwhile:
visible in the gate's ``rejected_by`` counts.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import multiprocessing
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from rollout_workers.tasks.base import Prompt, Task

RewardFn = Callable[..., Any]
"""``fn(prompt, output_ids[, text]) -> float`` (or an awaitable of one)."""


class RewardFailure(Exception):
    """Scoring failed; ``reason`` is the short tag recorded with the rejected slot."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def resolve_reward_fn(task: Task, spec: str | None) -> RewardFn:
    """``spec`` (``rollout.reward_fn``: a built-in name for a text task, or
    ``module:function``) when given, else the task's reward: its module-level ``reward_fn``
    when it has one (a text task's; a process pool can run it), else ``task.reward``.
    ``TaskError`` naming the field when the module or function is not found; a ``sluice``
    command also looks for the module beside the run config and in the current directory
    (``sluice.config.add_module_dirs``)."""
    if not spec:
        fn = getattr(task, "reward_fn", None)
        return fn if callable(fn) else task.reward
    from rollout_workers.tasks.base import TaskError
    from rollout_workers.tasks.jsonl import load_reward_fn
    from rollout_workers.tasks.text import resolve_text_reward

    try:
        if task.decode([]) is not None:
            return resolve_text_reward(spec)
        return load_reward_fn(spec)
    except TaskError as e:
        raise TaskError(f"rollout.reward_fn: {e}") from e


class RewardRunner:
    def __init__(
        self,
        fn: RewardFn,
        *,
        timeout_s: float,
        threads: int = 4,
        processes: int = 0,
        decode: Callable[[list[int]], str | None] | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"reward timeout must be > 0, got {timeout_s}")
        if processes < 0:
            raise ValueError(f"reward processes must be >= 0, got {processes}")
        self.fn = fn
        self.timeout_s = timeout_s
        self.decode = decode
        self.is_async = inspect.iscoroutinefunction(fn)
        self.pool: Executor
        if processes:
            # spawn, not fork: the worker runs an event loop and threads (a forked copy of
            # their locks can deadlock); children import the function by name.
            ctx = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(max_workers=processes, mp_context=ctx)
        else:
            self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reward")

    def args(self, prompt: Prompt, output_ids: list[int]) -> tuple[Any, ...]:
        """What the function is called with: ``(prompt, ids)``, plus the decoded text when the
        task decodes."""
        ids = list(output_ids)
        text = self.decode(ids) if self.decode is not None else None
        return (prompt, ids) if text is None else (prompt, ids, text)

    async def score(self, prompt: Prompt, output_ids: list[int]) -> float:
        """The reward as a finite float, or ``RewardFailure``."""
        try:
            args = self.args(prompt, output_ids)
        except Exception as e:  # the tokenizer failed on these ids
            raise RewardFailure("reward_error", f"decoding failed: {type(e).__name__}: {e}") from e
        loop = asyncio.get_running_loop()
        fut: Any = (
            self.fn(*args) if self.is_async else loop.run_in_executor(self.pool, self.fn, *args)
        )
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
