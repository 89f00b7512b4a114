"""The OpenAI-compatible endpoint: the example's agent written against the OpenAI client gives
the same trajectory as the same agent through ``ctx``, on a real CPU server."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cpu_server_fixture import cpu_server_factory  # noqa: F401

from inference.launch import ServerHandle
from inference.models import init_tiny_text_model
from rollout_workers.episodes import EpisodeRunner, episode_runner, resolve_episode_fn
from rollout_workers.metrics import Counters
from rollout_workers.openai_api import OpenAIEndpoint
from rollout_workers.pool import ServerPool, make_servers
from rollout_workers.rewards import RewardRunner
from rollout_workers.sampler import Sampler
from sluice.config import build_task, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("template", ["chatml", "compact"])
async def test_endpoint_episode_equals_ctx_episode(
    tmp_path: Path,
    cpu_server_factory: Callable[..., ServerHandle],  # noqa: F811
    template: str,
) -> None:
    pytest.importorskip("openai")
    sys.path.insert(0, str(EXAMPLES))
    model = init_tiny_text_model(
        tmp_path / "m", alphabet="0123456789*?tol", chat_template=template, layers=1, hidden=32
    )
    srv = cpu_server_factory(model, "--dtype", "float64")
    cfg = load_config(
        None,
        [
            f"model.path={model}",
            "task.name=text",
            f"task.options.path={EXAMPLES / 'data' / 'tool-arith.jsonl'}",
            "task.options.skip_special_tokens=false",
            "task.options.max_new_tokens=6",
            "rollout.n_samples=3",
            "rollout.episode=tool_task:episode",
            "rollout.temperature=1.0",
        ],
    )
    task = build_task(cfg)
    pool = ServerPool(make_servers([srv.url]))
    pool.mark_up(pool.servers[0], 0)  # the server serves the model it was started with: v0
    sampler = Sampler(
        pool,
        cfg.rollout,
        RewardRunner(task.reward, timeout_s=10),
        Counters(),
        seed=cfg.run.seed,
        eos_token_id=task.eos_token_id,
        max_new_tokens=task.max_new_tokens,
        stop_token_ids=task.stop_token_ids,
    )
    through_ctx = episode_runner(task, cfg.rollout, sampler)
    assert through_ctx is not None
    endpoint = OpenAIEndpoint()
    through_api = EpisodeRunner(
        resolve_episode_fn("tool_task_openai:episode"),
        sampler,
        task,
        through_ctx.limits,
        timeout_s=60,
        n_samples=3,
        temperature=1.0,
        endpoint=endpoint,
    )
    try:
        for prompt in task.prompts("train")[:2]:
            a, ra = await through_ctx.group(prompt, "g-same", 0)
            b, rb = await through_api.group(prompt, "g-same", 0)
            assert ra == rb
            for x, y in zip(a, b, strict=True):
                assert x.output_ids == y.output_ids and len(x.output_ids) > 0
                assert x.loss_mask == y.loss_mask and 0 in x.loss_mask
                assert x.turn_starts == y.turn_starts and len(x.turn_starts) == 2
                assert x.versions == y.versions
                assert x.turn_rewards == y.turn_rewards and len(x.turn_rewards or []) == 2
                np.testing.assert_allclose(x.logprobs, y.logprobs, rtol=0, atol=1e-9)
        assert endpoint.completions == 2 * 3 * 2
        assert endpoint.episodes == {}  # every episode unregistered at its end
    finally:
        await through_api.close()
        await pool.close_clients()
        sampler.rewards.close()
