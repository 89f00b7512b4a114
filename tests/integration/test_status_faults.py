"""``sluice status`` shows what went wrong: dead letters by reason, worker metrics with their
age, eval rewards (the live version is tests/faults/test_security.py::test_secured_live_run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from buffer import RedisTrajectoryBuffer, connect, keys
from staleness import VersionManager

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


def status(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_REDIS")}
    return subprocess.run(
        [sys.executable, "-m", "sluice", "status", "--redis-url", url, *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


async def test_status_shows_dead_letters_worker_metrics_and_eval(
    redis_url: str, run_name: str
) -> None:
    async with await VersionManager.open(redis_url, run_name, eta=1, batch_groups=2) as vm:
        await vm.heartbeat("w7", ttl=60)
        assert await vm.try_admit("w7", 2) == 2
        await vm.reject("w7", 1, "inference_error")
    c = await connect(redis_url)
    try:
        buf = RedisTrajectoryBuffer(c, run_name, "t")
        await c.xadd(keys.stream(run_name), {"d": b"junk", "g": "x"})
        await c.xadd(keys.stream(run_name), {"d": b"junk2", "g": "y"})
        assert await buf.get_batch(2, block_ms=200) == []
        now = float((await c.time())[0])
        await c.hset(
            keys.worker_metrics(run_name, "w7"),
            mapping={
                "status": "running",
                "groups_pushed": 5,
                "groups_rejected": 1,
                "rejected_by": json.dumps({"inference_error": 1}),
                "tokens_per_s": 12.5,
                "version": 3,
                "servers": json.dumps([{"url": "http://s", "alive": True}]),
                "updated_at": now - 4,
            },
        )
        rec = {"version": 3, "greedy_reward": 0.75, "sampled_reward": 0.5, "prompts": 8}
        await c.hset(keys.eval_results(run_name), "3", json.dumps({**rec, "worker": "w7"}))
    finally:
        await c.aclose()
    res = status(redis_url, "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["buffer"]["dead_letter"] == 2
    assert d["dead_letters"]["by_reason"] == {"not a sluice trajectory payload": 2}
    assert [r["entry"] for r in d["dead_letters"]["recent"]] != []
    m = d["worker_metrics"]["w7"]
    assert (m["groups_pushed"], m["rejected_by"], m["version"]) == (5, {"inference_error": 1}, 3)
    assert 3 <= m["age_s"] < 30
    assert d["eval"][0]["greedy_reward"] == 0.75 and d["rejected_by"] == {"inference_error": 1}
    table = status(redis_url).stdout
    for word in (
        "not a sluice trajectory payload",
        "worker metrics",
        "inference_error=1",
        "0.750",
        "w7",
    ):
        assert word in table, (word, table)
