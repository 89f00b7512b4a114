"""The step ledger: the trainer's exactly-once state in Redis.

Keys (``buffer.keys``):

- ``trainer_steps(run, consumer, rank)``: one hash per rank, field ``N`` = ``{version,
  entries, dropped?}`` (JSON): the groups step ``N`` took, as ``[entry id, group id]`` pairs, the
  version they are judged and trained at, and the entry ids it dropped as too stale. Written
  *before* the step is trained.
- ``trainer_checkpoint(run, consumer)``: the pointer ``{path, step, version}`` to the last
  committed checkpoint.

Invariant: a group is acked iff a committed checkpoint contains its update. ``commit`` acks
every group of the steps a checkpoint covers, sets the pointer and deletes those step records
in ONE Redis transaction (``RedisTrajectoryBuffer.ack`` with the rest queued on its MULTI), so
after a crash the records left are exactly the steps whose updates were lost, and their groups
are still pending (``tests/integration/test_trainer_crash.py``, kill points ``mid_checkpoint`` and
``before_commit``; ``trainer.resume`` replays them).

Every call goes through ``with_retries``: a Redis restart mid-run does not crash the trainer
(``tests/faults/test_component_fixes.py::test_trainer_redis_calls_survive_a_restart``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from buffer import Delivered, RedisTrajectoryBuffer, keys
from buffer.connection import with_retries


@dataclass
class StepBatch:
    """The groups of one step on this rank and the version they are judged and trained at."""

    delivered: list[Delivered]
    version: int
    replay: bool
    """True for a recorded step replayed after a crash."""
    idle_s: float = 0.0
    """Seconds the step waited for these groups."""
    hold_s: float = 0.0
    """Of ``idle_s``, the seconds it waited with a full batch, for groups that would otherwise
    expire (``trainer.data``)."""
    early: list[Delivered] = field(default_factory=list)
    """Pooled groups past eta that the reader dropped (and acked) while it gathered this
    batch: not in the step's record, counted in its metrics."""


@dataclass(frozen=True)
class Covered:
    """What a checkpoint at step ``n`` covers: every recorded step ``<= n`` of every rank."""

    entries: list[str] = field(default_factory=list)
    """Every entry id of those steps, trained or dropped: acked at the commit."""
    groups: list[str] = field(default_factory=list)
    """The ids of the groups trained (not dropped): stored in the checkpoint's state."""
    fields: list[list[str]] = field(default_factory=list)
    """Per rank, the record fields (step numbers) the commit deletes."""


def covered_by(records: list[dict[int, dict[str, Any]]], n: int) -> Covered:
    """``Covered`` of a checkpoint at step ``n`` given every rank's step records."""
    out = Covered()
    for recs in records:
        out.fields.append([str(s) for s in recs if s <= n])
        for s in sorted(recs):
            if s > n:
                continue
            dropped = set(recs[s].get("dropped", []))
            for e, g in recs[s]["entries"]:
                out.entries.append(e)
                if e not in dropped:
                    out.groups.append(g)
    return out


class StepLedger:
    """This rank's view of the ledger (every rank's records are readable, for rank 0's commit)."""

    def __init__(
        self,
        buf: RedisTrajectoryBuffer,
        run: str,
        consumer: str,
        *,
        rank: int,
        world_size: int,
        default_eta: int,
    ) -> None:
        self.buf = buf
        self.redis = buf.redis
        self.rank = rank
        self.default_eta = default_eta
        self.k_ckpt = keys.trainer_checkpoint(run, consumer)
        self.k_steps = [keys.trainer_steps(run, consumer, r) for r in range(world_size)]
        self.k_settings = keys.settings(run)

    async def pointer(self) -> dict[str, str]:
        """The committed checkpoint's ``{path, step, version}``; empty when there is none."""
        raw = await with_retries(lambda: self.redis.hgetall(self.k_ckpt), what="read checkpoint")
        return {_text(k): _text(v) for k, v in raw.items()}

    async def records(self, rank: int) -> dict[int, dict[str, Any]]:
        """Rank ``rank``'s step records, by step number."""
        raw = await with_retries(
            lambda: self.redis.hgetall(self.k_steps[rank]), what="read step records"
        )
        return {int(k): json.loads(v) for k, v in raw.items()}

    async def record(self, n: int, batch: StepBatch, dropped: list[str] | None = None) -> None:
        """Record step ``n`` (again, with its ``dropped`` entry ids, once they are known)."""
        rec: dict[str, Any] = {
            "version": batch.version,
            "entries": [[d.entry_id, d.group.group_id] for d in batch.delivered],
        }
        if dropped is not None:
            rec["dropped"] = dropped
        # Idempotent (same field, same value): safe to retry across a Redis restart.
        await with_retries(
            lambda: self.redis.hset(self.k_steps[self.rank], str(n), json.dumps(rec)),
            what=f"record step {n}",
        )

    async def forget(self, n: int) -> None:
        """Delete the record of step ``n``, which made no update (every group was dropped and
        acked)."""
        await with_retries(
            lambda: self.redis.hdel(self.k_steps[self.rank], str(n)),
            what=f"delete record of step {n}",
        )

    async def eta(self) -> int:
        """The run's staleness limit now (``sluice run set-eta`` may change it mid-run)."""
        v = await with_retries(lambda: self.redis.hget(self.k_settings, "eta"), what="read eta")
        return int(v) if v is not None else self.default_eta

    async def commit(self, covered: Covered, *, path: str, step: int, version: int) -> None:
        """In one transaction: ack ``covered.entries``, point at the checkpoint ``path`` of
        ``step`` and delete the covered step records."""

        def also(pipe: Any) -> None:
            pipe.hset(self.k_ckpt, mapping={"path": path, "step": step, "version": version})
            for k, f in zip(self.k_steps, covered.fields, strict=True):
                if f:
                    pipe.hdel(k, *f)

        await self.buf.ack(covered.entries, also=also)


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x
