"""Distributed weight sync over gloo (docs/weight-sync.md): the trainer's rank-0 code
(``weights.distributed.DistributedSync``) broadcasts to a real CPU server driven by an
in-process ``RolloutWorker``, through a real Redis.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from cpu_server_fixture import make_model
from weight_sync_helpers import server_params_differ, server_version, until

from buffer.redis_buffer import RedisTrajectoryBuffer
from inference.launch import launch_cpu_server
from inference.models import load_model
from procs import free_port
from rollout_workers.pool import make_servers
from rollout_workers.worker import RolloutWorker
from sluice.commands.rollout import open_worker
from sluice.config import load_config
from staleness.version_manager import VersionManager
from weights.distributed import DistributedSync, bucket_plan
from weights.plan import FMT_DONE, SyncPlan


def test_bucket_plan_splits_in_order_within_the_limit() -> None:
    """Buckets keep the parameter order and stay within bucket_mb (a tensor larger than the
    limit gets a bucket of its own)."""
    mib = 1024 * 1024
    named = [
        ("a", torch.zeros(mib // 4)),  # 1 MiB of float32
        ("b", torch.zeros(mib // 8)),  # 0.5 MiB
        ("c", torch.zeros(mib // 2)),  # 2 MiB: alone
        ("d", torch.zeros(3, dtype=torch.bfloat16)),
    ]
    plan = bucket_plan(named, bucket_mb=1)
    assert [b["names"] for b in plan] == [["a"], ["b"], ["c"], ["d"]]
    plan = bucket_plan(named, bucket_mb=2)
    assert [b["names"] for b in plan] == [["a", "b"], ["c"], ["d"]]
    assert plan[2] == {"names": ["d"], "dtypes": ["bfloat16"], "shapes": [[3]]}
    with pytest.raises(ValueError, match="world_size"):
        SyncPlan.from_json(SyncPlan(1, "g", "h", 1, 3, {"u": 1}, True, plan, 1.0).to_json())


@pytest.mark.timeout(150)
async def test_distributed_sync_worker_server_and_catch_up_from_disk(
    redis_url: str, run_name: str, tmp_path: Path
) -> None:
    """1. A broadcast (new group) leaves the server's weights equal to the trainer's exactly,
    labelled with the version, and the worker then pushes tokens labelled with it.
    2. A second broadcast reuses the group (no join).
    3. The server is killed and restarted: its worker reloads it from the latest disk copy.
    4. The next broadcast over the old group fails on rank 0 (a member is gone); the trainer's
       fallback (disk copy + safetensors publication) reaches the server through the catch-up.
    5. The broadcast after that opens a fresh group which the restarted server joins."""
    models = [make_model(tmp_path / f"m{i}", seed=10 + i) for i in range(5)]
    port = free_port()
    cfg = load_config(
        None,
        [
            f"redis.url={redis_url}",
            f"run.name={run_name}",
            f"model.path={models[0]}",
            "task.name=reverse",
            "staleness.eta=100",
            "staleness.batch_groups=2",
            "rollout.n_samples=2",
            "rollout.max_inflight_groups=2",
            "rollout.health_interval_s=0.3",
            "trainer.weight_sync=distributed",
        ],
    )
    vm = await VersionManager.open(redis_url, run_name, eta=100, batch_groups=2)
    srv = launch_cpu_server(models[0], port, log_path=tmp_path / "server.log")
    worker = await open_worker(cfg, make_servers([srv.url]), worker_id="w-sync")
    task = asyncio.create_task(worker.run())
    sync = DistributedSync(vm, bucket_mb=1, timeout_s=20.0)
    try:

        async def registered() -> bool:
            return srv.url in await vm.sync_servers() and worker.status == "running"

        await until(registered, 30, "the worker to register its server")

        async def at(v: int) -> bool:
            return await server_version(srv.url) == str(v)

        # 1. v1 over a fresh group
        m1 = load_model(models[1])
        t0 = time.monotonic()
        assert await sync.broadcast(1, m1)
        await vm.publish_weights(1, f"group:{sync.group}", FMT_DONE)
        await until(lambda: at(1), 30, "the server at v1")
        first_s = time.monotonic() - t0
        assert await server_params_differ(srv.url, m1) == []
        group1 = sync.group
        async with await RedisTrajectoryBuffer.open(redis_url, run_name, "test") as buf:
            seen: set[int] = set()
            deadline = time.monotonic() + 40
            while 1 not in seen and time.monotonic() < deadline:
                for d in await buf.get_batch(4, block_ms=500):
                    for smp in d.group.samples:
                        seen.update(int(v) for v in smp.token_versions.tolist())
            assert 1 in seen, f"no token labelled v1 (versions seen {sorted(seen)})"

        # 2. v2 reuses the group
        m2 = load_model(models[2])
        assert await sync.broadcast(2, m2)
        assert sync.group == group1
        await vm.publish_weights(2, f"group:{sync.group}", FMT_DONE)
        await until(lambda: at(2), 30, "the server at v2")
        assert await server_params_differ(srv.url, m2) == []
        await vm.record_disk_weights(2, str(models[2]))  # the trainer's disk_every copy

        # 3. kill + restart: the worker reloads the latest disk copy (v2) into it
        # (off the event loop: the worker shares it, as a separate process would not)
        await asyncio.to_thread(srv.stop)
        await asyncio.sleep(1.0)  # the health loop (0.3 s) sees it dead
        srv = await asyncio.to_thread(
            launch_cpu_server, models[0], port, log_path=tmp_path / "server2.log"
        )
        await until(lambda: at(2), 30, "the restarted server caught up from disk")
        assert await server_params_differ(srv.url, m2) == []

        # 4. the old group lost a member: rank 0 fails; fallback to disk
        m3 = load_model(models[3])
        assert not await sync.broadcast(3, m3)
        await vm.record_disk_weights(3, str(models[3]))
        await vm.publish_weights(3, str(models[3]), "safetensors")
        await until(lambda: at(3), 30, "the server at v3 from the disk fallback")
        assert await server_params_differ(srv.url, m3) == []

        # 5. a fresh group, joined by the restarted server
        m4 = load_model(models[4])
        assert await sync.broadcast(4, m4)
        assert sync.group != group1
        await vm.publish_weights(4, f"group:{sync.group}", FMT_DONE)
        await until(lambda: at(4), 30, "the server at v4 over a new group")
        assert await server_params_differ(srv.url, m4) == []
        print(f"first broadcast (join + {len(list(m1.parameters()))} tensors): {first_s:.3f}s")
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await vm.close()
        srv.stop()
    async with await VersionManager.open(redis_url, run_name) as vm2:
        assert srv.url not in await vm2.sync_servers(), "a stopped worker unregisters"


@pytest.mark.timeout(180)
async def test_trainer_process_publishes_over_the_distributed_path(
    redis_url: str, run_name: str, tmp_path: Path
) -> None:
    """A real ``sluice train`` with ``weight_sync=distributed`` and ``disk_every=3`` trains on
    a live worker's groups: versions 1 and 2 reach the server only by broadcast (no disk copy
    written), version 3 also on disk; the server ends with exactly the weights of ``weights/v3``
    labelled 3, and the run's latest record is a ``distributed-done`` publication."""
    from trainer_helpers import base_config, run_train, write_config

    model = make_model(tmp_path / "m0", seed=21)
    vm = await VersionManager.open(redis_url, run_name, eta=100, batch_groups=2)
    srv = launch_cpu_server(model, log_path=tmp_path / "server.log")
    sets = [
        f"redis.url={redis_url}",
        f"run.name={run_name}",
        f"model.path={model}",
        "task.name=reverse",
        "staleness.eta=100",
        "staleness.batch_groups=2",
        "rollout.n_samples=2",
        "rollout.max_inflight_groups=2",
        "rollout.health_interval_s=0.3",
        "trainer.weight_sync=distributed",
    ]
    worker = await open_worker(load_config(None, sets), make_servers([srv.url]), worker_id="w-tr")
    task = asyncio.create_task(worker.run())
    cfg = base_config(
        tmp_path,
        redis_url,
        run_name,
        model,
        max_steps=3,
        checkpoint_every=3,
        weight_sync="distributed",
        disk_every=3,
        sync_timeout_s=20,
    )
    cfg["task"] = {"name": "reverse"}
    path = write_config(tmp_path / "train.yaml", **cfg)
    run_dir = tmp_path / run_name
    try:
        await until(
            lambda: _registered(vm, srv.url, worker), 30, "the worker to register its server"
        )
        proc = await asyncio.to_thread(run_train, path, timeout=150)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "weight sync v1:" in proc.stderr and "weight sync v3:" in proc.stderr, proc.stderr[
            -3000:
        ]
        latest = await vm.latest_weights()
        assert latest is not None and (latest.version, latest.fmt) == (3, FMT_DONE)
        disk = await vm.latest_disk_weights()
        assert disk is not None and disk.version == 3
        assert Path(disk.location) == (run_dir / "weights" / "v3").resolve()
        assert not (run_dir / "weights" / "v1").exists()
        assert not (run_dir / "weights" / "v2").exists()

        async def at3() -> bool:
            return await server_version(srv.url) == "3"

        await until(at3, 30, "the server at v3")
        assert await server_params_differ(srv.url, load_model(disk.location)) == []
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await vm.close()
        srv.stop()


async def _registered(vm: VersionManager, url: str, worker: RolloutWorker) -> bool:
    return url in await vm.sync_servers() and worker.status == "running"
