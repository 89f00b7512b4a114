"""Eval: every ``rollout.eval_every`` versions, score the task's first ``rollout.eval_prompts``
eval prompts on the worker's servers, greedy (temperature 0) and sampled, and record the mean
rewards in the run's eval hash (``keys.eval_results``, one JSON record per version).

Invariants (tests/integration/test_rollout_worker.py::test_worker_fills_buffer_with_correct_groups):
eval samples never enter the trajectory stream and take no admission slots; each eval version
is run by one worker of the run (a Redis ``SET NX`` lock, released when an eval is abandoned).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from buffer import keys
from buffer.connection import with_retries
from inference.protocol import SGLangClientError
from rollout_workers.config import RolloutConfig
from rollout_workers.metrics import METRICS_TTL_S, Counters
from rollout_workers.pool import Shutdown
from rollout_workers.ports import EvalStore
from rollout_workers.rewards import RewardFailure
from rollout_workers.sampler import Sampler, all_or_nothing
from rollout_workers.tasks.base import Prompt, Task

log = logging.getLogger("sluice.rollout")


class RedisEvalStore:
    """The run's eval hash and per-version locks in Redis."""

    def __init__(self, client: aioredis.Redis, run: str, worker_id: str) -> None:
        self.redis = client
        self.run = run
        self.worker_id = worker_id
        self.k_eval = keys.eval_results(run)

    async def claim(self, version: int) -> bool:
        """True if this worker may run the eval of ``version`` (no other worker has)."""
        lock = keys.eval_lock(self.run, version)
        got = await with_retries(
            lambda: self.redis.set(lock, self.worker_id, nx=True, ex=METRICS_TTL_S),
            what="eval lock",
        )
        return bool(got)

    async def unclaim(self, version: int) -> None:
        await self.redis.delete(keys.eval_lock(self.run, version))

    async def store(self, version: int, record: dict[str, Any]) -> None:
        await with_retries(
            lambda: self.redis.hset(self.k_eval, str(version), json.dumps(record)),
            what="store eval",
        )


class Evaluator:
    """Runs the evals of one worker as background tasks (``tasks``)."""

    def __init__(
        self,
        store: EvalStore,
        sampler: Sampler,
        task: Task,
        rc: RolloutConfig,
        counters: Counters,
        *,
        worker_id: str,
    ) -> None:
        self.store = store
        self.sampler = sampler
        self.task = task
        self.rc = rc
        self.counters = counters
        self.worker_id = worker_id
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopped = False
        """Set when the worker stops: no new eval starts."""

    def maybe_start(self, version: int) -> None:
        """Start the eval of ``version`` in the background if one is due."""
        every = self.rc.eval_every
        if every <= 0 or version % every or self.stopped:
            return
        t = asyncio.create_task(self.evaluate(version))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def evaluate(self, version: int) -> None:
        if not await self.store.claim(version):
            return
        prompts: list[Prompt] = list(self.task.prompts("eval"))[: self.rc.eval_prompts]
        if not prompts:
            log.warning("task %s has no eval prompts; eval skipped", self.task.name)
            return
        t0 = time.monotonic()
        sem = asyncio.Semaphore(max(1, self.rc.max_inflight_groups * self.rc.n_samples // 2))

        async def one(p: Prompt, temperature: float, tag: str) -> tuple[float, list[int]]:
            async with sem:
                o = await self.sampler.sample(
                    list(p.input_ids), ("eval", version, p.id, tag), temperature
                )
            return await self.sampler.rewards.score(p, o.output_ids), o.versions

        try:
            greedy = await all_or_nothing([one(p, 0.0, "greedy") for p in prompts])
            sampled = await all_or_nothing(
                [one(p, self.rc.temperature, "sampled") for p in prompts]
            )
        except (Shutdown, asyncio.CancelledError, SGLangClientError, RewardFailure) as e:
            log.warning("eval of v%d abandoned (%r); lock released", version, e)
            await self.store.unclaim(version)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        versions = [v for _, vs in greedy + sampled for v in vs]
        record = {
            "version": version,
            "greedy_reward": float(np.mean([r for r, _ in greedy])),
            "sampled_reward": float(np.mean([r for r, _ in sampled])),
            "prompts": len(prompts),
            "temperature": self.rc.temperature,
            "min_token_version": min(versions) if versions else None,
            "max_token_version": max(versions) if versions else None,
            "worker": self.worker_id,
            "seconds": round(time.monotonic() - t0, 3),
            "time": time.time(),
        }
        await self.store.store(version, record)
        self.counters.evals += 1
        log.info("worker %s: eval %s", self.worker_id, json.dumps(record))
