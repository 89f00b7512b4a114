"""Data parallel: two gloo ranks on halves of a batch take the same step as one rank on all of
it (trainer/step.py: per-micro-batch losses are scaled by the global denominator)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import make_model

from buffer import keys

HERE = Path(__file__).resolve().parents[1]  # tests/


def _launch(model: Path, out: Path, rank: int, world: int, init: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{HERE.parent}:{HERE}")
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "trainer_ddp_worker.py"),
            str(model),
            str(out),
            str(rank),
            str(world),
            str(init),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(120)
def test_two_gloo_ranks_equal_one_rank(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", seed=4)
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}.safetensors"
        procs = [_launch(model, out, r, world, tmp_path / f"init{world}") for r in range(world)]
        for p in procs:
            _, err = p.communicate(timeout=100)
            assert p.returncode == 0, err[-3000:]
        runs[world] = (load_file(str(out)), float((tmp_path / f"{out.name}.loss").read_text()))
    (one, loss1), (two, loss2) = runs[1], runs[2]
    before = load_file(str(model / "model.safetensors"))
    assert loss1 == pytest.approx(loss2, abs=1e-6)
    moved = 0.0
    for k, v in one.items():
        torch.testing.assert_close(two[k] - before[k], v - before[k], rtol=1e-4, atol=1e-5)
        moved = max(moved, float((v - before[k]).abs().max()))
    assert moved > 1e-2


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_two_ranks_matches_one_process(redis_url: str, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m sluice train`` (gloo) on the same groups as a plain
    ``sluice train``: every group acked, and the final checkpoints hold the same weights."""
    import asyncio

    import numpy as np
    from trainer_helpers import base_config, make_group, put_groups, run_train, write_config

    from buffer import RedisTrajectoryBuffer, connect

    model = make_model(tmp_path / "model")
    finals = {}
    for name, cmd in (("single", None), ("ddp", "torchrun")):
        rng = np.random.default_rng(3)
        put_groups(redis_url, name, [make_group(rng, name) for _ in range(8)])
        conf = base_config(tmp_path, redis_url, name, model, max_steps=4)
        cfg = write_config(tmp_path / f"{name}.yaml", **conf)
        if cmd is None:
            p = run_train(cfg)
        else:
            p = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc-per-node",
                    "2",
                    "-m",
                    "sluice",
                    "train",
                    "--config",
                    str(cfg),
                ],
                capture_output=True,
                text=True,
                timeout=150,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                cwd=HERE.parent,
            )
        assert p.returncode == 0, p.stderr[-3000:]

        async def state(run: str = name) -> tuple[bytes, int]:
            r = await connect(redis_url)
            try:
                ptr = await r.hgetall(keys.trainer_checkpoint(run, "trainer-0"))
                stats = await RedisTrajectoryBuffer(r, run, "probe").stats()
                return ptr[b"path"], stats.length + stats.pending
            finally:
                await r.aclose()

        path, left = asyncio.run(state())
        assert left == 0
        finals[name] = load_file(str(Path(path.decode()) / "model" / "model.safetensors"))
    for k, v in finals["single"].items():
        torch.testing.assert_close(finals["ddp"][k], v, rtol=1e-4, atol=1e-5)
