"""The rollout worker: admit, lease, generate, score, push — for ever, across weight updates.

One asyncio process drives any number of inference servers (SGLang or the CPU server, through
one ``SGLangClient`` each). Several workers, on one machine or many, share a run through Redis.

Per group (``_run_group``): the staleness gate admits a slot (``try_admit``), a prompt is leased
(``PromptSource``), ``n`` samples are generated concurrently with distinct sampling seeds, scored
off the event loop (``RewardRunner``), the group is pushed (``RedisTrajectoryBuffer.put``), the
slot finished and the lease released. At most ``rollout.max_inflight_groups`` groups at a time.

Weight updates (``_apply_update``): on each weight event the worker, per server, holds its own
new requests, calls ``update_weights_from_disk(path, version, abort_all_requests=True)`` (or
pause -> update -> continue with ``rollout.update_mode = pause``), then lets requests through
again. The server answers every in-flight request with its partial output labelled with the old
version; the worker resubmits ``prompt + partial`` with the remaining budget, so a sample's
tokens, log-probs and versions are the concatenation of its segments. Events that arrive during
an update are coalesced: the next update goes straight to the newest version. With
``weights.distributed=distributed`` the worker registers its servers and, on an announcement,
makes them join the trainer's group and receive the broadcast (``_receive``); a server that
misses one is reloaded from the latest disk copy (``_catch_up_source``; docs/weight-sync.md).

Invariants (tests/test_rollout_worker.py):

- Every admitted slot is finished (group pushed) or rejected with a reason (reward failure,
  inference error, ``shutdown``); a SIGKILLed worker's slots come back through ``reap`` and its
  prompts through lease expiry (``test_sigkill_worker_prompts_and_slots_come_back``,
  ``test_sigterm_exits_clean``).
- Per-token versions come only from the server's answers (``GenerateResult.token_versions``),
  never from the worker's view; a segment without them fails its group
  (``test_weight_update_mid_generation_logprobs_match_recorded_versions``).
- The worker never admits past the gate (``test_worker_stops_at_gate_capacity``).
- A server that dies has its samples resubmitted to the others; one that comes back (or is
  relaunched with ``--launch``) gets the current weights before any work
  (``test_killed_server_its_samples_finish_on_the_other``, ``test_cli_launch_restarts_crashed
  _server``).
- Eval groups never enter the stream and take no admission slots; each eval version is run by
  one worker (a Redis ``SET NX`` lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from buffer import keys
from buffer.connection import connect, with_retries
from buffer.redis_buffer import RedisTrajectoryBuffer
from buffer.schema import Sample, TrajectoryGroup
from inference.client import SGLangClient
from inference.protocol import (
    InferenceError,
    InferenceTimeout,
    InvalidInputError,
    ProtocolError,
    SamplingParams,
    ServerDead,
    SGLangClientError,
)
from rollout_workers.prompts import Lease, PromptSource
from rollout_workers.rewards import RewardFailure, RewardRunner, resolve_reward_fn
from rollout_workers.tasks import get_task
from rollout_workers.tasks.base import Prompt
from staleness.version_manager import RunNotFound, VersionManager, WeightEvent
from weights.plan import DISTRIBUTED_FMTS, FMT_ANNOUNCE, SyncPlan

if TYPE_CHECKING:
    from inference.launch import ServerHandle
    from sluice.config import SluiceConfig

log = logging.getLogger("sluice.rollout")

T = TypeVar("T")

MAX_SEGMENTS = 1000
"""A sample resubmitted more often than this (aborted again and again) fails its group."""
UPDATES_KEPT = 100
METRICS_TTL_S = 7 * 24 * 3600


class Shutdown(Exception):
    """The worker is stopping: the sample or group in hand is given up."""


class GroupRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class Server:
    """One inference server as this worker sees it."""

    url: str
    client: SGLangClient
    handle: ServerHandle | None = None
    restart: Callable[[], ServerHandle] | None = None
    """Relaunch the server (blocking); only for servers this worker launched."""
    alive: bool = True
    open: bool = True
    """False while this worker updates its weights: new requests are held in the worker."""
    needs_load: bool = False
    """Came back from the dead (or an update failed): load the current weights before work."""
    version: int | None = None
    rids: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy_s: float = 0.0
    busy_since: float | None = None
    restarts: int = 0
    deaths: int = 0
    group: str | None = None
    """The distributed weight-sync group this server process has joined (None: none)."""
    dirty: bool = False
    """A distributed transfer failed part-way: its weights are mixed; reload before work."""

    def track(self, rid: str) -> None:
        if not self.rids:
            self.busy_since = time.monotonic()
        self.rids.add(rid)

    def untrack(self, rid: str) -> None:
        self.rids.discard(rid)
        if not self.rids and self.busy_since is not None:
            self.busy_s += time.monotonic() - self.busy_since
            self.busy_since = None

    def busy_total(self) -> float:
        extra = time.monotonic() - self.busy_since if self.busy_since is not None else 0.0
        return self.busy_s + extra


@dataclass
class SampleOut:
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    segments: int = 0


@dataclass
class UpdateRecord:
    version: int
    from_version: int
    received_mono: float
    event_time: float
    latency_s: float | None = None
    """Event received by this worker -> every live server serving the new version."""
    publish_to_serving_s: float | None = None
    """Publication (Redis clock) -> serving (this machine's clock)."""
    interrupted: int = 0
    reprefill_tokens: int = 0
    coalesced: int = 0
    servers: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "from_version": self.from_version,
            "latency_s": self.latency_s,
            "publish_to_serving_s": self.publish_to_serving_s,
            "interrupted": self.interrupted,
            "reprefill_tokens": self.reprefill_tokens,
            "coalesced": self.coalesced,
            "servers": self.servers,
            "failed": self.failed,
        }


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
    doomed_groups: int = 0
    """Groups stopped mid-generation because they could no longer be trained within eta."""
    rejected_by: dict[str, int] = field(default_factory=dict)


def seed_for(*parts: object) -> int:
    """A 62-bit sampling seed from ``parts`` (run seed, group id, sample, segment)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


async def _all_or_nothing(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently; on the first exception cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                assert exc is not None
                raise exc
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RolloutWorker:
    """``await RolloutWorker(cfg, servers).run()``; ``request_stop()`` (or SIGTERM through the
    CLI) ends it cleanly. ``servers`` are ``Server`` objects (see ``make_servers``)."""

    def __init__(
        self,
        cfg: SluiceConfig,
        servers: list[Server],
        *,
        worker_id: str | None = None,
        max_groups: int | None = None,
    ) -> None:
        if not servers:
            raise ValueError("a rollout worker needs at least one inference server")
        if not cfg.model.path:
            raise ValueError(
                "model.path is empty: the worker needs the version-0 weights. Create a model with "
                "`sluice model init DIR --task NAME` and set model.path=DIR"
            )
        if max_groups is not None and max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        self.cfg = cfg
        self.rc = cfg.rollout
        self.run_name = cfg.run.name
        self.servers = servers
        self.worker_id = worker_id or default_worker_id()
        self.max_groups = max_groups
        self.task = get_task(cfg.task.name, **cfg.task.options)
        self.max_new_tokens = self.rc.max_new_tokens or self.task.max_new_tokens
        self.rewards = RewardRunner(
            resolve_reward_fn(self.task, self.rc.reward_fn), timeout_s=self.rc.reward_timeout_s
        )
        self.counters = Counters()
        self.version = 0
        self.weights = WeightEvent(0, cfg.model.path, "safetensors", 0.0)
        self.updates: list[UpdateRecord] = []
        self._last_update: UpdateRecord | None = None
        self._target: WeightEvent | None = None
        self._target_received = 0.0
        self._coalesced = 0
        """Weight events superseded before the worker got to load them."""
        self._update_wanted = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._cv = asyncio.Condition()
        self._groups: dict[asyncio.Task[None], int] = {}
        """Groups in flight -> their admission version."""
        self._doomed: set[asyncio.Task[None]] = set()
        """Groups cancelled because they could no longer be trained within eta."""
        self._bg: list[asyncio.Task[Any]] = []
        self._evals: set[asyncio.Task[None]] = set()
        self._crash: BaseException | None = None
        self._started = time.monotonic()
        self._started_wall = time.time()
        self._status = "starting"
        self.redis: Any = None
        self.vm: VersionManager | None = None
        self.buffer: RedisTrajectoryBuffer | None = None
        self.prompts: PromptSource | None = None
        self.k_metrics = keys.worker_metrics(self.run_name, self.worker_id)
        self.k_updates = keys.worker_updates(self.run_name, self.worker_id)
        self.k_eval = keys.eval_results(self.run_name)
        self._distributed = cfg.weights.distributed == "distributed"
        """Offer the servers for the trainer's broadcast (docs/weight-sync.md)."""

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        """Stop admitting and shut down (safe from a signal handler on the loop)."""
        self._stop.set()
        self._wake.set()

    @property
    def inflight_groups(self) -> int:
        return len(self._groups)

    def inflight_requests(self) -> int:
        return sum(len(s.rids) for s in self.servers)

    async def run(self) -> int:
        """Run until ``request_stop`` or ``max_groups`` pushed; returns groups pushed."""
        try:
            await self._start()
            await self._admission_loop()
        finally:
            await self._shutdown()
        if self._crash is not None:
            raise self._crash
        return self.counters.groups_pushed

    async def _open_vm(self) -> VersionManager:
        url, ttl = self.cfg.redis.url, self.rc.heartbeat_ttl_s
        try:
            vm = await VersionManager.open(url, self.run_name, default_worker_ttl=ttl)
        except RunNotFound:
            vm = await VersionManager.open(
                url,
                self.run_name,
                eta=self.cfg.staleness.eta,
                batch_groups=self.cfg.staleness.batch_groups,
                default_worker_ttl=ttl,
            )
        if vm.batch_groups != self.cfg.staleness.batch_groups or vm.eta != self.cfg.staleness.eta:
            log.warning(
                "run %s has eta=%s batch_groups=%s (the config says %s, %s): using the run's",
                self.run_name,
                vm.eta,
                vm.batch_groups,
                self.cfg.staleness.eta,
                self.cfg.staleness.batch_groups,
            )
        return vm

    async def _start(self) -> None:
        self.redis = await connect(self.cfg.redis.url)
        self.vm = await self._open_vm()
        self.buffer = RedisTrajectoryBuffer(self.redis, self.run_name, consumer=self.worker_id)
        self.prompts = PromptSource(
            self.redis,
            self.run_name,
            self.task.prompts("train"),
            seed=self.cfg.run.seed,
            worker_id=self.worker_id,
            lease_ttl_s=self.rc.lease_ttl_s,
        )
        await self.vm.heartbeat(self.worker_id, self.rc.heartbeat_ttl_s)
        if self._distributed:
            await self.vm.register_sync_servers(self.worker_id, [s.url for s in self.servers])
        latest = await self.vm.latest_weights()
        if latest is not None:
            self.weights = latest
        self.version = self.weights.version
        log.info(
            "worker %s: run %s, task %s, %d server(s), loading weights v%d (%s)",
            self.worker_id,
            self.run_name,
            self.task.name,
            len(self.servers),
            self.version,
            self.weights.location,
        )
        await self._wait_for_a_server(timeout=120.0)
        if self._stop.is_set():  # stopped while waiting: nothing admitted yet
            return
        await asyncio.gather(*(self._bring_up(s) for s in self.servers if s.alive))
        if not any(s.alive and not s.needs_load for s in self.servers):
            raise RuntimeError(
                "no inference server could load the run's weights "
                f"(v{self.version} from {self.weights.location}); see the log above"
            )
        self._status = "running"
        for fn in (self._watch_events, self._updater, self._health_loop, self._housekeeping):
            self._bg.append(asyncio.create_task(self._guard(fn), name=fn.__name__))
        self._maybe_eval(self.version)

    async def _guard(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop; if it crashes, stop the worker and re-raise from ``run``."""
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("worker %s: %s crashed", self.worker_id, fn.__name__)
            self._crash = e
            self.request_stop()

    async def _wait_for_a_server(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ok = await asyncio.gather(*(self._healthy(s) for s in self.servers))
            for s, good in zip(self.servers, ok, strict=True):
                s.alive = good
                if not good:
                    s.needs_load = True
            if any(ok):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    "no inference server answers /health: " + ", ".join(s.url for s in self.servers)
                )
            with contextlib.suppress(TimeoutError):  # SIGTERM ends the wait at once
                await asyncio.wait_for(self._stop.wait(), 0.5)
            if self._stop.is_set():
                return

    async def _healthy(self, s: Server) -> bool:
        try:
            return await s.client.health(timeout=5.0, retries=0)
        except (ServerDead, InferenceTimeout):
            return False

    async def _bring_up(self, s: Server) -> None:
        """Make a live server serve the current weights (skip the load if it already does)."""
        try:
            have = await s.client.weight_version(timeout=10.0)
        except (SGLangClientError, ProtocolError) as e:
            log.warning("server %s: model_info failed (%s)", s.url, e)
            self._mark_dead(s)
            return
        if have == self.version and not s.dirty:
            s.version, s.needs_load, s.alive = have, False, True
            await self._notify()
            return
        src = await self._catch_up_source()
        if have == src.version and not s.dirty:
            # Already at the newest loadable copy (distributed: behind until the next broadcast
            # that includes it, or the next disk copy; the health loop checks again).
            s.version, s.needs_load, s.alive = have, False, True
            await self._notify()
            return
        await self._load(s, src, abort=True)
        if not s.needs_load:
            s.alive = True
            await self._notify()

    async def _catch_up_source(self) -> WeightEvent:
        """The newest weights a server can load by itself: the current event for disk
        publications; for distributed ones the latest recorded disk copy (or model.path, v0)."""
        if self.weights.fmt not in DISTRIBUTED_FMTS:
            return self.weights
        assert self.vm is not None
        rec = await self.vm.latest_disk_weights()
        return rec if rec is not None else WeightEvent(0, self.cfg.model.path, "safetensors", 0.0)

    async def _shutdown(self) -> None:
        self._stopping = True
        self._status = "stopping"
        self._wake.set()
        await self._notify()
        t0 = time.monotonic()
        if self._groups or self._evals:
            aborts = [
                s.client.abort(rid, timeout=2.0)
                for s in self.servers
                if s.alive
                for rid in list(s.rids)
            ]
            await asyncio.gather(*aborts, return_exceptions=True)
            pending = set(self._groups) | self._evals
            if pending:
                await asyncio.wait(pending, timeout=self.rc.shutdown_grace_s)
            for t in set(self._groups) | self._evals:
                t.cancel()
            rest = set(self._groups) | self._evals
            if rest:
                await asyncio.wait(rest, timeout=5.0)
        for t in self._bg:
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        self._status = "stopped"
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self._write_metrics()
        log.info(
            "worker %s stopped in %.2fs: %s",
            self.worker_id,
            time.monotonic() - t0,
            json.dumps(self.metrics()),
        )
        self.rewards.close()
        if self._distributed and self.vm is not None:
            with contextlib.suppress(Exception):
                await self.vm.unregister_sync_servers([s.url for s in self.servers])
        for s in self.servers:
            await s.client.close()
        if self.vm is not None:
            await self.vm.close()
        if self.redis is not None:
            await self.redis.aclose()

    # ------------------------------------------------------------------ admission
    async def _admission_loop(self) -> None:
        assert self.vm is not None
        backoff = 0.02
        while not self._stop.is_set():
            self._wake.clear()
            if self.max_groups is not None and self.counters.groups_pushed >= self.max_groups:
                break
            room = self.rc.max_inflight_groups - len(self._groups)
            if self.max_groups is not None:
                room = min(room, self.max_groups - self.counters.groups_pushed - len(self._groups))
            if room <= 0:
                await self._wake.wait()
                continue
            k = await self.vm.try_admit(self.worker_id, room)
            if k == 0:
                t0 = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff)
                self.counters.gate_blocked_s += time.monotonic() - t0
                self.counters.gate_waits += 1
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.02
            version = await self.vm.version()
            if version > self.version and (self._target is None or self._target.version < version):
                # The gate admitted against a version whose event has not reached us yet: load it
                # now, since these groups may only run on weights at least that new.
                latest = await self.vm.latest_weights()
                if latest is not None and latest.version > self.version:
                    self._target, self._target_received = latest, time.monotonic()
                    self._update_wanted.set()
            for _ in range(k):
                t = asyncio.create_task(self._run_group(version))
                self._groups[t] = version
                t.add_done_callback(self._group_done)
        if self.max_groups is not None and not self._stop.is_set():
            log.info("worker %s: pushed %d groups (--max-groups)", self.worker_id, self.max_groups)

    def _group_done(self, t: asyncio.Task[None]) -> None:
        self._groups.pop(t, None)
        self._doomed.discard(t)
        self._wake.set()
        if not t.cancelled() and t.exception() is not None and self._crash is None:
            self._crash = t.exception()
            self._stop.set()

    async def _run_group(self, admission_version: int) -> None:
        assert self.vm is not None and self.prompts is not None
        admitted_at = time.time()
        lease: Lease | None = None
        try:
            lease = await self.prompts.lease()
            group_id = uuid.uuid4().hex
            prompt_ids = list(lease.prompt.input_ids)
            outs = await _all_or_nothing(
                [
                    self._sample(
                        prompt_ids,
                        (self.cfg.run.seed, group_id, i),
                        self.rc.temperature,
                        min_version=admission_version,
                    )
                    for i in range(self.rc.n_samples)
                ]
            )
            try:
                rewards = await _all_or_nothing(
                    [self.rewards.score(lease.prompt, o.output_ids) for o in outs]
                )
            except RewardFailure as e:
                raise GroupRejected(e.reason, e.detail) from None
            group = TrajectoryGroup(
                run_id=self.run_name,
                prompt_id=lease.prompt.id,
                prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
                samples=[
                    Sample(
                        output_ids=np.asarray(o.output_ids, dtype=np.int32),
                        behaviour_logp=np.asarray(o.logprobs, dtype=np.float32),
                        token_versions=np.asarray(o.versions, dtype=np.int32),
                        reward=r,
                        finish_reason=o.finish_reason,
                        index=i,
                    )
                    for i, (o, r) in enumerate(zip(outs, rewards, strict=True))
                ],
                worker_id=self.worker_id,
                admission_version=admission_version,
                group_id=group_id,
                created_at=admitted_at,
                finished_at=time.time(),
                metadata={
                    "task": self.task.name,
                    "prompt_epoch": lease.epoch,
                    "prompt_pos": lease.pos,
                    "lease_source": lease.source,
                    "segments": sum(o.segments for o in outs),
                },
            )
            # Push, finish and release as one unit that a shutdown does not cut in half: once
            # the push started, the slot is finished, never rejected.
            push = asyncio.ensure_future(self._push(group, lease))
            try:
                await asyncio.shield(push)
            except asyncio.CancelledError:
                await push
        except GroupRejected as e:
            await self._hand_back(e.reason, e.detail, lease, requeue=False)
        except (Shutdown, asyncio.CancelledError):
            me = asyncio.current_task()
            if me in self._doomed and not self._stopping:
                await self._hand_back(
                    "cancelled_stale",  # apart from the trainer's drops ("stale"): never pushed
                    f"admitted at v{admission_version}, weights now v{self.version}: past eta",
                    lease,
                    requeue=True,
                )
            else:
                await self._hand_back("shutdown", "worker stopping", lease, requeue=True)
        except (SGLangClientError, InvalidInputError) as e:
            await self._hand_back("inference_error", str(e), lease, requeue=False)
        except Exception as e:
            await self._hand_back("worker_error", repr(e), lease, requeue=True)
            raise

    async def _push(self, group: TrajectoryGroup, lease: Lease) -> None:
        assert self.buffer is not None and self.vm is not None and self.prompts is not None
        await self.buffer.put(group)
        await self.vm.finish(self.worker_id, 1)
        await self.prompts.release(lease)
        c = self.counters
        c.groups_pushed += 1
        c.samples += group.n
        c.tokens_out += group.num_output_tokens
        if c.groups_pushed % self.rc.log_every == 0:
            sys.stderr.write(json.dumps({"event": "rollout_metrics", **self.metrics()}) + "\n")
            sys.stderr.flush()

    async def _hand_back(
        self, reason: str, detail: str, lease: Lease | None, requeue: bool
    ) -> None:
        assert self.vm is not None and self.prompts is not None
        c = self.counters
        c.groups_rejected += 1
        c.rejected_by[reason] = c.rejected_by.get(reason, 0) + 1
        log.log(
            logging.INFO if reason == "shutdown" else logging.WARNING,
            "worker %s: group rejected reason=%s prompt=%s detail=%s",
            self.worker_id,
            reason,
            lease.prompt.id if lease else None,
            detail,
        )
        await self.vm.reject(self.worker_id, 1, reason)
        if lease is not None:
            await self.prompts.release(lease, requeue=requeue)

    # ------------------------------------------------------------------ sampling
    async def _notify(self) -> None:
        async with self._cv:
            self._cv.notify_all()

    async def _acquire(self, min_version: int = 0) -> Server:
        """A live server taking requests with weights at least ``min_version`` (a group's
        admission version: generating it on older weights would make it staler than the gate
        allowed): the newest weights first, then the least loaded."""
        async with self._cv:
            while True:
                if self._stopping:
                    raise Shutdown()
                usable = [
                    s
                    for s in self.servers
                    if s.alive and s.open and not s.needs_load and (s.version or 0) >= min_version
                ]
                if usable:
                    return min(usable, key=lambda s: (-(s.version or 0), len(s.rids)))
                await self._cv.wait()

    def _mark_dead(self, s: Server) -> None:
        if s.alive:
            s.deaths += 1
            log.warning("server %s is dead; its samples go to the other servers", s.url)
        s.alive = False
        s.needs_load = True
        s.group = None  # a restarted server process has joined no group

    async def _sample(
        self,
        prompt_ids: list[int],
        seed_key: tuple[object, ...],
        temperature: float,
        *,
        min_version: int = 0,
    ) -> SampleOut:
        """One sample, resubmitted as ``prompt + partial`` after every abort or dead server.

        Versions come from each answer's ``token_versions`` (the server's own labels)."""
        out = SampleOut()
        budget = self.max_new_tokens
        attempt = 0
        while True:
            remaining = budget - len(out.output_ids)
            if remaining <= 0:
                out.finish_reason = "length"
                return out
            if out.segments + attempt >= MAX_SEGMENTS:
                raise GroupRejected("inference_error", f"sample resubmitted {MAX_SEGMENTS} times")
            s = await self._acquire(min_version)
            sp = SamplingParams(
                max_new_tokens=remaining,
                temperature=temperature,
                top_p=self.rc.top_p,
                top_k=self.rc.top_k,
                stop_token_ids=(self.task.eos_token_id,),
                ignore_eos=self.rc.ignore_eos,
                sampling_seed=seed_for(*seed_key, out.segments, attempt),
            )
            rid = uuid.uuid4().hex
            s.track(rid)
            try:
                res = await s.client.generate(prompt_ids + out.output_ids, sp, rid)
            except ServerDead as e:
                attempt += 1
                self.counters.resubmitted_dead += 1
                log.warning("sample on %s lost (%s); resubmitting elsewhere", s.url, e)
                self._mark_dead(s)
                await self._notify()
                continue
            except InferenceError as e:
                if e.status >= 500 and attempt < 3:
                    attempt += 1
                    log.warning("generate on %s failed (%s); retrying", s.url, e)
                    await asyncio.sleep(0.1 * attempt)
                    continue
                raise
            finally:
                s.untrack(rid)
            if res.num_tokens and res.token_versions is None:
                raise GroupRejected(
                    "no_token_versions",
                    f"server {s.url} reported no weight version for its tokens: start it with "
                    "--weight-version (per-token versions must come from the server)",
                )
            out.output_ids += res.output_ids.tolist()
            out.logprobs += res.logprobs.tolist()
            if res.token_versions is not None:
                out.versions += res.token_versions.tolist()
            if res.aborted:
                if self._stopping:
                    raise Shutdown()
                out.segments += 1
                self.counters.interrupted_samples += 1
                reprefill = len(prompt_ids) + len(out.output_ids)
                self.counters.reprefill_tokens += reprefill
                rec = self._last_update
                if rec is not None:
                    rec.interrupted += 1
                    rec.reprefill_tokens += reprefill
                continue
            out.finish_reason = res.finish_reason
            return out

    # ------------------------------------------------------------------ weight updates
    async def _watch_events(self) -> None:
        assert self.vm is not None
        async for ev in self.vm.events(after=self.version):
            self.counters.events_seen += 1
            if self._target is not None and self._target.version > self.version:
                self._coalesced += 1
            self._target = ev
            self._target_received = time.monotonic()
            self._update_wanted.set()
            self._wake.set()
            log.info("worker %s: weight event v%d (%s)", self.worker_id, ev.version, ev.location)

    async def _updater(self) -> None:
        while True:
            await self._update_wanted.wait()
            self._update_wanted.clear()
            ev = self._target
            if ev is None or ev.version <= self.version:
                continue
            await self._apply_update(ev, self._target_received)

    async def _apply_update(self, ev: WeightEvent, received: float) -> None:
        rec = UpdateRecord(
            version=ev.version,
            from_version=self.version,
            received_mono=received,
            event_time=ev.time,
            coalesced=self._coalesced,
        )
        self._coalesced = 0
        self._last_update = rec
        live = [s for s in self.servers if s.alive and not s.needs_load]
        rec.servers = len(live)
        self.weights = ev
        self.version = ev.version
        if ev.fmt == FMT_ANNOUNCE:
            ok = await self._receive_all(live, ev)
        elif ev.fmt in DISTRIBUTED_FMTS:  # a broadcast this worker missed: catch up from disk
            await asyncio.gather(*(self._bring_up(s) for s in live))
            ok = [s.version == ev.version for s in live]
        else:
            ok = await asyncio.gather(*(self._load(s, ev, abort=True) for s in live))
        rec.failed = sum(1 for x in ok if not x)
        # Servers that were down or failed pick the new weights up in the health loop.
        for s in self.servers:
            if s.version != ev.version:
                s.needs_load = True
        rec.latency_s = time.monotonic() - received
        rec.publish_to_serving_s = time.time() - ev.time if ev.time else None
        c = self.counters
        c.updates += 1
        c.update_latency_sum_s += rec.latency_s
        c.update_latency_max_s = max(c.update_latency_max_s, rec.latency_s)
        self.updates.append(rec)
        del self.updates[:-UPDATES_KEPT]
        log.info("worker %s: weights v%d serving: %s", self.worker_id, ev.version, rec.as_dict())
        await self._cancel_doomed(ev.version)
        await with_retries(self._store_update(rec), what="store update record")
        self._wake.set()
        self._maybe_eval(ev.version)

    async def _receive_all(self, live: list[Server], ev: WeightEvent) -> list[bool]:
        try:
            plan = SyncPlan.from_json(ev.location)
        except ValueError as e:
            log.error("worker %s: v%d: %s; catching up from disk", self.worker_id, ev.version, e)
            return [False for _ in live]
        return list(await asyncio.gather(*(self._receive(s, plan) for s in live)))

    async def _receive(self, s: Server, plan: SyncPlan) -> bool:
        """Make ``s`` receive ``plan``'s broadcast (joining the group first if ``plan.init``),
        with this worker's new requests held and the server's in-flight ones aborted (pause
        abort -> receive every bucket -> continue). True if it now serves ``plan.version``.
        A server that is not a member (restarted since the group was formed, or unregistered)
        is left for the health loop, which catches it up from the latest disk copy."""
        rank = plan.ranks.get(s.url)
        if rank is None or (not plan.init and s.group != plan.group):
            log.warning(
                "server %s is not in weight-sync group %s: catching up from disk", s.url, plan.group
            )
            return False
        wait = plan.timeout_s + 30.0
        async with s.lock:
            s.open = False
            c = s.client
            try:
                await c.pause("abort")
                try:
                    if plan.init:
                        s.group = None
                        await c.init_weights_update_group(
                            plan.master_addr,
                            plan.master_port,
                            rank,
                            plan.world_size,
                            plan.group,
                            "gloo",
                            timeout=wait,
                        )
                        s.group = plan.group
                    s.dirty = True
                    last = len(plan.buckets) - 1
                    for i, b in enumerate(plan.buckets):
                        # The label moves to the new version only with the last bucket.
                        await c.update_weights_from_distributed(
                            b["names"],
                            b["dtypes"],
                            b["shapes"],
                            plan.group,
                            plan.version if i == last else (s.version or 0),
                            flush_cache=i == last,
                            timeout=wait,
                        )
                finally:
                    await c.resume()
                s.version, s.needs_load, s.dirty = plan.version, False, False
                return True
            except ServerDead as e:
                log.warning(
                    "server %s died during the broadcast of v%d: %s", s.url, plan.version, e
                )
                s.group = None
                self._mark_dead(s)
                return False
            except (InferenceError, ProtocolError, InferenceTimeout) as e:
                log.error(
                    "server %s: receiving v%d over group %s failed: %s (catching up from disk)",
                    s.url,
                    plan.version,
                    plan.group,
                    e,
                )
                s.group = None
                s.needs_load = True
                return False
            finally:
                s.open = True
                await self._notify()

    async def _cancel_doomed(self, version: int) -> None:
        """Stop groups that can no longer be trained: every token of a group admitted at ``v``
        is at least ``v``, and the trainer is at ``version`` or later when it reads the group,
        so ``v < version - eta`` means it would be dropped as over-stale. Its slot goes back and
        its prompt is served again instead of spending generation on it."""
        assert self.vm is not None
        eta = await self.vm.current_eta()
        for t, v in list(self._groups.items()):
            if v < version - eta and t not in self._doomed and not t.done():
                self._doomed.add(t)
                self.counters.doomed_groups += 1
                t.cancel()

    def _store_update(self, rec: UpdateRecord) -> Callable[[], Awaitable[Any]]:
        async def op() -> Any:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(self.k_updates, json.dumps(rec.as_dict()))
                pipe.ltrim(self.k_updates, 0, UPDATES_KEPT - 1)
                pipe.expire(self.k_updates, METRICS_TTL_S)
                return await pipe.execute()

        return op

    async def _load(self, s: Server, ev: WeightEvent, *, abort: bool) -> bool:
        """Load ``ev`` into ``s`` with this worker's new requests held; True on success."""
        async with s.lock:
            s.open = False
            try:
                c = s.client
                if self.rc.update_mode == "pause":
                    await c.pause("abort")
                    try:
                        await c.update_weights_from_disk(ev.location, ev.version)
                    finally:
                        await c.resume()
                else:
                    await c.update_weights_from_disk(
                        ev.location, ev.version, abort_all_requests=abort
                    )
                s.version = ev.version
                s.needs_load = s.dirty = False
                return True
            except ServerDead as e:
                log.warning("server %s died during the update to v%d: %s", s.url, ev.version, e)
                self._mark_dead(s)
                return False
            except (InferenceError, ProtocolError, InferenceTimeout) as e:
                log.error(
                    "server %s: loading v%d from %s failed: %s (retried by the health loop)",
                    s.url,
                    ev.version,
                    ev.location,
                    e,
                )
                s.needs_load = True
                return False
            finally:
                s.open = True
                await self._notify()

    # ------------------------------------------------------------------ server health
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.rc.health_interval_s)
            await asyncio.gather(*(self._check(s) for s in self.servers))

    async def _check(self, s: Server) -> None:
        if s.lock.locked():
            return  # being updated: SGLang answers 503 while paused
        if s.handle is not None and s.restart is not None and not s.handle.alive():
            self._mark_dead(s)
            await self._notify()
            code = await asyncio.to_thread(s.handle.stop, 5.0)
            log.warning("server %s exited (code %s): relaunching it", s.url, code)
            s.handle = await asyncio.to_thread(s.restart)
            s.restarts += 1
        if not await self._healthy(s):
            if s.alive:
                self._mark_dead(s)
                await self._notify()
            return
        behind = (
            self.weights.fmt in DISTRIBUTED_FMTS and s.alive and (s.version or 0) < self.version
        )
        if behind:
            await self._bring_up(s)  # loads a newer disk copy if one has been recorded
        elif not s.alive or s.needs_load:
            log.info("server %s is back: loading v%d before it gets work", s.url, self.version)
            await self._bring_up(s)

    # ------------------------------------------------------------------ eval
    def _maybe_eval(self, version: int) -> None:
        every = self.rc.eval_every
        if every <= 0 or version % every or self._stopping:
            return
        t = asyncio.create_task(self._eval(version))
        self._evals.add(t)
        t.add_done_callback(self._evals.discard)

    async def _eval(self, version: int) -> None:
        lock = keys.eval_lock(self.run_name, version)
        got = await with_retries(
            lambda: self.redis.set(lock, self.worker_id, nx=True, ex=METRICS_TTL_S),
            what="eval lock",
        )
        if not got:
            return
        prompts: list[Prompt] = list(self.task.prompts("eval"))[: self.rc.eval_prompts]
        if not prompts:
            log.warning("task %s has no eval prompts; eval skipped", self.task.name)
            return
        t0 = time.monotonic()
        sem = asyncio.Semaphore(max(1, self.rc.max_inflight_groups * self.rc.n_samples // 2))

        async def one(p: Prompt, temperature: float, tag: str) -> tuple[float, list[int]]:
            async with sem:
                o = await self._sample(list(p.input_ids), ("eval", version, p.id, tag), temperature)
            return await self.rewards.score(p, o.output_ids), o.versions

        try:
            greedy = await _all_or_nothing([one(p, 0.0, "greedy") for p in prompts])
            sampled = await _all_or_nothing(
                [one(p, self.rc.temperature, "sampled") for p in prompts]
            )
        except (Shutdown, asyncio.CancelledError, SGLangClientError, RewardFailure) as e:
            log.warning("eval of v%d abandoned (%r); lock released", version, e)
            await self.redis.delete(lock)
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
        await with_retries(
            lambda: self.redis.hset(self.k_eval, str(version), json.dumps(record)),
            what="store eval",
        )
        self.counters.evals += 1
        log.info("worker %s: eval %s", self.worker_id, json.dumps(record))

    # ------------------------------------------------------------------ liveness and metrics
    async def _housekeeping(self) -> None:
        """Heartbeat, lease renewal, reaping dead workers and metrics, each when due."""
        assert self.vm is not None and self.prompts is not None
        hb_every = self.rc.heartbeat_ttl_s / 3
        lease_every = self.rc.lease_ttl_s / 3
        tick = min(hb_every, lease_every, self.rc.metrics_interval_s, 1.0)
        last_hb = last_lease = last_metrics = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last_hb >= hb_every:
                await self.vm.heartbeat(self.worker_id, self.rc.heartbeat_ttl_s)
                reaped = await self.vm.reap()
                if reaped:
                    self._wake.set()
                last_hb = now
            if now - last_lease >= lease_every:
                await self.prompts.renew_all()
                last_lease = now
            if now - last_metrics >= self.rc.metrics_interval_s:
                await self._write_metrics()
                last_metrics = now

    def metrics(self) -> dict[str, Any]:
        c = self.counters
        elapsed = max(1e-9, time.monotonic() - self._started)
        return {
            "worker": self.worker_id,
            "status": self._status,
            "pid": os.getpid(),
            "version": self.version,
            "groups_pushed": c.groups_pushed,
            "groups_rejected": c.groups_rejected,
            "rejected_by": dict(c.rejected_by),
            "inflight_groups": len(self._groups),
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
            "doomed_groups": c.doomed_groups,
            "evals": c.evals,
            "uptime_s": round(elapsed, 2),
            "servers": [
                {
                    "url": s.url,
                    "alive": s.alive,
                    "version": s.version,
                    "pid": s.handle.pid if s.handle is not None else None,
                    "utilisation": round(s.busy_total() / elapsed, 4),
                    "inflight": len(s.rids),
                    "deaths": s.deaths,
                    "restarts": s.restarts,
                }
                for s in self.servers
            ],
        }

    async def _write_metrics(self) -> None:
        m = self.metrics()
        flat = {
            k: json.dumps(v) if isinstance(v, dict | list) or v is None else v for k, v in m.items()
        }
        flat["updated_at"] = time.time()
        flat["started_at"] = self._started_wall

        async def op() -> Any:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.k_metrics, mapping=flat)
                pipe.expire(self.k_metrics, METRICS_TTL_S)
                return await pipe.execute()

        await with_retries(op, what="write worker metrics")


def make_servers(
    urls: list[str],
    *,
    handles: list[ServerHandle] | None = None,
    restarts: list[Callable[[], ServerHandle]] | None = None,
    admin_api_key: str | None = None,
    vocab_size: int | None = None,
) -> list[Server]:
    """``Server`` objects for ``urls`` (with their launch handles and relaunchers, if any)."""
    out = []
    for i, url in enumerate(urls):
        client = SGLangClient(url, admin_api_key=admin_api_key, vocab_size=vocab_size)
        out.append(
            Server(
                url=client.url,
                client=client,
                handle=handles[i] if handles else None,
                restart=restarts[i] if restarts else None,
            )
        )
    return out
