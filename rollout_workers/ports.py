"""What the rollout worker needs from the run's shared state, as small Protocols.

The worker and its parts see the version manager only as a ``VersionSource``, the trajectory
buffer as a ``TrajectorySink``, the prompt leases as ``PromptLeases``, its metrics as
``MetricsSink`` and the eval records as ``EvalStore``; ``rollout_workers.parts.connect``
builds the Redis-backed ones (``staleness.version_manager.VersionManager``,
``buffer.redis_buffer.RedisTrajectoryBuffer``, ``rollout_workers.prompts.PromptSource``,
``rollout_workers.metrics.RedisRecords``, ``rollout_workers.evaluator.RedisEvalStore``) and the
unit tests in-memory fakes. Each Protocol declares exactly the methods the worker calls, with
their implementation's signature: the ``TYPE_CHECKING`` block at the end has mypy check that
each implementation satisfies its Protocol (``make lint``), and
tests/unit/rollout_workers/test_rollout_workers_ports.py compares the signatures at run time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from buffer.schema import TrajectoryGroup
from rollout_workers.prompts import Lease
from staleness.version_manager import Admission, RunFinished, WeightEvent


@runtime_checkable
class VersionSource(Protocol):
    """The run's version, admission gate, weight events, worker liveness and end
    (``staleness.version_manager.VersionManager``)."""

    async def version(self) -> int: ...

    async def try_admit(self, worker_id: str, n: int = 1) -> int: ...

    async def admit(self, worker_id: str, n: int = 1) -> Admission: ...

    async def finish(
        self, worker_id: str, n: int = 1, *, version: int | None = None, tokens: int = 0
    ) -> int: ...

    async def reject(
        self,
        worker_id: str,
        n: int = 1,
        reason: str = "rejected",
        *,
        version: int | None = None,
        tokens: int = 0,
    ) -> int: ...

    async def current_eta(self) -> int: ...

    async def latest_weights(self) -> WeightEvent | None: ...

    async def latest_disk_weights(self) -> WeightEvent | None: ...

    def events(
        self, after: int | None = None, *, block_ms: int = ...
    ) -> AsyncIterator[WeightEvent]: ...

    async def heartbeat(self, worker_id: str, ttl: float = ...) -> None: ...

    async def reap(self) -> dict[str, int]: ...

    async def deregister(self, worker_id: str) -> int: ...

    async def run_finished(self) -> RunFinished | None: ...

    async def register_sync_servers(
        self,
        worker_id: str,
        urls: list[str],
        *,
        kind: str = ...,
        host: str | None = ...,
        tp_size: int = ...,
    ) -> None: ...

    async def unregister_sync_servers(self, urls: list[str]) -> None: ...

    async def ack_sync(self, version: int, url: str) -> None: ...


@runtime_checkable
class TrajectorySink(Protocol):
    """Where finished groups go (``buffer.redis_buffer.RedisTrajectoryBuffer``)."""

    async def put(self, group: TrajectoryGroup) -> str: ...


@runtime_checkable
class PromptLeases(Protocol):
    """The run's shared prompt cursor (``rollout_workers.prompts.PromptSource``)."""

    async def lease(self) -> Lease: ...

    async def release(self, lease: Lease, *, requeue: bool = False) -> bool: ...

    async def renew_all(self) -> int: ...


@runtime_checkable
class MetricsSink(Protocol):
    """Where the worker's metrics and update records go (``rollout_workers.metrics``)."""

    async def write_metrics(self, m: dict[str, Any]) -> None: ...

    async def store_update(self, record: dict[str, Any]) -> None: ...

    async def count_filtered(self, samples: int, reward_sum: float) -> None: ...


@runtime_checkable
class EvalStore(Protocol):
    """The run's eval results and the lock that gives each version to one worker
    (``rollout_workers.evaluator.RedisEvalStore``)."""

    async def claim(self, version: int) -> bool: ...

    async def unclaim(self, version: int) -> None: ...

    async def store(self, version: int, record: dict[str, Any]) -> None: ...


if TYPE_CHECKING:  # mypy checks that each implementation satisfies its Protocol
    from buffer.redis_buffer import RedisTrajectoryBuffer
    from inference.client import SGLangClient
    from inference.protocol import InferenceClient
    from rollout_workers.evaluator import RedisEvalStore
    from rollout_workers.metrics import RedisRecords
    from rollout_workers.prompts import PromptSource
    from staleness.version_manager import VersionManager

    def _conforms(
        vm: VersionManager,
        buf: RedisTrajectoryBuffer,
        prompts: PromptSource,
        records: RedisRecords,
        evals: RedisEvalStore,
        client: SGLangClient,
    ) -> tuple[
        VersionSource, TrajectorySink, PromptLeases, MetricsSink, EvalStore, InferenceClient
    ]:
        return vm, buf, prompts, records, evals, client
