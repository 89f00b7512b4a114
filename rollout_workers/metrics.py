"""What a rollout worker counts, the metrics it reports, and where they go in Redis.

``worker_metrics`` is the one shape of a worker's metrics: the hash
``keys.worker_metrics(run, worker)`` that ``sluice status`` reads (dicts and lists as JSON),
the ``rollout_metrics`` JSON line on stderr every ``rollout.log_every`` groups, and the
worker's last log line. ``RedisRecords`` writes the hash and the list of weight-update records
(``keys.worker_updates``), each kept ``METRICS_TTL_S`` after the worker's last write.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from buffer import keys
from buffer.connection import with_retries
from rollout_workers.pool import Server

UPDATES_KEPT = 100
"""Weight-update records kept per worker (in memory and in Redis)."""
METRICS_TTL_S = 7 * 24 * 3600


@dataclass
class Counters:
    groups_pushed: int = 0
    groups_rejected: int = 0
    samples: int = 0
    tokens_out: int = 0
    gate_blocked_s: float = 0.0
    gate_waits: int = 0
    updates: int = 0
    update_latency_sum_s: float = 0.0
    update_latency_max_s: float = 0.0
    interrupted_samples: int = 0
    reprefill_tokens: int = 0
    resubmitted_dead: int = 0
    events_seen: int = 0
    evals: int = 0
    cancelled_stale: int = 0
    """Groups stopped mid-generation because they could no longer be trained within eta
    (handed back as ``cancelled_stale``; the metrics field is ``doomed_groups``)."""
    filtered_groups: int = 0
    """Groups dropped for zero reward variance (dynamic sampling), handed back as
    ``zero_variance``; also in ``rejected_by``."""
    rejected_by: dict[str, int] = field(default_factory=dict)
    wasted_tokens: int = 0
    """Tokens generated for groups handed back (cancelled, failed, shut down): never pushed."""


def server_metrics(s: Server, elapsed: float) -> dict[str, Any]:
    return {
        "url": s.url,
        "alive": s.alive,
        "version": s.version,
        "pid": s.handle.pid if s.handle is not None else None,
        "utilisation": round(s.busy_total() / elapsed, 4),
        "inflight": len(s.rids),
        "deaths": s.deaths,
        "restarts": s.restarts,
    }


def worker_metrics(
    *,
    worker_id: str,
    status: str,
    version: int,
    counters: Counters,
    inflight_groups: int,
    started: float,
    servers: list[Server],
) -> dict[str, Any]:
    """The worker's metrics now (``started``: its ``time.monotonic()`` at start)."""
    c = counters
    elapsed = max(1e-9, time.monotonic() - started)
    return {
        "worker": worker_id,
        "status": status,
        "pid": os.getpid(),
        "version": version,
        "groups_pushed": c.groups_pushed,
        "groups_rejected": c.groups_rejected,
        "rejected_by": dict(c.rejected_by),
        "inflight_groups": inflight_groups,
        "samples": c.samples,
        "tokens_out": c.tokens_out,
        "tokens_per_s": round(c.tokens_out / elapsed, 2),
        "gate_blocked_s": round(c.gate_blocked_s, 3),
        "updates": c.updates,
        "update_latency_mean_s": round(c.update_latency_sum_s / c.updates, 4)
        if c.updates
        else None,
        "update_latency_max_s": round(c.update_latency_max_s, 4),
        "interrupted_samples": c.interrupted_samples,
        "reprefill_tokens": c.reprefill_tokens,
        "resubmitted_dead": c.resubmitted_dead,
        "doomed_groups": c.cancelled_stale,
        "wasted_tokens": c.wasted_tokens,
        "filtered_groups": c.filtered_groups,
        "evals": c.evals,
        "uptime_s": round(elapsed, 2),
        "servers": [server_metrics(s, elapsed) for s in servers],
    }


class RedisRecords:
    """A worker's metrics hash and weight-update list in Redis."""

    def __init__(self, client: aioredis.Redis, run: str, worker_id: str) -> None:
        self.redis = client
        self.k_metrics = keys.worker_metrics(run, worker_id)
        self.k_updates = keys.worker_updates(run, worker_id)
        self.k_filtered = keys.filtered(run)
        self.started_wall = time.time()

    async def write_metrics(self, m: dict[str, Any]) -> None:
        """Replace the metrics hash with ``m`` (dicts, lists and None as JSON)."""
        flat: dict[Any, Any] = {
            k: json.dumps(v) if isinstance(v, dict | list) or v is None else v for k, v in m.items()
        }
        flat["updated_at"] = time.time()
        flat["started_at"] = self.started_wall

        async def op() -> Any:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.k_metrics, mapping=flat)
                pipe.expire(self.k_metrics, METRICS_TTL_S)
                return await pipe.execute()

        await with_retries(op, what="write worker metrics")

    async def count_filtered(self, samples: int, reward_sum: float) -> None:
        """Add one zero-variance group (``samples`` samples, rewards summing to
        ``reward_sum``) to the run's totals (``keys.filtered``), which the trainer reads per
        step."""

        async def op() -> Any:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(self.k_filtered, "groups", 1)
                pipe.hincrby(self.k_filtered, "samples", samples)
                pipe.hincrbyfloat(self.k_filtered, "reward_sum", reward_sum)
                pipe.expire(self.k_filtered, METRICS_TTL_S)
                return await pipe.execute()

        await with_retries(op, what="count a filtered group")

    async def store_update(self, record: dict[str, Any]) -> None:
        """Prepend one weight-update record; the newest ``UPDATES_KEPT`` are kept."""

        async def op() -> Any:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(self.k_updates, json.dumps(record))
                pipe.ltrim(self.k_updates, 0, UPDATES_KEPT - 1)
                pipe.expire(self.k_updates, METRICS_TTL_S)
                return await pipe.execute()

        await with_retries(op, what="store update record")
