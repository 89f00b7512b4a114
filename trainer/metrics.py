"""Per-step metrics: one JSON object per step in ``RUN_DIR/metrics.jsonl`` and one log line
(``step 12/200 ...``), written by rank 0 (``docs/trainer.md`` lists the fields); the latest
step's summary in the run's Redis (``keys.trainer_progress``, read by ``sluice status``); and
the held-out eval results the workers record (``keys.eval_results``) appended to
``metrics.jsonl`` as ``{"event": "eval", ...}`` lines once each (``RunRecords``).

A line of ``metrics.jsonl`` is a step row (it has ``step``) or an event (it has ``event`` and
no ``step``); readers that want steps skip events (``is_step_row``).

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
import os
import socket
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from buffer import Delivered, keys
from buffer.connection import with_retries
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
    """Staleness histogram of the groups the step took, trained and dropped (``HIST`` buckets)."""
    staleness_max_trained: int | None
    arrived_hist: list[float] = field(default_factory=lambda: [0.0] * HIST)
    """Staleness histogram of the groups read from the stream during the step, at the version
    they were read at."""
    trained_hist: list[float] = field(default_factory=lambda: [0.0] * HIST)
    """Staleness histogram of the groups that went into the optimizer step."""
    dead_lettered: int = 0
    dropped_tokens: int = 0
    dropped_future: int = 0
    hold_s: float = 0.0
    eta: int | None = None
    """The eta the step was judged at."""
    waste: Any = None
    """The run's ``staleness.version_manager.Waste`` after the step (rank 0), or None."""


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
    max_steps: int | None = None
    """The step this trainer stops at (None: unbounded)."""


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak TFLOP/s by GPU name (the vendors' datasheets), for the MFU."""


def device_peak_flops(device: Any, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: ``override_tflops`` when given, else a known GPU
    by name, else None (the CPU: no MFU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


@dataclass
class Phases:
    """Where one step's time went besides waiting for data (``idle_s``) and Redis
    (``buffer_s``), and what the model computed."""

    train_s: float = 0.0
    """``train_step``: proximal forward, forward/backward of every micro-batch, optimizer."""
    publish_s: float = 0.0
    publish_bytes: int | None = None
    """Bytes the step's weight update moved (None: no publication in the step)."""
    checkpoint_s: float = 0.0
    """Checkpoints written since the previous row (a step's checkpoint follows its row)."""
    seq_tokens: int = 0
    """Positions the model read (prompt + output of every trained sample)."""


def perf_fields(
    phases: Phases, out_tokens: int, params: int, peak_flops: float | None
) -> dict[str, Any]:
    """The row's timing fields: phases, trained tokens/s of the train step alone and its MFU
    (``6 · params · seq_tokens / train_s`` over the peak; attention FLOPs not counted)."""
    train_s = max(phases.train_s, 1e-9)
    mfu = 6 * params * phases.seq_tokens / train_s / peak_flops if peak_flops else None
    return {
        "train_s": phases.train_s,
        "publish_s": phases.publish_s,
        "weight_update_bytes": phases.publish_bytes,
        "checkpoint_s": phases.checkpoint_s,
        "seq_tokens": phases.seq_tokens,
        "train_tokens_per_s": out_tokens / train_s,
        "mfu": mfu,
    }


def steps_text(step: int, max_steps: int | None) -> str:
    """``12/200``, or ``12/∞`` when there is no step limit."""
    return f"{step}/{max_steps if max_steps is not None else '∞'}"


def is_step_row(row: dict[str, Any]) -> bool:
    """A step's row of ``metrics.jsonl`` (not an event line such as an eval result)."""
    return "event" not in row and "step" in row


def filtered_fields(
    delta: tuple[float, float, float], reward_mean: float, samples: int
) -> dict[str, Any]:
    """The row's dynamic-sampling fields from ``delta`` = (groups, samples, reward sum) the
    workers filtered since the previous row: ``filtered_groups``, and ``reward_mean_all``, the
    mean reward over the samples trained *and* filtered (the trained mean alone is biased
    down once all-correct groups are dropped; this is the policy's reward, what
    ``reward_target`` and the report read). E.g. 32 trained samples of mean 0.5 and 16
    filtered ones summing to 16: (16 + 16) / 48 = 0.667."""
    groups, f_samples, f_sum = delta
    total = samples + f_samples
    mean_all = (reward_mean * samples + f_sum) / total if f_samples > 0 else reward_mean
    return {"filtered_groups": int(groups), "reward_mean_all": mean_all}


def step_row(
    rec: StepRecord,
    stats: StepStats,
    counts: StepCounts,
    buffer_s: float,
    perf: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metrics.jsonl`` object of one step."""
    dropped_set = set(rec.dropped)
    smax = max((i - 1 for i, c in enumerate(counts.hist) if c), default=0)
    m = stats.metrics
    return {
        "step": rec.step,
        "max_steps": rec.max_steps,
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
        **staleness_fields(counts),
        # This rank's trained and dropped group ids: a replayed step repeats its row with
        # the same ids; across step numbers a group id appears once (tests/faults).
        "group_ids": [d.group.group_id for d in rec.kept],
        "dropped_group_ids": [
            d.group.group_id
            for d in [*rec.batch.early, *rec.batch.delivered]
            if d.entry_id in dropped_set
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
        # The policy's mean entropy on the trained tokens (computed with an entropy bonus).
        **({"entropy": m["entropy"]} if "entropy" in m else {}),
        "tokens_per_s": stats.tokens / max(rec.step_s, 1e-9),
        "idle_s": counts.idle_s,
        "buffer_s": buffer_s,
        "step_s": rec.step_s,
        "wall_s": rec.wall_s,
        **(perf or {}),
        "time": time.time(),
    }


def _hist_mean(hist: list[float]) -> float | None:
    n = sum(hist)
    return sum((i - 1) * c for i, c in enumerate(hist)) / n if n else None


def _hist_max(hist: list[float]) -> int | None:
    return max((i - 1 for i, c in enumerate(hist) if c), default=None)


def staleness_fields(counts: StepCounts) -> dict[str, Any]:
    """The row's staleness and waste accounting (docs/trainer.md lists them): the eta the step
    was judged at; staleness of the trained groups and of the arrivals apart; this step's drops
    by cause; the seconds it held for expiring groups; and, from the run's books after the step,
    the groups handed back by cause and the generated and wasted tokens."""
    out: dict[str, Any] = {
        "eta": counts.eta,
        "staleness_hist_trained": hist_labels(counts.trained_hist),
        "staleness_mean_trained": _hist_mean(counts.trained_hist),
        "arrived": int(sum(counts.arrived_hist)),
        "staleness_hist_arrived": hist_labels(counts.arrived_hist),
        "staleness_max_arrived": _hist_max(counts.arrived_hist),
        "dropped_stale": counts.dropped - counts.dropped_future,
        "dropped_future": counts.dropped_future,
        "dead_lettered": counts.dead_lettered,
        "dropped_tokens": counts.dropped_tokens,
        "hold_s": counts.hold_s,
    }
    w = counts.waste
    if w is not None:
        gen = w.generated_tokens
        out.update(
            {
                "cancelled_total": w.groups.get("cancelled_stale", 0),
                "dropped_stale_total": w.groups.get("stale", 0),
                "dead_letter_total": w.groups.get("dead_letter", 0),
                "generated_tokens": gen,
                "wasted_tokens": w.wasted_tokens,
                "wasted_tokens_by": w.wasted_by(),
                "waste_share": w.wasted_tokens / gen if gen else 0.0,
            }
        )
    return out


def write_step(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to ``metrics.jsonl`` and log the step's line."""
    with path.open("a") as f:
        f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
    log.info(
        "step %s v%d reward %.3f±%.3f loss %.4f stale trained max %s (eta %s) arrived max %s "
        "dropped %d groups %d tok/s %.0f idle %.2fs step %.2fs%s",
        steps_text(row["step"], row.get("max_steps")),
        row["version"],
        row["reward_mean"],
        row["reward_std"],
        row["loss"],
        row.get("staleness_max_trained"),
        row.get("eta"),
        row["staleness_max"],
        row["dropped"],
        row["groups"],
        row["tokens_per_s"],
        row["idle_s"],
        row["step_s"],
        " (replay)" if row["replay"] else "",
    )


def write_event(path: Path, event: dict[str, Any]) -> None:
    """Append one event line (``{"event": ..., ...}``, no ``step`` key) to ``metrics.jsonl``."""
    if "event" not in event or "step" in event:
        raise ValueError(f"an event line has an 'event' and no 'step' key: {event}")
    with path.open("a") as f:
        f.write(json.dumps(_clean(event), allow_nan=False) + "\n")


def logged_eval_versions(path: Path) -> set[int]:
    """The versions whose eval event ``metrics.jsonl`` already holds (a resumed trainer does
    not append them again)."""
    out: set[int] = set()
    if not path.is_file():
        return out
    with path.open(errors="replace") as f:
        for line in f:
            if '"event"' not in line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("event") == "eval":
                v = obj.get("version")
                if isinstance(v, int):
                    out.add(v)
    return out


PROGRESS_TTL_S = 7 * 24 * 3600
"""A trainer's progress record outlives its last write by this much (as worker metrics do)."""


def progress_record(
    state: str, step: int, max_steps: int | None, version: int, row: dict[str, Any] | None
) -> dict[str, Any]:
    """The trainer's summary for ``sluice status``: ``state`` (``running``, ``finished``,
    ``stopped``), step, max_steps, version, and from the last step row (None before the first
    step of this process): reward mean/std, loss, tokens/s, groups, dropped total, step and
    idle seconds; ``time`` (unix) of the write, ``pid`` and ``host``."""
    r = row or {}
    rec: dict[str, Any] = _clean(
        {
            "state": state,
            "step": step,
            "max_steps": max_steps,
            "version": version,
            "reward_mean": r.get("reward_mean"),
            "reward_std": r.get("reward_std"),
            "loss": r.get("loss"),
            "tokens_per_s": r.get("tokens_per_s"),
            "groups": r.get("groups"),
            "dropped_total": r.get("dropped_total"),
            "eta": r.get("eta"),
            "staleness_max_trained": r.get("staleness_max_trained"),
            "cancelled_total": r.get("cancelled_total"),
            "waste_share": r.get("waste_share"),
            "wasted_tokens": r.get("wasted_tokens"),
            "generated_tokens": r.get("generated_tokens"),
            "hold_s": r.get("hold_s"),
            "step_s": r.get("step_s"),
            "idle_s": r.get("idle_s"),
            "step_time": r.get("time"),
            "time": time.time(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
    )
    return rec


class RunRecords:
    """Rank 0's records in the run's Redis: its progress (``keys.trainer_progress``) and the
    eval results to copy into ``metrics.jsonl`` (``keys.eval_results``, written by workers)."""

    def __init__(
        self, client: aioredis.Redis, run: str, consumer: str, logged: Iterable[int] = ()
    ) -> None:
        self.redis = client
        self.k_progress = keys.trainer_progress(run, consumer)
        self.k_eval = keys.eval_results(run)
        self.k_filtered = keys.filtered(run)
        self.run = run
        self.seen: set[int] = set(logged)
        """Eval versions already in ``metrics.jsonl``."""

    async def write_progress(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, allow_nan=False)
        await with_retries(
            lambda: self.redis.set(self.k_progress, text, ex=PROGRESS_TTL_S),
            what="write trainer progress",
        )

    async def filtered_totals(self) -> tuple[float, float, float]:
        """The run's running totals of groups the workers dropped for zero reward variance
        (``keys.filtered``): ``(groups, samples, reward_sum)``."""
        raw: dict[Any, Any] = await with_retries(
            lambda: self.redis.hgetall(self.k_filtered), what="read filtered totals"
        )
        get = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
        return get.get("groups", 0.0), get.get("samples", 0.0), get.get("reward_sum", 0.0)

    async def worker_metrics(self) -> list[dict[str, Any]]:
        """Every worker's metrics hash of the run (``trainer.tracking`` sums them)."""
        from trainer.tracking import read_worker_metrics

        return await with_retries(
            lambda: read_worker_metrics(self.redis, self.run), what="read worker metrics"
        )

    async def new_evals(self) -> list[dict[str, Any]]:
        """The eval records of versions not seen before, by version (each returned once)."""
        fields: list[Any] = await with_retries(
            lambda: self.redis.hkeys(self.k_eval), what="read eval versions"
        )
        versions = sorted(
            v for v in (_int(f) for f in fields) if v is not None and v not in self.seen
        )
        if not versions:
            return []
        raws: list[Any] = await with_retries(
            lambda: self.redis.hmget(self.k_eval, [str(v) for v in versions]),
            what="read eval results",
        )
        out = []
        for v, raw in zip(versions, raws, strict=True):
            self.seen.add(v)
            try:
                rec = json.loads(raw) if raw is not None else None
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                log.warning("eval record of v%d is not a JSON object; skipped", v)
                continue
            out.append(rec)
        return out


def eval_event(record: dict[str, Any], trainer_step: int) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of one eval record: ``event: "eval"``, the record's fields
    (``version``, ``greedy_reward``, ``sampled_reward``, ``prompts``, ``temperature``,
    ``worker``, ``time``, ...) and ``trainer_step``, the trainer's step when it copied it."""
    event = {k: v for k, v in record.items() if k not in ("event", "step")}
    return {"event": "eval", **event, "trainer_step": trainer_step}


def _int(x: Any) -> int | None:
    try:
        return int(x.decode() if isinstance(x, bytes) else x)
    except (TypeError, ValueError):
        return None
