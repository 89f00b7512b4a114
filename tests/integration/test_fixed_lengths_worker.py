"""long-tail ``fixed_lengths`` through a real worker and a real CPU server: every sample ends at
exactly the length the task drew for it (EOS ignored), also when a weight update interrupts it
mid-generation and the worker resubmits it with the rest of its budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cpu_server_fixture import cpu_server_factory, make_model  # noqa: F401

from buffer.redis_buffer import RedisTrajectoryBuffer
from buffer.schema import TrajectoryGroup
from inference.launch import ServerHandle
from rollout_workers.pool import make_servers
from rollout_workers.tasks import get_task
from sluice.commands.rollout import open_worker
from sluice.config import load_config
from staleness.version_manager import VersionManager

OPTIONS = {"median": 300, "sigma": 0.3, "min_len": 150, "max_len": 500, "fixed_lengths": True}


@pytest.mark.timeout(120)
async def test_fixed_lengths_survive_a_weight_update(
    redis_url: str,
    run_name: str,
    tmp_path: Path,
    cpu_server_factory: Callable[..., ServerHandle],  # noqa: F811
) -> None:
    v0, v1 = make_model(tmp_path / "v0", seed=1), make_model(tmp_path / "v1", seed=2)
    srv = cpu_server_factory(v0)
    cfg = load_config(
        None,
        [
            f"redis.url={redis_url}",
            f"run.name={run_name}",
            f"model.path={v0}",
            "task.name=long-tail",
            *(f"task.options.{k}={str(v).lower()}" for k, v in OPTIONS.items()),
            "staleness.eta=100",
            "staleness.batch_groups=2",
            "rollout.n_samples=3",
            "rollout.max_inflight_groups=2",
            "rollout.temperature=1.0",
            "rollout.health_interval_s=0.3",
        ],
    )
    worker = await open_worker(cfg, make_servers([srv.url]), worker_id="w-fix", max_groups=2)
    run = asyncio.create_task(worker.run())
    t0 = time.monotonic()
    while worker.inflight_requests() < 6:
        assert not run.done() and time.monotonic() - t0 < 20
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # some tokens into every sample (>= 151 of them)
    async with await VersionManager.open(redis_url, run_name) as vm:
        await vm.publish_weights(1, str(v1), "safetensors")
    assert await asyncio.wait_for(run, 90) == 2

    groups: list[TrajectoryGroup] = []
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="t") as buf:
        while len(groups) < 2:
            groups += [d.group for d in await buf.get_batch(2 - len(groups), block_ms=1000)]
    task = get_task("long-tail", **OPTIONS)
    by_id = {p.id: p for p in task.prompts("train")}
    spanning = 0
    for g in groups:
        p = by_id[g.prompt_id]
        for s in g.samples:
            want = task.output_length(p, s.index)
            assert want is not None and 151 <= want <= 501
            assert s.num_tokens == want, (g.prompt_id, s.index, s.num_tokens, want)
            assert len(s.behaviour_logp) == len(s.token_versions) == want
            assert s.finish_reason == "length"
            assert s.reward == task.reward(p, s.output_ids.tolist())
            v = s.token_versions
            assert np.all(np.diff(v) >= 0)
            spanning += int(v[0] == 0 and v[-1] == 1)
    assert len({s.num_tokens for g in groups for s in g.samples}) > 1  # lengths differ
    assert spanning >= 1 and worker.counters.interrupted_samples >= 1
