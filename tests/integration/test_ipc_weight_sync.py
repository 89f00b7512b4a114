"""ipc weight sync (docs/weight-sync.md): the trainer's rank-0 code (``weights.ipc.IpcSync``
behind ``weights.publish.IpcPublisher``) hands its weights in shared memory to a real CPU
server process (``/update_weights_from_tensor``) held by an in-process ``RolloutWorker``,
through a real Redis; and a real ``sluice train`` process (another process than the server's)
doing the same with an admin key.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch
from cpu_server_fixture import make_model
from weight_sync_helpers import server_params_differ, server_version, until

from buffer.redis_buffer import RedisTrajectoryBuffer
from inference.launch import launch_cpu_server
from inference.models import load_model
from inference.protocol import SamplingParams
from procs import free_port
from rollout_workers.pool import make_servers
from sluice.commands.rollout import open_worker
from sluice.config import load_config
from staleness.version_manager import VersionManager
from weights.ipc import IpcSync
from weights.plan import FMT_IPC_DONE
from weights.publish import IpcPublisher

KEY = "ipc-admin-key"


async def logprobs_match(client: Any, model: Any, version: int) -> None:
    """A generation on the server, labelled ``version``, has the log-probs ``model``'s own
    forward gives its tokens (what the trainer computes under the same weights)."""
    prompt = [5, 9, 17, 3, 11]
    res = await client.generate(prompt, SamplingParams(max_new_tokens=8, temperature=1.0))
    assert res.weight_version == version and res.num_tokens > 0
    ids = torch.tensor([prompt + res.output_ids.tolist()])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    mine = lp.gather(1, torch.tensor(res.output_ids.tolist())[:, None])[:, 0].numpy()
    np.testing.assert_allclose(res.logprobs, mine, atol=1e-4)


def _config(redis_url: str, run_name: str, model: Path) -> Any:
    return load_config(
        None,
        [
            f"redis.url={redis_url}",
            f"run.name={run_name}",
            f"model.path={model}",
            "task.name=reverse",
            "staleness.eta=100",
            "staleness.batch_groups=2",
            "rollout.n_samples=2",
            "rollout.max_inflight_groups=2",
            "rollout.health_interval_s=0.3",
            "trainer.weight_sync=ipc",
            f"inference.admin_api_key={KEY}",
        ],
    )


@pytest.mark.timeout(180)
async def test_ipc_sync_worker_server_fallback_and_catch_up_from_disk(
    redis_url: str, run_name: str, tmp_path: Path
) -> None:
    """1. An ipc transfer leaves the server's weights equal to the trainer's exactly, labelled
    with the version; its log-probs are the trainer's forward's, and the worker pushes tokens
    labelled with it. No disk copy is written for it.
    2. The server is killed: the next version cannot be handed over (its worker holds nothing,
       no acknowledgement): the publisher writes and publishes the disk copy.
    3. The server is restarted: its worker reloads it from that disk copy.
    4. The next version reaches the restarted server over ipc again."""
    models = [make_model(tmp_path / f"m{i}", seed=30 + i) for i in range(4)]
    port = free_port()
    cfg = _config(redis_url, run_name, models[0])
    vm = await VersionManager.open(redis_url, run_name, eta=100, batch_groups=2)
    srv = launch_cpu_server(models[0], port, admin_api_key=KEY, log_path=tmp_path / "s1.log")
    # handles=[srv]: the worker launched it (only such servers are offered for ipc)
    worker = await open_worker(
        cfg, make_servers([srv.url], handles=[srv], admin_api_key=KEY), worker_id="w-ipc"
    )
    task = asyncio.create_task(worker.run())
    sync = IpcSync(vm, bucket_mb=1, timeout_s=3.0, admin_api_key=KEY)
    pub = IpcPublisher(vm, sync, tmp_path / "weights", keep=5, disk_every=100)
    try:

        async def registered() -> bool:
            return srv.url in await vm.sync_servers("ipc") and worker.status == "running"

        await until(registered, 30, "the worker to register its server")
        assert srv.url not in await vm.sync_servers(), "not offered for the distributed path"

        async def at(v: int) -> bool:
            return await server_version(srv.url) == str(v)

        # 1. v1 in memory
        m1 = load_model(models[1])
        t0 = time.monotonic()
        await pub.publish(1, m1)
        first_s = time.monotonic() - t0
        latest = await vm.latest_weights()
        assert latest is not None and (latest.version, latest.fmt) == (1, FMT_IPC_DONE)
        assert await at(1)
        assert await server_params_differ(srv.url, m1) == []
        assert not (tmp_path / "weights" / "v1").exists()
        async with srv.client() as client:
            await logprobs_match(client, m1, 1)
        async with await RedisTrajectoryBuffer.open(redis_url, run_name, "test") as buf:
            seen: set[int] = set()
            deadline = time.monotonic() + 40
            while 1 not in seen and time.monotonic() < deadline:
                for d in await buf.get_batch(4, block_ms=500):
                    for smp in d.group.samples:
                        seen.update(int(v) for v in smp.token_versions.tolist())
            assert 1 in seen, f"no token labelled v1 (versions seen {sorted(seen)})"

        # 2. the server is killed: v2 falls back to disk
        await asyncio.to_thread(srv.stop)
        await asyncio.sleep(1.0)  # the health loop (0.3 s) sees it dead
        m2 = load_model(models[2])
        await pub.publish(2, m2)
        latest = await vm.latest_weights()
        assert latest is not None and (latest.version, latest.fmt) == (2, "safetensors")
        disk = await vm.latest_disk_weights()
        assert disk is not None and disk.version == 2
        assert Path(disk.location) == (tmp_path / "weights" / "v2").resolve()

        # 3. restarted: caught up from the disk copy
        srv = await asyncio.to_thread(
            launch_cpu_server, models[0], port, admin_api_key=KEY, log_path=tmp_path / "s2.log"
        )
        await until(lambda: at(2), 30, "the restarted server caught up from disk")
        assert await server_params_differ(srv.url, m2) == []

        # 4. in memory again, to the restarted process
        m3 = load_model(models[3])
        await pub.publish(3, m3)
        latest = await vm.latest_weights()
        assert latest is not None and (latest.version, latest.fmt) == (3, FMT_IPC_DONE)
        assert await at(3)
        assert await server_params_differ(srv.url, m3) == []
        print(f"first ipc publication ({len(list(m1.parameters()))} tensors): {first_s:.3f}s")
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await vm.close()
        srv.stop()
    async with await VersionManager.open(redis_url, run_name) as vm2:
        assert srv.url not in await vm2.sync_servers("ipc"), "a stopped worker unregisters"


async def test_server_refuses_the_payload_without_the_admin_key(tmp_path: Path) -> None:
    """The endpoint unpickles what it gets: without the admin key it answers 401."""
    model = make_model(tmp_path / "m", seed=3)
    srv = launch_cpu_server(model, admin_api_key=KEY, log_path=tmp_path / "s.log")
    try:
        body = {"serialized_named_tensors": ["eA=="], "load_format": None}
        async with (
            aiohttp.ClientSession() as s,
            s.post(srv.url + "/update_weights_from_tensor", json=body) as r,
        ):
            assert r.status == 401
        assert await server_version(srv.url) == "0"
    finally:
        srv.stop()


@pytest.mark.timeout(180)
async def test_trainer_process_publishes_over_ipc(
    redis_url: str, run_name: str, tmp_path: Path
) -> None:
    """A real ``sluice train`` (its own process; the server is another) with
    ``weight_sync=ipc``, ``disk_every=3`` and the servers' admin key trains on a live worker's
    groups: versions 1 and 2 reach the server only in memory (no disk copy written), version 3
    also on disk; the server ends with exactly the weights of ``weights/v3``, labelled 3."""
    from trainer_helpers import base_config, run_train, write_config

    model = make_model(tmp_path / "m0", seed=41)
    vm = await VersionManager.open(redis_url, run_name, eta=100, batch_groups=2)
    srv = launch_cpu_server(model, admin_api_key=KEY, log_path=tmp_path / "server.log")
    worker = await open_worker(
        _config(redis_url, run_name, model),
        make_servers([srv.url], handles=[srv], admin_api_key=KEY),
        worker_id="w-ipc-tr",
    )
    task = asyncio.create_task(worker.run())
    cfg = base_config(
        tmp_path,
        redis_url,
        run_name,
        model,
        max_steps=3,
        checkpoint_every=3,
        weight_sync="ipc",
        disk_every=3,
        sync_timeout_s=20,
    )
    cfg["task"] = {"name": "reverse"}
    cfg["inference"] = {"admin_api_key": KEY}
    path = write_config(tmp_path / "train.yaml", **cfg)
    run_dir = tmp_path / run_name
    try:

        async def registered() -> bool:
            return srv.url in await vm.sync_servers("ipc") and worker.status == "running"

        await until(registered, 30, "the worker to register its server")
        try:
            proc = await asyncio.to_thread(run_train, path, timeout=120)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"sluice train did not finish: {e.stderr!r:.5000}") from None
        assert proc.returncode == 0, proc.stderr[-3000:]
        for v in (1, 2, 3):
            assert f"ipc weight sync v{v}:" in proc.stderr, proc.stderr[-3000:]
        latest = await vm.latest_weights()
        assert latest is not None and (latest.version, latest.fmt) == (3, FMT_IPC_DONE)
        disk = await vm.latest_disk_weights()
        assert disk is not None and disk.version == 3
        assert Path(disk.location) == (run_dir / "weights" / "v3").resolve()
        assert not (run_dir / "weights" / "v1").exists()
        assert not (run_dir / "weights" / "v2").exists()
        assert await server_version(srv.url) == "3"
        assert await server_params_differ(srv.url, load_model(disk.location)) == []
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await vm.close()
        srv.stop()
