"""Per-step metrics: one JSON object per step in ``RUN_DIR/metrics.jsonl`` and one log line,
written by rank 0 (``docs/trainer.md`` lists the fields).

Staleness is reported two ways, kept apart:

- ``staleness_hist`` / ``staleness_max``: over every group the step *read* (this rank's share
  summed over ranks), dropped ones included, bucketed ``-1`` (a token newer than the
  trainer: a bug), ``0`` ... ``31``, ``32+``;
- ``staleness_max_trained``: the largest ``group_staleness`` over the groups that went into
  the optimizer step (after the drops), over all ranks; null when no group did. It can only
  exceed ``eta`` if the drop rule failed (``tests/integration/test_trainer.py::
  test_stale_groups_are_dropped_counted_and_never_trained``,
  ``tests/unit/trainer/test_trainer_metrics.py``).

Non-finite floats (e.g. ``logp_abs_diff`` with no current-version token) are written as null.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from buffer import Delivered
from staleness.gate import group_staleness
from trainer.ledger import StepBatch
from trainer.step import StepStats

log = logging.getLogger("sluice.trainer")
R = TypeVar("R")

HIST = 34
"""Staleness histogram buckets: -1 (bug), 0..31, 32+."""


def hist_bucket(staleness: int) -> int:
    """Index of ``staleness`` in the histogram (``-1`` and below -> 0, ``32+`` -> 33)."""
    return min(max(staleness, -1), HIST - 2) + 1


def hist_labels(counts: Iterable[float]) -> dict[str, int]:
    """The non-empty buckets of a histogram as ``{label: count}``."""
    out = {}
    for i, c in enumerate(counts):
        if c:
            label = "-1" if i == 0 else (f"{HIST - 2}+" if i == HIST - 1 else str(i - 1))
            out[label] = int(c)
    return out


def trained_staleness_max(version: int, trained: Iterable[Delivered]) -> int | None:
    """The largest ``group_staleness`` at ``version`` over the groups ``trained``; None if
    there are none."""
    return max((group_staleness(version, d.group) for d in trained), default=None)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


class RedisClock:
    """Seconds in buffer/gate Redis calls since the last metrics row, the blocking read
    excluded (that is ``idle_s``): step records, eta, drop, ack, publish, reap."""

    def __init__(self) -> None:
        self.seconds = 0.0

    async def __call__(self, call: Awaitable[R], /) -> R:
        """Await one buffer/gate call, counting its time."""
        t = time.monotonic()
        try:
            return await call
        finally:
            self.seconds += time.monotonic() - t

    def take(self) -> float:
        """The seconds counted since the last ``take``."""
        s, self.seconds = self.seconds, 0.0
        return s


@dataclass(frozen=True)
class StepCounts:
    """One step's counts over every rank."""

    groups: int
    """Groups read (trained + dropped)."""
    dropped: int
    idle_s: float
    hist: list[float]
    """Staleness histogram of the groups read (``HIST`` buckets)."""
    staleness_max_trained: int | None


@dataclass(frozen=True)
class StepRecord:
    """What the loop knows of a finished step besides the training statistics."""

    step: int
    version: int
    dropped_total: int
    batch: StepBatch
    kept: list[Delivered]
    dropped: list[str]
    """Entry ids dropped on this rank."""
    step_s: float
    wall_s: float


def step_row(
    rec: StepRecord, stats: StepStats, counts: StepCounts, buffer_s: float
) -> dict[str, Any]:
    """The ``metrics.jsonl`` object of one step."""
    dropped_set = set(rec.dropped)
    smax = max((i - 1 for i, c in enumerate(counts.hist) if c), default=0)
    m = stats.metrics
    return {
        "step": rec.step,
        "version": rec.version,
        "replay": rec.batch.replay,
        "reward_mean": m["reward_mean"],
        "reward_std": m["reward_std"],
        "staleness_hist": hist_labels(counts.hist),
        "staleness_max": smax,
        "staleness_max_trained": counts.staleness_max_trained,
        "dropped": counts.dropped,
        "dropped_total": rec.dropped_total,
        "groups": counts.groups,
        # This rank's trained and dropped group ids: a replayed step repeats its row with
        # the same ids; across step numbers a group id appears once (tests/faults).
        "group_ids": [d.group.group_id for d in rec.kept],
        "dropped_group_ids": [
            d.group.group_id for d in rec.batch.delivered if d.entry_id in dropped_set
        ],
        "samples": stats.samples,
        "tokens": stats.tokens,
        "loss": stats.loss,
        "grad_norm": stats.grad_norm,
        "lr": stats.lr,
        "w_mean": m["w_mean"],
        "w_max": m["w_max"],
        "w_frac_masked": m["w_frac_masked"],
        "w_frac_truncated": m["w_frac_truncated"],
        "clip_frac": m["clip_frac"],
        "approx_kl": m["approx_kl"],
        "logp_abs_diff": m["logp_abs_diff"],
        "logp_k3_kl": m["logp_k3_kl"],
        "logp_gap_tokens": int(m["logp_gap_tokens"]),
        "tokens_per_s": stats.tokens / max(rec.step_s, 1e-9),
        "idle_s": counts.idle_s,
        "buffer_s": buffer_s,
        "step_s": rec.step_s,
        "wall_s": rec.wall_s,
        "time": time.time(),
    }


def write_step(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to ``metrics.jsonl`` and log the step's line."""
    with path.open("a") as f:
        f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
    log.info(
        "step %d v%d reward %.3f±%.3f loss %.4f stale max %d dropped %d groups %d "
        "tok/s %.0f idle %.2fs step %.2fs%s",
        row["step"],
        row["version"],
        row["reward_mean"],
        row["reward_std"],
        row["loss"],
        row["staleness_max"],
        row["dropped"],
        row["groups"],
        row["tokens_per_s"],
        row["idle_s"],
        row["step_s"],
        " (replay)" if row["replay"] else "",
    )
