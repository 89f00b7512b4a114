"""The run's shared state as one rollout worker sees it, connected before the worker is built.

``connect`` opens the worker's two Redis connections (the version manager's, with its longer
socket timeout for blocking reads, and one for everything else) and builds each part complete:
the version manager (attaching to the run, or creating it with ``RunInfo.eta`` and
``RunInfo.batch_groups``), the trajectory buffer, the prompt leases, the metrics and the eval
records. ``WorkerParts.close`` closes both connections; the worker calls it last, when it stops.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from buffer.connection import connect as connect_redis
from buffer.redis_buffer import RedisTrajectoryBuffer
from rollout_workers.config import RolloutConfig
from rollout_workers.evaluator import RedisEvalStore
from rollout_workers.metrics import RedisRecords
from rollout_workers.ports import (
    EvalStore,
    MetricsSink,
    PromptLeases,
    TrajectorySink,
    VersionSource,
)
from rollout_workers.prompts import PromptSource
from rollout_workers.tasks.base import Prompt
from staleness.checks import settings_differ
from staleness.version_manager import VersionManager

log = logging.getLogger("sluice.rollout")


@dataclass(frozen=True)
class RunInfo:
    """What a worker needs to know about its run besides its own ``rollout`` section."""

    name: str
    """The run's name: its Redis namespace."""
    seed: int
    """Prompt order and sampling seeds."""
    redis_url: str
    model_path: str
    """The version-0 weights (a server that missed a broadcast falls back to them)."""
    eta: int
    """The staleness limit, used when this worker creates the run."""
    batch_groups: int
    """Groups per train step, used when this worker creates the run."""
    distributed: bool = False
    """Weights arrive by broadcast: offer the servers for it (docs/weight-sync.md)."""
    ipc: bool = False
    """Weights arrive in memory from a trainer on this host: offer the servers this worker
    launched for it (docs/weight-sync.md)."""
    tp_size: int = 1
    """Tensor-parallel ranks of each launched server (``ipc``: one payload per rank)."""


@dataclass(frozen=True)
class WorkerParts:
    """The run's shared state as one worker sees it, connected (``connect``)."""

    versions: VersionSource
    buffer: TrajectorySink
    prompts: PromptLeases
    records: MetricsSink
    evals: EvalStore
    close: Callable[[], Awaitable[None]]
    """Close the connections the parts share (the worker calls it once, last)."""


async def _open_versions(run: RunInfo, heartbeat_ttl_s: float) -> VersionManager:
    """Attach to the run (creating it with ``run.eta`` and ``run.batch_groups`` if absent)."""
    vm = await VersionManager.open_or_create(
        run.redis_url,
        run.name,
        eta=run.eta,
        batch_groups=run.batch_groups,
        check_batch_groups=False,
        default_worker_ttl=heartbeat_ttl_s,
    )
    note = settings_differ(
        run.name,
        run_eta=vm.eta,
        config_eta=run.eta,
        run_batch_groups=vm.batch_groups,
        config_batch_groups=run.batch_groups,
    )
    if note is not None:
        log.warning("%s", note)
    return vm


async def connect(
    run: RunInfo, worker_id: str, prompts: Sequence[Prompt], rc: RolloutConfig
) -> WorkerParts:
    """Connect to the run's Redis: the version manager, buffer, prompt leases (of
    ``prompts``, the task's train split), metrics and eval records of ``worker_id``."""
    redis = await connect_redis(run.redis_url)
    try:
        vm = await _open_versions(run, rc.heartbeat_ttl_s)
    except BaseException:
        await redis.aclose()
        raise
    try:
        leases = PromptSource(
            redis, run.name, prompts, seed=run.seed, worker_id=worker_id, lease_ttl_s=rc.lease_ttl_s
        )
    except BaseException:
        await vm.close()
        await redis.aclose()
        raise

    async def close() -> None:
        await vm.close()
        await redis.aclose()

    return WorkerParts(
        versions=vm,
        buffer=RedisTrajectoryBuffer(redis, run.name, consumer=worker_id),
        prompts=leases,
        records=RedisRecords(redis, run.name, worker_id),
        evals=RedisEvalStore(redis, run.name, worker_id),
        close=close,
    )
