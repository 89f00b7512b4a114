"""A step's groups: where they come from and which of them may be trained.

``GroupReader.next_batch`` gives this rank's share of ``batch_groups`` groups: first the
recorded steps a resume must replay (in their recorded composition, at their recorded version),
then the pending groups no record names, then blocking reads of the consumer group (never
polling). ``judge`` applies the staleness rule (``staleness.gate``): a group past eta ("stale")
or newer than the trainer ("future_version") is dropped (``VersionManager.drop``) and acked at
once, so it is never replayed. A dropped group's ``drop`` and ack are two calls (drop first): a
crash between them hands the slot back twice, which loosens the admission gate by one group
(the per-group staleness check still guards the loss); the reverse order could leak the slot
for good.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from buffer import Delivered, RedisTrajectoryBuffer
from staleness import VersionManager
from staleness.gate import group_staleness, past_eta
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
    """Staleness histogram (``trainer.metrics.HIST`` buckets) of every group read."""


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
    ) -> None:
        self.buf = buf
        self.vm = vm
        self.clock = clock
        self.st = state
        self.share = share
        self.wait_log_s = wait_log_s
        self.stopped = stopped
        self._dead_settled = 0

    async def next_batch(self) -> StepBatch | None:
        """The next step's groups; None when a stop came before a full share arrived."""
        if self.st.replay:
            return self.st.replay.pop(0)
        got, self.st.fresh = self.st.fresh[: self.share], self.st.fresh[self.share :]
        t0 = time.monotonic()
        last_log = t0
        while len(got) < self.share and not self.stopped():
            got += await self.buf.get_batch(self.share - len(got), block_ms=1000)
            await self.settle_dead_letters()
            if time.monotonic() - last_log > self.wait_log_s:
                last_log = time.monotonic()
                log.info("waiting for data: %d/%d groups", len(got), self.share)
        if self.stopped() and len(got) < self.share:
            self.st.fresh = got + self.st.fresh
            return None
        return StepBatch(got, self.st.version, replay=False, idle_s=time.monotonic() - t0)

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
            log.warning("%d undecodable entries dead-lettered; their slots handed back", n)

    async def judge(self, batch: StepBatch, eta: int) -> Judged:
        """Drop (and ack) the groups of ``batch`` the staleness rule rejects at its version."""
        kept: list[Delivered] = []
        dropped: list[str] = []
        hist = [0.0] * HIST
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
            await self.clock(self.vm.drop(1, reason))
            await self.clock(self.buf.ack([d.entry_id]))
            dropped.append(d.entry_id)
        return Judged(kept, dropped, hist)
