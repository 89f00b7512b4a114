# ruff: noqa: F811  (pytest fixtures imported from cpu_server_fixture are parameters)
"""LoRA publications reach a real worker and real CPU servers (real Redis): every token labelled
with version v was sampled with adapter v (its log-prob equals the trainer's recomputation with
that adapter), a server that failed to load the adapter gets no request of that version, and the
previous adapter is unloaded once no request names it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cpu_server_fixture import cpu_server_factory, make_model  # noqa: F401
from lora_helpers import make_adapter, model_with_adapter, recompute
from test_rollout_worker import config, read_groups

from inference.client import SGLangClient
from inference.lora import adapter_name
from inference.protocol import InferenceError
from rollout_workers.pool import ServerState, make_servers
from sluice.commands.rollout import open_worker
from staleness.version_manager import VersionManager
from weights.lora import write_adapter_dir
from weights.plan import FMT_LORA


async def _requests(url: str) -> int:
    async with SGLangClient(url) as c:
        return int((await c.model_info())["requests"])


@pytest.mark.timeout(180)
async def test_lora_versions_reach_the_worker_and_label_tokens_truly(
    redis_url: str, run_name: str, cpu_server_factory: Any, tmp_path: Path
) -> None:
    base = make_model(tmp_path / "base", seed=1)
    # v1 and v2: rank 8; the second server accepts rank <= 4 only, so its loads fail.
    d1 = write_adapter_dir(make_adapter(base, 8, 1), tmp_path / "w" / "v1")
    d2 = write_adapter_dir(make_adapter(base, 8, 2), tmp_path / "w" / "v2")
    lora = ["--enable-lora", "--lora-target-modules", "all", "--dtype", "float64"]
    good, bad = await asyncio.gather(  # started side by side
        asyncio.to_thread(cpu_server_factory, base, *lora, "--max-lora-rank", "8"),
        asyncio.to_thread(cpu_server_factory, base, *lora, "--max-lora-rank", "4"),
    )
    long = 120
    cfg = config(
        redis_url,
        run_name,
        base,
        max_new_tokens=long,
        ignore_eos="true",
        n_samples=2,
        max_inflight_groups=2,
    )
    worker = await open_worker(
        cfg, make_servers([good.url, bad.url]), worker_id="w-lora", max_groups=4
    )
    run = asyncio.create_task(worker.run())
    try:
        t0 = time.monotonic()
        while worker.inflight_requests() < 4:
            assert not run.done() and time.monotonic() - t0 < 30
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        async with await VersionManager.open(redis_url, run_name) as vm:
            await vm.publish_weights(1, str(d1), FMT_LORA)
            t0 = time.monotonic()
            while not any(u.version == 1 for u in worker.updater.updates):
                assert time.monotonic() - t0 < 30
                await asyncio.sleep(0.02)
            rec = worker.updater.updates[-1]
            assert rec.failed == 1 and rec.servers == 2
            srv_bad = next(s for s in worker.pool.servers if s.url == bad.url)
            assert srv_bad.state is not ServerState.UP and srv_bad.adapter is None
            await asyncio.sleep(0.3)  # requests the bad server had before the update end
            bad_count = await _requests(bad.url)
            # wait until a group admitted at v1 was pushed, then publish v2
            while worker.counters.groups_pushed < 2:
                assert not run.done() and time.monotonic() - t0 < 60
                await asyncio.sleep(0.05)
            await vm.publish_weights(2, str(d2), FMT_LORA)
        assert await asyncio.wait_for(run, 90) == 4
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    # No request reached the server without the adapter after its load failed.
    assert await _requests(bad.url) == bad_count
    srv_good = next(s for s in worker.pool.servers if s.url == good.url)
    assert srv_good.adapter == adapter_name(2) and srv_good.adapters == {adapter_name(2)}
    async with SGLangClient(good.url) as c:  # v1 really is gone from the server
        with pytest.raises(InferenceError, match="not loaded"):
            await c.unload_lora_adapter(adapter_name(1))

    groups = await read_groups(redis_url, run_name, 4)
    models = {
        0: model_with_adapter(base, None),
        1: model_with_adapter(base, d1),
        2: model_with_adapter(base, d2),
    }
    seen: set[int] = set()
    for g in groups:
        for s in g.samples:
            v = s.token_versions
            assert np.all(np.diff(v) >= 0) and set(v.tolist()) <= {0, 1, 2}
            seen |= set(v.tolist())
            prompt, out = g.prompt_ids.tolist(), s.output_ids.tolist()
            expected = np.zeros(len(out))
            for ver in set(v.tolist()):
                expected = np.where(v == ver, recompute(models[ver], prompt, out, 0.8), expected)
            np.testing.assert_allclose(s.behaviour_logp, expected, rtol=0, atol=1e-6)
            # and not the base's: the adapters change the distribution
            if (v > 0).any():
                base_lp = recompute(models[0], prompt, out, 0.8)
                assert np.abs(base_lp - expected)[v > 0].max() > 1e-3
    assert seen == {0, 1, 2}
