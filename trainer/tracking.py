"""Experiment tracking: the run's metrics to TensorBoard and Weights & Biases, beside
``RUN_DIR/metrics.jsonl`` (always written: the report reads it).

``trainer.trackers`` picks the sinks: ``jsonl`` (metrics.jsonl, the default and always on),
``tensorboard`` (event files in ``RUN_DIR/tensorboard``) and ``wandb`` (a W&B run in
``RUN_DIR/wandb``, ``trainer.wandb_mode: offline`` by default: nothing leaves the machine;
``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later). Both are named after the run
(``run.name``). Rank 0 is the one writer, so one run holds everything:

- ``trainer/<field>``: every numeric field of the step's row (reward, loss, staleness, drops,
  filtered groups, importance weights, timing), at the step's number;
- ``rollout/<field>``: the workers' counters summed over the run's workers, read from their
  metrics hashes in Redis at each step (groups pushed and rejected, ``rejected_by/<reason>``
  such as ``zero_variance`` or ``reward_error``, tokens, weight updates);
- ``eval/<field>``: each held-out eval as the trainer copies it, at its policy version.

A sink that fails while logging is reported once and switched off: tracking never stops
training. One that cannot start (its package missing: ``pip install 'sluice[tracking]'``)
stops the trainer at start-up with that line. Tests: tests/unit/trainer/test_trainer_tracking.py
(a TensorBoard event file holds the run's scalars; a W&B offline run directory holds them).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis

from buffer import keys
from trainer.config import TrainerError

log = logging.getLogger("sluice.trainer")

WORKER_SUMS = (
    "groups_pushed",
    "groups_rejected",
    "filtered_groups",
    "samples",
    "tokens_out",
    "tokens_per_s",
    "interrupted_samples",
    "reprefill_tokens",
    "updates",
    "doomed_groups",
    "inflight_groups",
)
"""Worker metrics summed over the run's workers (``rollout/<name>``)."""


def scalars(row: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numeric fields of ``row`` as ``{prefix/name: value}`` (booleans, strings,
    lists and None left out; a dict of numbers becomes ``prefix/name/key``)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, int | float) and math.isfinite(v):
            out[f"{prefix}/{k}"] = float(v)
        elif isinstance(v, dict):
            out.update(scalars(v, f"{prefix}/{k}"))
    return out


def worker_totals(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """``WORKER_SUMS`` and ``rejected_by`` summed over workers' metrics, plus ``workers``."""
    out: dict[str, float] = {"workers": float(len(metrics))}
    for m in metrics:
        for k in WORKER_SUMS:
            v = m.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0.0) + float(v)
        for reason, n in (m.get("rejected_by") or {}).items():
            key = f"rejected_by/{reason}"
            out[key] = out.get(key, 0.0) + float(n)
    return out


async def read_worker_metrics(client: aioredis.Redis, run: str) -> list[dict[str, Any]]:
    """Every worker's metrics hash of ``run`` (JSON fields decoded)."""
    out = []
    async for k in client.scan_iter(match=keys.worker_metrics_glob(run), count=100):
        raw = await client.hgetall(k)
        m: dict[str, Any] = {}
        for f, v in raw.items():
            name = f.decode() if isinstance(f, bytes) else str(f)
            text = v.decode() if isinstance(v, bytes) else str(v)
            try:
                m[name] = json.loads(text)
            except ValueError:
                m[name] = text
        out.append(m)
    return out


class Sink(Protocol):
    name: str

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, log_dir: Path, run_name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrainerError(
                f"trainer.trackers: tensorboard needs the tensorboard package ({e}): "
                "pip install 'sluice[tracking]'"
            ) from None
        self.dir = log_dir / run_name
        self.writer = SummaryWriter(log_dir=str(self.dir))

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    name = "wandb"

    def __init__(
        self,
        directory: Path,
        run_name: str,
        *,
        project: str,
        mode: str,
        entity: str | None,
        config: dict[str, Any],
    ) -> None:
        import os

        try:
            import wandb
        except ImportError as e:
            raise TrainerError(
                f"trainer.trackers: wandb needs the wandb package ({e}): "
                "pip install 'sluice[tracking]'"
            ) from None
        os.environ.setdefault("WANDB_SILENT", "true")
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=run_name,
            dir=str(directory),
            mode=mode,  # type: ignore[arg-type]
            config=config,
            resume="allow",
            id=_wandb_id(run_name),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_name: str) -> str:
    """A W&B run id from the run name (a restarted trainer resumes the same W&B run)."""
    import hashlib

    return "sluice-" + hashlib.sha1(run_name.encode(), usedforsecurity=False).hexdigest()[:12]


class Trackers:
    """The run's sinks besides metrics.jsonl (rank 0 only; an empty list on other ranks)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.last_step = -1

    @classmethod
    def open(
        cls,
        names: list[str],
        run_dir: Path,
        run_name: str,
        *,
        wandb_project: str = "sluice",
        wandb_mode: str = "offline",
        wandb_entity: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> Trackers:
        sinks: list[Sink] = []
        for n in dict.fromkeys(names):
            if n == "tensorboard":
                sinks.append(TensorBoardSink(run_dir / "tensorboard", run_name))
            elif n == "wandb":
                sinks.append(
                    WandbSink(
                        run_dir,
                        run_name,
                        project=wandb_project,
                        mode=wandb_mode,
                        entity=wandb_entity,
                        config=config or {},
                    )
                )
        return cls(sinks)

    def log(self, values: dict[str, float], step: int) -> None:
        """``values`` at ``step`` to every sink; a failing sink is dropped with one warning."""
        for s in list(self.sinks):
            try:
                s.log(values, step)
            except Exception as e:  # tracking must never stop training
                log.warning("tracker %s failed (%s); switched off for this run", s.name, e)
                self.sinks.remove(s)

    def log_step(self, row: Mapping[str, Any], workers: list[dict[str, Any]]) -> None:
        """One step's row and the workers' totals (see the module docstring)."""
        if not self.sinks:
            return
        values = scalars(row, "trainer")
        values.update(scalars(worker_totals(workers), "rollout"))
        step = int(row["step"])
        self.last_step = max(self.last_step, step)
        self.log(values, step)

    def log_eval(self, event: Mapping[str, Any]) -> None:
        """One eval event, at the trainer step that copied it."""
        if not self.sinks:
            return
        step = int(event.get("trainer_step", self.last_step))
        self.log(scalars(event, "eval"), max(step, 0))

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:
                log.warning("tracker %s did not close cleanly (%s)", s.name, e)
        self.sinks = []
