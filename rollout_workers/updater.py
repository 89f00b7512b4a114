"""The weight updater: keep every server of one worker on the run's newest weights.

``watch_events`` follows the run's weight events; ``run`` applies the newest one. Events that
arrive while an update runs are coalesced: the next update goes straight to the newest
version, skipping what it superseded (``UpdateRecord.coalesced`` counts them). Applying an
event (``apply``), per live server and with its new requests held (``ServerPool.exclusive``):

- a disk publication: ``update_weights_from_disk(path, version, abort_all_requests=True)``, or
  pause -> update -> continue with ``rollout.update_mode = pause`` (``weights.receive``). The
  server answers every in-flight request with its partial output labelled with the old
  version, and the sampler resubmits ``prompt + partial``.
- a distributed announcement (``weights.plan.FMT_ANNOUNCE``): the server joins the trainer's
  group if the plan opens one and receives the broadcast; a server that cannot (not a member,
  or the transfer failed) is caught up from the latest disk copy (``catch_up_source``;
  docs/weight-sync.md).
- an ipc announcement (``weights.plan.FMT_IPC_ANNOUNCE``): each target server is held and
  acknowledged while the trainer fills it in memory (``weights.receive.IpcReceiver``); the
  others, and a target whose transfer failed, catch up from disk the same way.

Servers that were down or failed are left NEEDS_LOAD or DEAD: the pool's health loop has
``bring_up`` load them before they get work. After each update the groups that can no longer
be trained within eta are cancelled (``InFlight.cancel_past_eta``, the staleness rule of
``staleness.gate``) and the update is recorded; they are cancelled as soon as the event
arrives, too (a publication or an announcement: the trainer is at that version already), so
no token is generated for them during the load.

Invariants (tests/unit/rollout_workers/test_rollout_workers_updater.py, and with a real server
tests/integration/test_rollout_worker.py::test_weight_events_during_an_update_are_coalesced): each server
loads a version at most once, versions only increase, and the last event seen is the version
the servers end on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from inference.protocol import (
    InferenceError,
    InferenceTimeout,
    ProtocolError,
    ServerDead,
    SGLangClientError,
)
from rollout_workers.inflight import InFlight
from rollout_workers.metrics import UPDATES_KEPT, Counters
from rollout_workers.pool import Server, ServerPool
from rollout_workers.ports import VersionSource
from staleness.version_manager import WeightEvent
from weights.plan import (
    FMT_ANNOUNCE,
    FMT_IPC_ANNOUNCE,
    FMT_LORA,
    REMOTE_FMTS,
    IpcPlan,
    SyncPlan,
)
from weights.receive import (
    DiskReceiver,
    DistributedReceiver,
    IpcReceiver,
    LoraReceiver,
    WeightReceiver,
)

log = logging.getLogger("sluice.rollout")


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


class WeightUpdater:
    """The current weights of one worker and the loop that brings its servers to them."""

    def __init__(
        self,
        pool: ServerPool,
        versions: VersionSource,
        groups: InFlight,
        counters: Counters,
        *,
        worker_id: str,
        model_path: str,
        update_mode: Literal["abort_all", "pause"],
        store_update: Callable[[dict[str, Any]], Awaitable[None]],
        wake: Callable[[], None] = lambda: None,
        on_serving: Callable[[int], None] = lambda version: None,
    ) -> None:
        self.pool = pool
        self.versions = versions
        self.groups = groups
        self.counters = counters
        self.worker_id = worker_id
        self.model_path = model_path
        """The version-0 weights."""
        self.pause = update_mode == "pause"
        self.store_update = store_update
        self.wake = wake
        """Called when the admission loop may have room again (an event, an update done)."""
        self.on_serving = on_serving
        """Called with each version once the servers serve it."""
        self.weights = WeightEvent(0, model_path, "safetensors", 0.0)
        self.version = 0
        self.updates: list[UpdateRecord] = []
        self.last: UpdateRecord | None = None
        self._target: WeightEvent | None = None
        self._target_received = 0.0
        self._coalesced = 0
        """Weight events superseded before the worker got to load them."""
        self._applying = False
        """An update is being applied (``behind`` answers no meanwhile)."""
        self._wanted = asyncio.Event()
        self._retiring: dict[str, set[str]] = {}
        """Adapters being unloaded, by server URL."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Take the run's latest publication (if any) as the weights to serve."""
        latest = await self.versions.latest_weights()
        if latest is not None:
            self.weights = latest
        self.version = self.weights.version

    def note_interrupted(self, reprefill: int) -> None:
        """A sample was interrupted (by the update in progress): count it on its record."""
        if self.last is not None:
            self.last.interrupted += 1
            self.last.reprefill_tokens += reprefill

    # ------------------------------------------------------------------ events
    def _want(self, ev: WeightEvent) -> None:
        self._target, self._target_received = ev, time.monotonic()
        self._wanted.set()

    async def watch_events(self) -> None:
        async for ev in self.versions.events(after=self.version):
            self.counters.events_seen += 1
            if self._target is not None and self._target.version > self.version:
                self._coalesced += 1
            self._want(ev)
            self.wake()
            log.info("worker %s: weight event v%d (%s)", self.worker_id, ev.version, _where(ev))
            # On the event, not after the load: the trainer trains at ev.version or later from
            # now on, so a group past eta there is dead already; every token it would still
            # generate during the load is waste.
            await self._cancel_past_eta(ev.version)

    async def catch_up_to(self, version: int) -> None:
        """The gate admitted against ``version``: if its event has not reached this worker
        yet, load the latest publication now, since those groups may only run on weights at
        least that new."""
        if version > self.version and (self._target is None or self._target.version < version):
            latest = await self.versions.latest_weights()
            if latest is not None and latest.version > self.version:
                self._want(latest)

    async def run(self) -> None:
        """Apply the newest wanted event, for ever."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            ev = self._target
            if ev is None or ev.version <= self.version:
                continue
            await self.apply(ev, self._target_received)

    # ------------------------------------------------------------------ one update
    async def apply(self, ev: WeightEvent, received: float) -> UpdateRecord:
        """Bring every live server to ``ev``; cancel the groups it leaves past eta."""
        rec = UpdateRecord(
            version=ev.version,
            from_version=self.version,
            received_mono=received,
            event_time=ev.time,
            coalesced=self._coalesced,
        )
        self._coalesced = 0
        self.last = rec
        self._applying = True
        try:
            return await self._apply(ev, rec)
        finally:
            self._applying = False

    async def _apply(self, ev: WeightEvent, rec: UpdateRecord) -> UpdateRecord:
        live = self.pool.live()
        rec.servers = len(live)
        self.weights = ev
        self.version = ev.version
        if ev.fmt in (FMT_ANNOUNCE, FMT_IPC_ANNOUNCE):
            ok = await self._receive_all(live, ev)
        elif ev.fmt in REMOTE_FMTS:  # a transfer this worker missed: catch up from disk
            await asyncio.gather(*(self.bring_up(s) for s in live))
            ok = [s.version == ev.version for s in live]
        elif ev.fmt == FMT_LORA:
            lora = LoraReceiver(ev.location, ev.version)
            ok = await asyncio.gather(*(self.transfer(s, lora) for s in live))
        else:
            receiver = DiskReceiver(ev.location, ev.version, pause=self.pause)
            ok = await asyncio.gather(*(self.transfer(s, receiver) for s in live))
        rec.failed = sum(1 for x in ok if not x)
        # Servers that were down or failed pick the new weights up in the health loop.
        for s in self.pool.servers:
            if s.version != ev.version:
                self.pool.require_load(s)
        rec.latency_s = time.monotonic() - rec.received_mono
        rec.publish_to_serving_s = time.time() - ev.time if ev.time else None
        c = self.counters
        c.updates += 1
        c.update_latency_sum_s += rec.latency_s
        c.update_latency_max_s = max(c.update_latency_max_s, rec.latency_s)
        self.updates.append(rec)
        del self.updates[:-UPDATES_KEPT]
        log.info("worker %s: weights v%d serving: %s", self.worker_id, ev.version, rec.as_dict())
        await self._cancel_past_eta(ev.version)
        await self.store_update(rec.as_dict())
        self.wake()
        self.on_serving(ev.version)
        return rec

    async def _receive_all(self, live: list[Server], ev: WeightEvent) -> list[bool]:
        receiver: WeightReceiver
        try:
            if ev.fmt == FMT_IPC_ANNOUNCE:
                receiver = IpcReceiver(IpcPlan.from_json(ev.location), self.versions)
            else:
                receiver = DistributedReceiver(SyncPlan.from_json(ev.location))
        except ValueError as e:
            log.error("worker %s: v%d: %s; catching up from disk", self.worker_id, ev.version, e)
            return [False for _ in live]
        return list(await asyncio.gather(*(self.transfer(s, receiver) for s in live)))

    async def _cancel_past_eta(self, version: int) -> None:
        """Stop the groups that can no longer be trained now that the weights are at
        ``version`` (``InFlight.cancel_past_eta``)."""
        eta = await self.versions.current_eta()
        self.counters.cancelled_stale += self.groups.cancel_past_eta(version, eta)

    async def transfer(self, s: Server, receiver: WeightReceiver) -> bool:
        """Make ``s`` serve ``receiver.version`` with this worker's new requests held; True on
        success. A server that dies is marked dead; one that fails must load again."""
        why = receiver.refusal(s)
        if why is not None:
            log.warning("server %s %s", s.url, why)
            return False
        async with self.pool.exclusive(s):
            try:
                await receiver.receive(s.client, s)
            except ServerDead as e:
                log.warning("server %s died during %s: %s", s.url, receiver.during, e)
                self.pool.mark_dead(s)
                return False
            except (InferenceError, ProtocolError, InferenceTimeout) as e:
                log.error(
                    "server %s: %s failed: %s (%s)", s.url, receiver.action, e, receiver.fallback
                )
                self.pool.require_load(s)
                return False
            self.pool.loaded(s, receiver.version)
        if isinstance(receiver, LoraReceiver):
            self._retire_adapters(s)
        return True

    def _retire_adapters(self, s: Server) -> None:
        """Unload, in the background, every adapter loaded on ``s`` but the one its requests
        name now, each once no request of this worker names it (``Server.adapter_uses``)."""
        for name in sorted(s.adapters - {s.adapter} - self._retiring.get(s.url, set())):
            self._retiring.setdefault(s.url, set()).add(name)
            task = asyncio.create_task(self._retire(s, name), name=f"unload-{name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _retire(self, s: Server, name: str) -> None:
        try:
            while s.adapter_uses.get(name, 0) > 0:
                s.adapter_released.clear()
                await s.adapter_released.wait()
            if name not in s.adapters or name == s.adapter:
                return  # the server restarted (nothing loaded), or it is current again
            try:
                await s.client.unload_lora_adapter(name)
            except SGLangClientError as e:
                log.warning("server %s: unloading adapter %s failed: %s", s.url, name, e)
                return
            s.adapters.discard(name)
            log.info("server %s: adapter %s unloaded (no request names it)", s.url, name)
        finally:
            self._retiring.get(s.url, set()).discard(name)

    # ------------------------------------------------------------------ bring-up
    def behind(self, s: Server) -> bool:
        """Distributed or ipc weights: a live server behind the current version (it missed a
        transfer) catches up from the newest disk copy once one is recorded. Not while an
        update is being applied: its transfer brings the server up (a catch-up started then
        would take the server's lock first and load an older copy)."""
        if self._applying:
            return False
        return self.weights.fmt in REMOTE_FMTS and s.alive and (s.version or 0) < self.version

    async def catch_up_source(self) -> WeightEvent:
        """The newest weights a server can load by itself: the current event for disk
        publications; for distributed and ipc ones the latest recorded disk copy (or
        model.path, v0)."""
        if self.weights.fmt not in REMOTE_FMTS:
            return self.weights
        rec = await self.versions.latest_disk_weights()
        return rec if rec is not None else WeightEvent(0, self.model_path, "safetensors", 0.0)

    async def bring_up(self, s: Server) -> None:
        """Make a server that answers serve the current weights (no load if it already does)."""
        try:
            have = await s.client.weight_version(timeout=10.0)
        except SGLangClientError as e:
            log.warning("server %s: model_info failed (%s)", s.url, e)
            self.pool.mark_dead(s)
            return
        if self.weights.fmt == FMT_LORA:
            # The base never changes; the server may have lost its adapters (a restart):
            # load the current one again, under its name, before it gets work.
            lora = LoraReceiver(self.weights.location, self.weights.version, reload=True)
            if await self.transfer(s, lora):
                self.pool.mark_up(s)
            return
        if have == self.version and not s.mixed:
            self.pool.mark_up(s, have)
            return
        src = await self.catch_up_source()
        remote = self.weights.fmt in REMOTE_FMTS
        newer = remote and have is not None and src.version < have < self.version
        if (have == src.version or newer) and not s.mixed:
            # Already at (or, for distributed and ipc weights, past) the newest loadable copy:
            # never load an older copy over complete newer weights of this run; behind until
            # the next transfer that includes it, or the next disk copy (the health loop
            # checks again). A label above the run's version is another run's: loaded over.
            self.pool.mark_up(s, have)
            return
        if await self.transfer(s, DiskReceiver(src.location, src.version, pause=self.pause)):
            self.pool.mark_up(s)


def _where(ev: WeightEvent) -> str:
    """An event's location for a log line: a transfer plan (JSON of every tensor's name,
    dtype and shape) is named by its format and size, not printed."""
    if ev.fmt in (FMT_ANNOUNCE, FMT_IPC_ANNOUNCE):
        return f"{ev.fmt}: a transfer plan of {len(ev.location)} bytes"
    return ev.location
