"""A step's groups: where they come from and which of them may be trained.

``GroupReader.next_batch`` gives this rank's share of ``batch_groups`` groups: first the
recorded steps a resume must replay (in their recorded composition, at their recorded version),
then groups from its *pool*: what it has read from the consumer group (blocking reads, never
polling) and not trained yet, the pending groups no record names included. A step takes the
pooled groups that expire first (``staleness.gate.plan_batch``: earliest oldest token first),
not stream order, and when a group still being generated would otherwise expire before a later
step could take it (the gate's in-flight book, ``VersionManager.inflight_by_version``), it
waits for it, up to ``trainer.hold_max_s``: a group overtaken in the stream is trained in time
instead of being dropped (docs/staleness.md, "No waste at steady state").

``judge`` applies the staleness rule (``staleness.gate``): a group past eta ("stale")
or newer than the trainer ("future_version") is dropped (``VersionManager.drop``) and acked at
once, so it is never replayed. A dropped group's ``drop`` and ack are two calls (drop first): a
crash between them hands the slot back twice, which loosens the admission gate by one group
(the per-group staleness check still guards the loss); the reverse order could leak the slot
for good.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from buffer import Delivered, RedisTrajectoryBuffer
from buffer.schema import TrajectoryGroup
from staleness import VersionManager
from staleness.gate import group_staleness, past_eta, plan_batch
from trainer.ledger import StepBatch
from trainer.metrics import HIST, RedisClock, hist_bucket
from trainer.resume import TrainState

log = logging.getLogger("sluice.trainer")


def drop_reason(staleness_: int, eta: int) -> str | None:
    """Why a group this stale may not be trained: "stale" (past ``eta``), "future_version" (a
    token newer than the trainer), or None: it may."""
    if past_eta(staleness_, eta):
        return "stale"
    if staleness_ < 0:
        return "future_version"
    return None


@dataclass(frozen=True)
class Judged:
    """A step's groups after the staleness rule."""

    kept: list[Delivered]
    dropped: list[str]
    """Entry ids dropped (and acked)."""
    hist: list[float]
    """Staleness histogram (``trainer.metrics.HIST`` buckets) of every group the step took."""
    dropped_tokens: int = 0
    """Output tokens of the dropped groups (generated, never trained)."""
    dropped_future: int = 0
    """Of ``dropped``, those with a token newer than the trainer (a bug upstream)."""


POOL_VERSIONS = 16
"""The pool holds at most ``share * (min(eta, POOL_VERSIONS) + 2)`` groups: everything the gate
lets be ahead of the trainer (``(eta + 1) * B``) up to that eta, and one batch more."""
HOLD_POLL_MS = 200
"""While a step holds, it blocks on the stream this long at a time, then reads the in-flight
book again (a group handed back or reaped ends the hold without arriving)."""


def oldest_version(group: TrajectoryGroup) -> int:
    """The oldest version of a group's tokens (its admission version when it has none)."""
    return -group_staleness(0, group)


class GroupReader:
    """This rank's groups per step (see the module docstring)."""

    def __init__(
        self,
        buf: RedisTrajectoryBuffer,
        vm: VersionManager,
        clock: RedisClock,
        state: TrainState,
        *,
        share: int,
        wait_log_s: float,
        stopped: Callable[[], bool],
        hold_max_s: float = 10.0,
        publish_every: int = 1,
        world_size: int = 1,
    ) -> None:
        self.buf = buf
        self.vm = vm
        self.clock = clock
        self.st = state
        self.share = share
        self.wait_log_s = wait_log_s
        self.stopped = stopped
        self.hold_max_s = hold_max_s
        self.publish_every = publish_every
        self.world_size = world_size
        self._dead_settled = 0
        self.arrived: list[int] = []
        """Staleness at arrival (the trainer's version when read) of each group read since the
        last ``take_arrivals``."""
        self.dead_lettered_step = 0
        """Entries dead-lettered since the last ``take_arrivals``."""
        self.early: list[Delivered] = []
        """Pooled groups dropped past eta since the last batch (already dropped and acked)."""

    @property
    def pool(self) -> list[Delivered]:
        """Groups read (pending on this consumer) and not yet taken by a step: the state's
        ``fresh`` list, so a resume finds them there too."""
        return self.st.fresh

    def take_arrivals(self) -> tuple[list[int], int]:
        """Staleness of the groups read, and entries dead-lettered, since the last call."""
        got, self.arrived = self.arrived, []
        dead, self.dead_lettered_step = self.dead_lettered_step, 0
        return got, dead

    async def _read(self, n: int, block_ms: int) -> int:
        got = await self.buf.get_batch(n, block_ms=block_ms)
        await self.settle_dead_letters()
        self.pool.extend(got)
        self.arrived += [group_staleness(self.st.version, d.group) for d in got]
        return len(got)

    async def next_batch(
        self, eta: int, narrowed: tuple[int, int] | None = None
    ) -> StepBatch | None:
        """The next step's groups (None when a stop came first): the earliest-expiring pooled
        groups (``staleness.gate.plan_batch``) plus the pooled ones already past ``eta`` (the
        step drops them). It waits while the pool lacks a batch, and up to
        ``hold_max_s`` more while groups still being generated would otherwise expire.
        ``narrowed``: a lowering of eta in progress (``plan_batch``)."""
        if self.st.replay:
            return self.st.replay.pop(0)
        t0 = time.monotonic()
        last_log = t0
        cap = self.share * (min(eta, POOL_VERSIONS) + 2)
        full_since: float | None = None
        plan = None
        while not self.stopped():
            if len(self.pool) < cap:
                await self.clock(self._read(cap - len(self.pool), 1))
            inflight = await self.clock(self.vm.inflight_by_version()) if self.hold_max_s else {}
            steps_to_publish = self.publish_every - self.st.step % self.publish_every
            plan = plan_batch(
                [oldest_version(d.group) for d in self.pool],
                inflight,
                version=self.st.version,
                eta=eta,
                take=self.share,
                steps_to_publish=steps_to_publish,
                publish_every=self.publish_every,
                inflight_share=1.0 / self.world_size,
                narrowed=narrowed,
            )
            if plan.expired:
                # Dropped at once, not when a step takes them: their slots go back to the
                # gate now (holding them could keep the gate shut with nothing to train).
                await self._drop_early([self.pool[i] for i in plan.expired], eta)
                continue
            if plan.ready:
                break
            now = time.monotonic()
            if len(plan.take) == self.share:  # a full batch: holding for expiring groups
                full_since = now if full_since is None else full_since
                if now - full_since >= self.hold_max_s:
                    log.warning(
                        "step at v%d: %d group(s) that expire now are still being generated "
                        "after %.1fs (trainer.hold_max_s): going on without them",
                        self.st.version,
                        plan.short,
                        now - full_since,
                    )
                    break
            if now - last_log > self.wait_log_s:
                last_log = now
                log.info(
                    "waiting for data: %d/%d groups pooled, %d more needed",
                    len(plan.take),
                    self.share,
                    plan.short,
                )
            if len(self.pool) < cap:
                await self._read(1, HOLD_POLL_MS)
            else:
                await asyncio.sleep(HOLD_POLL_MS / 1000)
        if plan is None or (self.stopped() and not plan.ready):
            return None
        chosen = [self.pool[i] for i in plan.take]
        ids = {id(d) for d in chosen}
        self.st.fresh = [d for d in self.pool if id(d) not in ids]
        idle = time.monotonic() - t0
        held = 0.0 if full_since is None else time.monotonic() - full_since
        early, self.early = self.early, []
        return StepBatch(
            chosen, self.st.version, replay=False, idle_s=idle, hold_s=held, early=early
        )

    async def _drop_early(self, groups: list[Delivered], eta: int) -> None:
        """Drop pooled groups past ``eta`` (``VersionManager.drop`` then ack, as ``judge``
        does); the next step's metrics count them."""
        ids = {id(d) for d in groups}
        self.st.fresh = [d for d in self.pool if id(d) not in ids]
        for d in groups:
            s = group_staleness(self.st.version, d.group)
            log.warning(
                "dropping group %s: staleness %d (version %d, oldest token v%d) > eta %d",
                d.group.group_id,
                s,
                self.st.version,
                self.st.version - s,
                eta,
            )
            await self.clock(self.vm.drop(1, "stale", tokens=d.group.num_output_tokens))
            await self.clock(self.buf.ack([d.entry_id]))
            self.early.append(d)

    async def settle_dead_letters(self) -> None:
        """Hand back the admission slots of entries the buffer dead-lettered (undecodable: a
        corrupt payload, a newer schema): each was counted finished and will never be trained,
        so without this the gate would shrink by one slot per entry for good, and with a small
        ``eta`` the run would stall (tests/faults/test_component_fixes.py). An entry that was
        never admitted (written into the stream by hand) loosens the gate by one slot; the
        per-group staleness check still guards the loss."""
        n = self.buf.dead_lettered - self._dead_settled
        if n > 0:
            await self.clock(self.vm.drop(n, "dead_letter"))
            self._dead_settled += n
            self.dead_lettered_step += n
            log.warning("%d undecodable entries dead-lettered; their slots handed back", n)

    async def judge(self, batch: StepBatch, eta: int) -> Judged:
        """Drop (and ack) the groups of ``batch`` the staleness rule rejects at its version."""
        kept: list[Delivered] = []
        dropped: list[str] = []
        dropped_tokens = future = 0
        hist = [0.0] * HIST
        for d in batch.early:  # dropped and acked by next_batch already: counted here
            hist[hist_bucket(group_staleness(batch.version, d.group))] += 1
            dropped.append(d.entry_id)
            dropped_tokens += d.group.num_output_tokens
        for d in batch.delivered:
            s = group_staleness(batch.version, d.group)
            hist[hist_bucket(s)] += 1
            reason = drop_reason(s, eta)
            if reason is None:
                kept.append(d)
                continue
            log.warning(
                "dropping group %s: staleness %d (version %d, oldest token v%d) %s eta %d",
                d.group.group_id,
                s,
                batch.version,
                batch.version - s,
                ">" if reason == "stale" else "< 0 with",
                eta,
            )
            await self.clock(self.vm.drop(1, reason, tokens=d.group.num_output_tokens))
            await self.clock(self.buf.ack([d.entry_id]))
            dropped.append(d.entry_id)
            dropped_tokens += d.group.num_output_tokens
            future += reason == "future_version"
        return Judged(kept, dropped, hist, dropped_tokens, future)
