"""The run's live settings win (docs/staleness.md, `sluice run --help`): a trainer or worker
joining a run whose eta differs from its config's (normal after `sluice run set-eta`) logs ONE
warning naming both values and that the run's is used, and then uses the run's. A trainer's
batch_groups must match the run's (an error naming both, tests/integration/
test_version_manager.py); a worker takes the run's."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
from trainer_helpers import base_config, make_group, make_model, put_groups, read_metrics

from sluice.config import SluiceConfig
from staleness import VersionManager

NOTE = "using the run's, which wins"


def _notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and NOTE in r.getMessage()
    ]


async def _create(url: str, run: str, eta: int, batch_groups: int) -> None:
    vm = await VersionManager.open(url, run, eta=eta, batch_groups=batch_groups)
    await vm.close()


@pytest.mark.timeout(120)
def test_trainer_warns_once_and_uses_the_runs_eta(
    redis_url: str, run_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sluice.commands.train import run_trainer

    model = make_model(tmp_path / "model")
    asyncio.run(_create(redis_url, run_name, eta=0, batch_groups=2))
    rng = np.random.default_rng(0)

    # One group two versions old: stale at the run's eta 0, fine at the config's eta 5 (at
    # version 2 a group of version 0 is 2 versions old).
    async def to_version_2() -> None:
        vm = await VersionManager.open(redis_url, run_name)
        try:
            await vm.publish_weights(1, "/nonexistent/v1")
            await vm.publish_weights(2, "/nonexistent/v2")
        finally:
            await vm.close()

    asyncio.run(to_version_2())
    groups = [make_group(rng, run_name, version=2, group_id=f"ok{i}") for i in range(2)]
    groups.insert(1, make_group(rng, run_name, version=0, group_id="old"))
    put_groups(redis_url, run_name, groups)
    conf = base_config(tmp_path, redis_url, run_name, model, max_steps=1)
    conf["staleness"] = {"eta": 5, "batch_groups": 2}
    caplog.set_level(logging.INFO)
    assert asyncio.run(run_trainer(SluiceConfig.model_validate(conf))) == 1
    (note,) = _notes(caplog)
    assert f"run '{run_name}' has eta=0 (the config says 5)" in note
    (m,) = read_metrics(tmp_path / run_name)
    assert m["dropped"] == 1 and "old" not in m["group_ids"]  # the run's eta 0 was applied

    # Same eta: no warning.
    caplog.clear()
    conf["staleness"] = {"eta": 0, "batch_groups": 2}
    conf["trainer"]["max_steps"] = 2
    put_groups(redis_url, run_name, [make_group(rng, run_name, version=3) for _ in range(2)])
    assert asyncio.run(run_trainer(SluiceConfig.model_validate(conf), resume=True)) == 1
    assert _notes(caplog) == []


@pytest.mark.timeout(60)
async def test_worker_warns_once_and_takes_the_runs_settings(
    redis_url: str, run_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from rollout_workers.config import RolloutConfig
    from rollout_workers.parts import RunInfo, connect
    from rollout_workers.tasks import get_task

    await _create(redis_url, run_name, eta=16, batch_groups=4)
    prompts = get_task("reverse", n_train=8, n_eval=0).prompts("train")

    async def join(eta: int, batch_groups: int) -> tuple[int, int]:
        run = RunInfo(
            name=run_name, seed=0, redis_url=redis_url, model_path="", eta=eta,
            batch_groups=batch_groups,
        )  # fmt: skip
        parts = await connect(run, "w1", prompts, RolloutConfig())
        try:
            snap = await parts.versions.snapshot()  # type: ignore[attr-defined]
            return int(snap.eta), int(snap.batch_groups)
        finally:
            await parts.close()

    caplog.set_level(logging.INFO)
    assert await join(2, 8) == (16, 4)
    (note,) = _notes(caplog)
    assert note.startswith(
        f"run '{run_name}' has eta=16 (the config says 2) and batch_groups=4 (the config says 8)"
    )
    caplog.clear()
    assert await join(16, 4) == (16, 4)
    assert _notes(caplog) == []
