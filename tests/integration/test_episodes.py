"""Agentic episodes (``rollout.episode``) through a real worker, CPU server and Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import episode_fns
import numpy as np
import pytest
from test_rollout_worker import (  # noqa: F401
    config,
    gate,
    models,
    read_groups,
    recompute_logprobs,
    server,
)

from inference.launch import ServerHandle
from rollout_workers.pool import make_servers
from sluice.commands.rollout import open_worker
from staleness.version_manager import VersionManager


@pytest.mark.timeout(120)
async def test_episode_turns_spanning_a_weight_update(
    redis_url: str,
    run_name: str,
    models: tuple[Path, Path],  # noqa: F811
    server: ServerHandle,  # noqa: F811
) -> None:
    """Two turns of 150 tokens around three appended ids; the episodes wait between their
    turns until v1 is published and loaded, so the first turn is sampled on v0 and the second
    on v1. Every sampled token's log-prob matches a recomputation under the version it is
    labelled with; the trained ids are exactly the sampled and appended ids; appended tokens
    are masked out, with log-prob 0 and the last sampled token's version."""
    episode_fns.SEEN.clear()
    episode_fns.WAITING.clear()
    episode_fns.BETWEEN = asyncio.Event()
    cfg = config(
        redis_url,
        run_name,
        models[0],
        episode="episode_fns:two_turns",
        max_new_tokens=150,
        ignore_eos="true",
        n_samples=2,
        max_inflight_groups=1,
    )
    worker = await open_worker(cfg, make_servers([server.url]), worker_id="w-ep", max_groups=1)
    run = asyncio.create_task(worker.run())
    try:
        t0 = time.monotonic()
        while len(episode_fns.WAITING) < 2:
            assert not run.done() and time.monotonic() - t0 < 40
            await asyncio.sleep(0.02)
        async with await VersionManager.open(redis_url, run_name) as vm:
            await vm.publish_weights(1, str(models[1]), "safetensors")
        while worker.version < 1 or any(s.version != 1 for s in worker.pool.live()):
            assert not run.done() and time.monotonic() - t0 < 60
            await asyncio.sleep(0.02)
        episode_fns.BETWEEN.set()
        assert await asyncio.wait_for(run, 60) == 1
    finally:
        episode_fns.BETWEEN = None
    (g,) = await read_groups(redis_url, run_name, 1)
    assert len(episode_fns.SEEN) == 2 and g.n == 2
    prompt = g.prompt_ids.tolist()
    for s in g.samples:
        seen = next(e for e in episode_fns.SEEN if e["first"] == s.output_ids[:150].tolist())
        ids = seen["first"] + seen["appended"] + seen["second"]
        assert s.output_ids.tolist() == ids  # trained ids == sampled + appended, in order
        assert s.loss_mask.tolist() == [1] * 150 + [0] * 3 + [1] * 150
        assert s.turn_starts.tolist() == [0, 153] and s.num_turns == 2
        v, m = s.token_versions, s.loss_mask.astype(bool)
        assert v[m].tolist() == seen["versions"] == [0] * 150 + [1] * 150
        assert v[~m].tolist() == [0] * 3  # the last sampled token's version
        assert s.behaviour_logp[~m].tolist() == [0.0] * 3
        out = s.output_ids.tolist()
        expected = np.where(
            v == 0,
            recompute_logprobs(models[0], prompt, out, 0.8),
            recompute_logprobs(models[1], prompt, out, 0.8),
        )
        np.testing.assert_allclose(s.behaviour_logp[m], expected[m], rtol=0, atol=1e-4)


@pytest.mark.timeout(90)
async def test_crashing_and_hanging_episodes_hand_their_slots_back(
    redis_url: str,
    run_name: str,
    models: tuple[Path, Path],  # noqa: F811
    server: ServerHandle,  # noqa: F811
) -> None:
    """Episodes that raise or outlive episode_timeout_s reject their group (counted by
    reason, the tokens they sampled as waste); the worker keeps admitting and pushes the good
    ones; no slot stays held."""
    cfg = config(
        redis_url,
        run_name,
        models[0],
        episode="episode_fns:misbehaving",
        episode_timeout_s=1.0,
        n_samples=2,
        max_inflight_groups=4,
    )
    worker = await open_worker(cfg, make_servers([server.url]), worker_id="w-bad", max_groups=3)
    assert await asyncio.wait_for(worker.run(), 60) == 3
    by = worker.counters.rejected_by
    assert by.get("episode_error", 0) >= 1 and by.get("episode_timeout", 0) >= 1
    # The crashed episodes' sampled tokens count as waste (the worker's and the run's).
    assert worker.counters.wasted_tokens > 0
    snap = await gate(redis_url, run_name)
    assert snap.inflight_total == 0
    assert snap.admitted == snap.finished + snap.rejected and snap.finished == 3
    groups = await read_groups(redis_url, run_name, 3)
    assert all(s.num_turns == 1 for g in groups for s in g.samples)
    # Per-turn rewards travel through the buffer: one per turn, summing to the reward.
    for s in (s for g in groups for s in g.samples):
        assert s.turn_rewards is not None and s.turn_rewards.tolist() == [s.reward]


@pytest.mark.timeout(60)
async def test_turn_cap_ends_an_episode_with_finish_reason_length(
    redis_url: str,
    run_name: str,
    models: tuple[Path, Path],  # noqa: F811
    server: ServerHandle,  # noqa: F811
) -> None:
    cfg = config(
        redis_url,
        run_name,
        models[0],
        episode="episode_fns:greedy_turns",
        episode_max_turns=3,
        ignore_eos="true",
        n_samples=2,
    )
    worker = await open_worker(cfg, make_servers([server.url]), worker_id="w-cap", max_groups=1)
    assert await asyncio.wait_for(worker.run(), 40) == 1
    (g,) = await read_groups(redis_url, run_name, 1)
    for s in g.samples:
        assert s.num_turns == 3 and s.finish_reason == "length" and s.reward == 0.0
        assert s.loss_mask.tolist() == [1, 1, 0] * 3
        assert s.turn_starts.tolist() == [0, 3, 6]
