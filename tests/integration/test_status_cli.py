"""``sluice status`` and ``sluice run set-eta`` as subprocesses against a private,
password-protected redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from buffer import RedisTrajectoryBuffer, Sample, TrajectoryGroup
from procs import RedisServer
from staleness import VersionManager

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "pw-S3cret-zq81"


def sluice(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_REDIS")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def group(run: str, worker: str) -> TrajectoryGroup:
    samples = [
        Sample(
            output_ids=np.array([5, 6, 7], dtype=np.int32),
            behaviour_logp=np.array([-0.1, -0.2, -0.3], dtype=np.float32),
            token_versions=np.array([0, 0, 1], dtype=np.int32),
            reward=float(i),
            finish_reason="stop",
            index=i,
        )
        for i in range(2)
    ]
    return TrajectoryGroup(
        run_id=run,
        prompt_id="p0",
        prompt_ids=np.array([1, 2], dtype=np.int32),
        samples=samples,
        worker_id=worker,
        admission_version=0,
    )


@pytest.fixture
def secured(redis_factory: Callable[..., RedisServer]) -> str:
    return redis_factory(password=PASSWORD).url


async def test_status_json_shows_the_live_run(secured: str, run_name: str) -> None:
    url = secured
    async with await VersionManager.open(url, run_name, eta=2, batch_groups=3) as vm:
        await vm.heartbeat("w1", ttl=60)
        assert await vm.try_admit("w1", 4) == 4
        async with await RedisTrajectoryBuffer.open(url, run_name, consumer="trainer0") as buf:
            await buf.put(group(run_name, "w1"))
            await buf.put(group(run_name, "w1"))
            assert len(await buf.get_batch(1, block_ms=100)) == 1  # one pending
        assert await vm.finish("w1", 2) == 2
        assert await vm.reject("w1", 1, "reward_filter") == 1
        await vm.publish_weights(1, "/tmp/weights/v1", "safetensors")

        res = sluice("status", "--redis-url", url, "--json")
        assert res.returncode == 0, res.stderr
        assert PASSWORD not in res.stdout + res.stderr
        d = json.loads(res.stdout)
        assert d["run"] == run_name
        assert (d["version"], d["eta"], d["batch_groups"]) == (1, 2, 3)
        assert (d["admitted"], d["finished"], d["rejected"], d["inflight"]) == (4, 2, 1, 1)
        assert d["rejected_by"] == {"reward_filter": 1}
        # (1 + 2 + 1) * 3 - (4 - 1) = 9
        assert d["capacity"] == 9
        assert [w["id"] for w in d["workers"]] == ["w1"]
        assert 0 <= d["workers"][0]["seconds_since_heartbeat"] < 10
        assert d["buffer"]["length"] == 2 and d["buffer"]["pending"] == 1
        assert d["buffer"]["dead_letter"] == 0
        assert d["weights"]["location"] == "/tmp/weights/v1"
        assert "***" in d["redis"]

        # set-eta through the CLI; the URL from the environment this time
        res = sluice("run", "set-eta", "5", env={"SLUICE_REDIS_URL": url})
        assert res.returncode == 0, res.stderr
        assert f"run {run_name}: eta 2 -> 5" in res.stdout
        assert PASSWORD not in res.stdout + res.stderr
        # the next admission uses it: (1 + 5 + 1) * 3 - 3 = 18
        assert await vm.try_admit("w1", 100) == 18

        # the table, with --watch --count so it ends
        res = sluice("status", "--run", run_name, "--watch", "--count", "2", "--interval", "0.05",
                     env={"SLUICE_REDIS_URL": url})  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert PASSWORD not in res.stdout + res.stderr
        for word in (run_name, "version", "capacity", "w1", "reward_filter=1", "***"):
            assert word in res.stdout, word

        res = sluice("status", "--redis-url", url, "--json", "--watch", "--count", "2",
                     "--interval", "0.05")  # fmt: skip
        lines = res.stdout.strip().splitlines()
        assert res.returncode == 0 and len(lines) == 2
        assert json.loads(lines[1])["eta"] == 5
        assert json.loads(lines[1])["run_finished"] is None

        # the trainer ended the run: status says so (its workers exit or wait)
        await vm.mark_finished(7)
        res = sluice("status", "--redis-url", url, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["run_finished"]["step"] == 7
        res = sluice("status", "--redis-url", url)
        assert res.returncode == 0, res.stderr
        assert "finished at step 7" in res.stdout


async def test_status_needs_run_when_there_are_several(secured: str) -> None:
    for name in ("alpha", "beta"):
        await (await VersionManager.open(secured, name, eta=1, batch_groups=2)).close()
    res = sluice("status", "--redis-url", secured)
    assert res.returncode == 1
    assert "alpha" in res.stderr and "beta" in res.stderr and "--run" in res.stderr
    res = sluice("status", "--redis-url", secured, "--run", "gamma", "--json")
    assert res.returncode == 1 and "'gamma'" in res.stderr
    res = sluice("status", "--redis-url", secured, "--run", "beta", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["run"] == "beta"
    res = sluice("run", "set-eta", "-1", "--redis-url", secured, "--run", "beta")
    assert res.returncode == 1 and "eta=-1" in res.stderr
    for out in (res.stdout, res.stderr):
        assert PASSWORD not in out


async def test_status_errors_never_print_the_password(
    redis_factory: Callable[..., RedisServer],
) -> None:
    srv = redis_factory(password=PASSWORD)
    wrong = srv.url.replace(PASSWORD, "not-the-pw-77")
    res = sluice("status", "--redis-url", wrong)
    assert res.returncode == 2
    assert "credentials" in res.stderr or "password" in res.stderr
    assert "not-the-pw-77" not in res.stdout + res.stderr
    # an empty Redis has no run to show
    res = sluice("status", "--redis-url", srv.url)
    assert res.returncode == 1 and "no sluice run" in res.stderr
    assert PASSWORD not in res.stdout + res.stderr
