"""In-memory fakes of what the rollout worker's parts talk to: an inference server
(``InferenceClient``) and the run's shared state (``rollout_workers.ports``). No Redis, no
server, no sleeping: a test scripts the answers and opens gates (``asyncio.Event``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from buffer.schema import TrajectoryGroup
from inference.lora import adapter_version
from inference.protocol import (
    FinishReason,
    GenerateResult,
    InferenceError,
    SamplingParams,
    ServerDead,
)
from rollout_workers.pool import Server, ServerState
from rollout_workers.prompts import Lease
from rollout_workers.tasks.base import Prompt
from staleness.version_manager import Admission, RunFinished, WeightEvent


def answer(
    ids: Sequence[int],
    versions: Sequence[int] | None,
    finish: FinishReason = "stop",
    logprobs: Sequence[float] | None = None,
) -> GenerateResult:
    """One ``/generate`` answer with ``ids`` labelled ``versions`` (None: no labels)."""
    lp = logprobs if logprobs is not None else [-0.5] * len(ids)
    return GenerateResult(
        rid="r",
        output_ids=np.asarray(ids, dtype=np.int32),
        logprobs=np.asarray(lp, dtype=np.float32),
        finish_reason=finish,
        finish_message=None,
        weight_version=versions[-1] if versions else None,
        token_versions=None if versions is None else np.asarray(versions, dtype=np.int32),
        prompt_tokens=None,
        completion_tokens=len(ids),
        cached_tokens=None,
        e2e_latency=None,
        meta_info={},
    )


@dataclass
class Request:
    input_ids: list[int]
    sampling: SamplingParams


class FakeClient:
    """An ``InferenceClient`` whose answers a test scripts.

    ``generate`` pops ``answers`` (an exception is raised); when empty it answers ``default``
    tokens labelled with the current ``version``. Weight loads set ``version`` after
    ``load_gate`` (if any) is open; ``fail_load`` is raised by the next load instead."""

    def __init__(self, version: int = 0, *, default: Sequence[int] = (5, 2)) -> None:
        self.version = version
        self.default = list(default)
        self.answers: list[GenerateResult | Exception] = []
        self.requests: list[Request] = []
        self.loads: list[tuple[str, int]] = []
        self.calls: list[str] = []
        self.load_gate: asyncio.Event | None = None
        self.load_started = asyncio.Event()
        self.fail_load: Exception | None = None
        self.healthy = True
        self.dead = False
        self.buckets: list[tuple[str, int]] = []
        """(group, version label) of each bucket received."""
        self.closed = False
        self.generate_gate: asyncio.Event | None = None
        """When set, ``generate`` waits for it before answering (a long generation)."""
        self.loras: dict[str, str] = {}
        """LoRA adapters loaded: name -> path."""
        self.lora_requests: list[str | None] = []
        """The ``lora_path`` of each generate call."""

    async def generate(
        self,
        input_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams | dict[str, Any],
        rid: str | None = None,
        *,
        timeout: float | None = None,
        lora_path: str | None = None,
    ) -> GenerateResult:
        assert isinstance(sampling, SamplingParams)
        self.requests.append(Request([int(i) for i in input_ids], sampling))
        self.lora_requests.append(lora_path)
        if lora_path is not None and lora_path not in self.loras:
            raise InferenceError(400, f"LoRA adapter {lora_path!r} is not loaded", "/generate")
        if self.generate_gate is not None:
            await self.generate_gate.wait()
        if self.answers:
            a = self.answers.pop(0)
            if isinstance(a, Exception):
                raise a
            return a
        if self.dead:
            raise ServerDead("gone")
        label = self.version if lora_path is None else adapter_version(lora_path)
        return answer(self.default, [label] * len(self.default))

    async def pause(self, mode: Any = "abort", *, timeout: float | None = None) -> dict[str, Any]:
        self.calls.append(f"pause:{mode}")
        return {}

    async def resume(self, *, timeout: float | None = None) -> dict[str, Any]:
        self.calls.append("resume")
        return {}

    async def abort(self, rid: str | None = None, *, timeout: float | None = None) -> None:
        self.calls.append(f"abort:{rid}")

    async def update_weights_from_disk(
        self,
        path: str,
        version: int,
        *,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        self.calls.append(f"load:v{version}:abort={abort_all_requests}")
        self.load_started.set()
        if self.load_gate is not None:
            await self.load_gate.wait()
        if self.fail_load is not None:
            e, self.fail_load = self.fail_load, None
            raise e
        self.loads.append((path, version))
        self.version = version
        return {"success": True}

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        self.calls.append(f"join:{group_name}:rank={rank_offset}")
        return {"success": True}

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        version: int,
        flush_cache: bool = True,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        if self.fail_load is not None:
            e, self.fail_load = self.fail_load, None
            raise e
        self.buckets.append((group_name, version))
        self.version = version
        return {"success": True}

    async def load_lora_adapter(
        self, name: str, path: str, *, pinned: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        self.calls.append(f"load_lora:{name}")
        if self.fail_load is not None:
            e, self.fail_load = self.fail_load, None
            raise e
        if name in self.loras:
            raise InferenceError(200, f"The LoRA adapter with the name {name} already exists.")
        self.loras[name] = path
        return {"success": True, "error_message": None, "loaded_adapters": dict(self.loras)}

    async def unload_lora_adapter(
        self, name: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        self.calls.append(f"unload_lora:{name}")
        if self.loras.pop(name, None) is None:
            raise InferenceError(200, f"LoRA adapter {name} is not loaded")
        return {"success": True, "error_message": None, "loaded_adapters": dict(self.loras)}

    async def weight_version(self, *, timeout: float | None = None) -> int | None:
        if self.dead:
            raise ServerDead("gone")
        return self.version

    async def health(self, *, timeout: float | None = None, retries: int | None = None) -> bool:
        if self.dead:
            raise ServerDead("gone")
        return self.healthy

    async def close(self) -> None:
        self.closed = True


def reward_failing_on_p0(prompt: Prompt, output_ids: list[int]) -> float:
    """A ``rollout.reward_fn`` that raises for the first prompt of FakePrompts' usual list."""
    if prompt.id.endswith("0"):
        raise RuntimeError("reward service down")
    return 1.0


def reward_by_length(prompt: Prompt, output_ids: list[int]) -> float:
    """A ``rollout.reward_fn`` that scores a sample by its length (tenths of a token)."""
    return len(output_ids) / 10


def server(
    url: str = "http://a", *, state: ServerState = ServerState.UP, version: int | None = 0
) -> Server:
    return Server(url=url, client=FakeClient(version or 0), state=state, version=version)


def client_of(s: Server) -> FakeClient:
    assert isinstance(s.client, FakeClient)
    return s.client


class FakeVersions:
    """A ``VersionSource``: a gate of fixed ``capacity``, events from a queue."""

    def __init__(self, *, eta: int = 100, capacity: int = 1_000_000, version: int = 0) -> None:
        self.eta = eta
        self.capacity = capacity
        self.current = version
        self.admitted = self.finished = 0
        self.rejected: list[str] = []
        self.wasted_tokens = 0
        self.latest: WeightEvent | None = None
        self.disk: WeightEvent | None = None
        self.queue: asyncio.Queue[WeightEvent] = asyncio.Queue()
        self.heartbeats = 0
        self.registered: list[str] = []
        self.acks: list[tuple[int, str]] = []
        self.deregistered: list[str] = []
        self.finished_mark: RunFinished | None = None
        """What ``run_finished`` answers (a test sets it: the trainer ended the run)."""

    async def version(self) -> int:
        return self.current

    async def try_admit(self, worker_id: str, n: int = 1) -> int:
        return (await self.admit(worker_id, n)).slots

    async def admit(self, worker_id: str, n: int = 1) -> Admission:
        k = max(0, min(n, self.capacity - (self.admitted - len(self.rejected))))
        self.admitted += k
        return Admission(k, self.current)

    async def finish(
        self, worker_id: str, n: int = 1, *, version: int | None = None, tokens: int = 0
    ) -> int:
        self.finished += n
        return self.finished

    async def reject(
        self,
        worker_id: str,
        n: int = 1,
        reason: str = "rejected",
        *,
        version: int | None = None,
        tokens: int = 0,
    ) -> int:
        self.rejected += [reason] * n
        self.wasted_tokens += tokens
        return len(self.rejected)

    async def current_eta(self) -> int:
        return self.eta

    async def latest_weights(self) -> WeightEvent | None:
        return self.latest

    async def latest_disk_weights(self) -> WeightEvent | None:
        return self.disk

    async def events(
        self, after: int | None = None, *, block_ms: int = 0
    ) -> AsyncIterator[WeightEvent]:
        while True:
            yield await self.queue.get()

    async def heartbeat(self, worker_id: str, ttl: float = 15.0) -> None:
        self.heartbeats += 1

    async def reap(self) -> dict[str, int]:
        return {}

    async def deregister(self, worker_id: str) -> int:
        self.deregistered.append(worker_id)
        return 0

    async def run_finished(self) -> RunFinished | None:
        return self.finished_mark

    async def register_sync_servers(
        self,
        worker_id: str,
        urls: list[str],
        *,
        kind: str = "distributed",
        host: str | None = None,
        tp_size: int = 1,
    ) -> None:
        self.registered += urls

    async def unregister_sync_servers(self, urls: list[str]) -> None:
        self.registered = [u for u in self.registered if u not in urls]

    async def ack_sync(self, version: int, url: str) -> None:
        self.acks.append((version, url))


class FakeBuffer:
    def __init__(self) -> None:
        self.groups: list[TrajectoryGroup] = []

    async def put(self, group: TrajectoryGroup) -> str:
        self.groups.append(group)
        return f"{len(self.groups)}-0"


@dataclass
class FakePrompts:
    """``PromptLeases`` over ``prompts``, in order; ``released`` maps prompt id -> requeue."""

    prompts: list[Prompt]
    leased: int = 0
    released: dict[str, bool] = field(default_factory=dict)

    async def lease(self) -> Lease:
        p = self.prompts[self.leased % len(self.prompts)]
        self.leased += 1
        return Lease(f"0:{self.leased}", f"t{self.leased}", 0, self.leased, 0, p, "new")

    async def release(self, lease: Lease, *, requeue: bool = False) -> bool:
        self.released[lease.prompt.id] = requeue
        return True

    async def renew_all(self) -> int:
        return 0


@dataclass
class FakeRecords:
    metrics: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    filtered: list[tuple[int, float]] = field(default_factory=list)

    async def write_metrics(self, m: dict[str, Any]) -> None:
        self.metrics.append(m)

    async def store_update(self, record: dict[str, Any]) -> None:
        self.updates.append(record)

    async def count_filtered(self, samples: int, reward_sum: float) -> None:
        self.filtered.append((samples, reward_sum))


@dataclass
class FakeEvals:
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    claimed: set[int] = field(default_factory=set)

    async def claim(self, version: int) -> bool:
        if version in self.claimed:
            return False
        self.claimed.add(version)
        return True

    async def unclaim(self, version: int) -> None:
        self.claimed.discard(version)

    async def store(self, version: int, record: dict[str, Any]) -> None:
        self.records[version] = record
