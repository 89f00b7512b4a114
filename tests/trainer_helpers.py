"""Helpers for the trainer tests: synthetic groups, run configs, ``sluice train`` processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from buffer import RedisTrajectoryBuffer, Sample, TrajectoryGroup

VOCAB = 32
TINY = dict(vocab=VOCAB, layers=2, hidden=32, heads=2)


def make_model(directory: Path, seed: int = 0) -> Path:
    from inference.models import init_tiny_model

    return init_tiny_model(directory, seed=seed, init_std=0.2, **TINY)  # type: ignore[arg-type]


def make_group(
    rng: np.random.Generator,
    run: str,
    *,
    n: int = 4,
    prompt_len: int = 3,
    max_out: int = 5,
    version: int = 0,
    group_id: str | None = None,
) -> TrajectoryGroup:
    """A group of ``n`` random samples; behaviour log-probs near log(1/V), rewards in [0, 1]."""
    samples = []
    for i in range(n):
        t = int(rng.integers(1, max_out + 1))
        samples.append(
            Sample(
                output_ids=rng.integers(3, VOCAB, size=t).astype(np.int32),
                behaviour_logp=(np.log(1 / VOCAB) + 0.1 * rng.standard_normal(t)).astype(
                    np.float32
                ),
                token_versions=np.full(t, version, dtype=np.int32),
                reward=float(rng.random()),
                finish_reason="stop",
                index=i,
            )
        )
    kw: dict[str, Any] = {"group_id": group_id} if group_id else {}
    return TrajectoryGroup(
        run_id=run,
        prompt_id=f"p{int(rng.integers(1_000_000))}",
        prompt_ids=rng.integers(3, VOCAB, size=prompt_len).astype(np.int32),
        samples=samples,
        worker_id="synthetic",
        admission_version=version,
        **kw,
    )


def put_groups(url: str, run: str, groups: list[TrajectoryGroup]) -> None:
    async def go() -> None:
        buf = await RedisTrajectoryBuffer.open(url, run, "producer")
        try:
            for g in groups:
                await buf.put(g)
        finally:
            await buf.close()

    asyncio.run(go())


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def base_config(
    tmp: Path, url: str, run: str, model: Path, **trainer: Any
) -> dict[str, dict[str, Any]]:
    tc: dict[str, Any] = {
        "lr": 1e-2,
        "max_steps": 6,
        "publish_every": 1,
        "checkpoint_every": 2,
        "keep_checkpoints": 100,
        "keep_weights": 100,
        "threads": 1,
        "is_mode": "truncate",
        "micro_batch_tokens": 32,
        "reclaim_idle_ms": 60_000,
    }
    tc.update(trainer)
    return {
        "redis": {"url": url},
        "run": {"name": run, "dir": str(tmp / run), "seed": 0},
        "staleness": {"eta": 100, "batch_groups": 2},
        "model": {"path": str(model)},
        "rollout": {"temperature": 1.0},
        "trainer": tc,
    }


def run_train(
    config: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "sluice", "train", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=Path(__file__).resolve().parent.parent,
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
