"""The rollout worker on real Redis and real CPU inference servers (``sluice serve``).

In-process workers (``RolloutWorker``, built by ``sluice.commands.rollout.open_worker``) where
the test inspects the worker; real ``sluice rollout`` processes where it signals or kills them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cpu_server_fixture import cpu_server_factory, make_model  # noqa: F401

from buffer import keys
from buffer.codec import decode_group
from buffer.connection import connect
from buffer.redis_buffer import RedisTrajectoryBuffer
from buffer.schema import TrajectoryGroup
from inference.client import SGLangClient
from inference.launch import ServerHandle, launch_cpu_server
from rollout_workers.pool import make_servers
from rollout_workers.prompts import PromptSource
from rollout_workers.tasks import get_task
from sluice.commands.rollout import open_worker
from sluice.config import SluiceConfig, load_config
from staleness.version_manager import RunNotFound, VersionManager

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Version 0 and a different random model of the same shape (published as v1)."""
    root = tmp_path_factory.mktemp("models")
    return make_model(root / "v0", seed=1), make_model(root / "v1", seed=2)


@pytest.fixture(scope="module")
def server(
    models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    log = tmp_path_factory.mktemp("srv") / "server.log"
    # float64: a token's log-prob then does not depend on which requests shared its batch (in
    # float32 one token in ~600 drifted 1.3e-4 from the unbatched recomputation).
    with launch_cpu_server(models[0], log_path=log, extra_args=["--dtype", "float64"]) as srv:
        yield srv


def config(redis_url: str, run: str, model: Path, *sets: str, **rollout: Any) -> SluiceConfig:
    overrides = [
        f"redis.url={redis_url}",
        f"run.name={run}",
        "run.seed=3",
        f"model.path={model}",
        "task.name=reverse",
        "staleness.eta=100",
        "staleness.batch_groups=4",
        "rollout.n_samples=4",
        "rollout.max_inflight_groups=4",
        "rollout.temperature=0.8",
        "rollout.health_interval_s=0.3",
        "rollout.metrics_interval_s=0.5",
        *sets,
    ]
    overrides += [f"rollout.{k}={v}" for k, v in rollout.items()]
    return load_config(None, overrides)


async def read_groups(redis_url: str, run: str, n: int, timeout: float = 30.0) -> list[Any]:
    async with await RedisTrajectoryBuffer.open(redis_url, run, consumer="test") as buf:
        got: list[TrajectoryGroup] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            got += [d.group for d in await buf.get_batch(n - len(got), block_ms=500)]
        return got


async def gate(redis_url: str, run: str) -> Any:
    async with await VersionManager.open(redis_url, run) as vm:
        return await vm.snapshot()


async def holds(redis_url: str, run: str, worker: str) -> int:
    """Slots ``worker`` holds (0 before the run exists)."""
    try:
        return int((await gate(redis_url, run)).inflight.get(worker, 0))
    except RunNotFound:
        return 0


def recompute_logprobs(model_dir: Path, prompt: list[int], output: list[int], t: float) -> Any:
    """``log_softmax(logits / T)`` of each output token, by one unbatched transformers forward
    in float64 (so the only rounding left is the server's float32)."""
    import torch

    from inference.models import load_model

    model = load_model(model_dir, dtype="float64")
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits / t, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(output) - 1)
    return logp[pos, torch.tensor(output)].numpy()


# ------------------------------------------------------------------------------------ tests


@pytest.mark.timeout(60)
async def test_worker_fills_buffer_with_correct_groups(
    redis_url: str, run_name: str, models: tuple[Path, Path], server: ServerHandle
) -> None:
    cfg = config(redis_url, run_name, models[0], eval_every=1, eval_prompts=4)
    worker = await open_worker(cfg, make_servers([server.url]), worker_id="w-fill", max_groups=6)
    assert await asyncio.wait_for(worker.run(), 40) == 6
    groups = await read_groups(redis_url, run_name, 6)
    assert len(groups) == 6
    task = get_task("reverse")
    by_id = {p.id: p for p in task.prompts("train")}
    assert len({g.prompt_id for g in groups}) == 6  # six distinct prompts of epoch 0
    for g in groups:
        p = by_id[g.prompt_id]
        assert g.run_id == run_name and g.worker_id == "w-fill" and g.admission_version == 0
        assert g.prompt_ids.tolist() == p.input_ids and g.n == 4
        assert g.metadata["prompt_epoch"] == 0 and g.metadata["task"] == "reverse"
        assert [s.index for s in g.samples] == [0, 1, 2, 3]
        for s in g.samples:
            n = s.num_tokens
            assert 1 <= n <= task.max_new_tokens
            assert len(s.behaviour_logp) == n and len(s.token_versions) == n
            assert s.token_versions.tolist() == [0] * n  # the server's version
            assert np.all(s.behaviour_logp <= 0)
            assert s.reward == task.reward(p, s.output_ids.tolist())
            assert s.finish_reason in ("stop", "length")
        # distinct sampling seeds: the four samples are not all the same
    assert any(len({s.output_ids.tobytes() for s in g.samples}) > 1 for g in groups)
    snap = await gate(redis_url, run_name)
    assert (snap.admitted, snap.finished, snap.rejected, snap.inflight_total) == (6, 6, 0, 0)
    c = await connect(redis_url)
    try:
        src = PromptSource(c, run_name, task.prompts("train"), seed=3, worker_id="x", lease_ttl_s=1)
        assert (await src.state())["leases"] == {}
        # Eval of version 0 recorded (greedy and sampled), outside the stream and the gate.
        rec = json.loads((await c.hget(keys.eval_results(run_name), "0")).decode())
        assert rec["prompts"] == 4 and rec["worker"] == "w-fill"
        assert 0 <= rec["greedy_reward"] <= 1 and 0 <= rec["sampled_reward"] <= 1
        assert await c.xlen(keys.stream(run_name)) == 6
        m = await c.hgetall(keys.worker_metrics(run_name, "w-fill"))
        assert int(m[b"groups_pushed"]) == 6 and m[b"status"] == b"stopped"
    finally:
        await c.aclose()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["abort_all", "pause"])
async def test_weight_update_mid_generation_logprobs_match_recorded_versions(
    redis_url: str,
    run_name: str,
    models: tuple[Path, Path],
    server: ServerHandle,
    mode: str,
) -> None:
    """v1 is published while every sample is mid-generation: the samples span versions 0 and
    1, and every token's behaviour log-prob equals a transformers recomputation under the
    weights of the version the server recorded for that token."""
    long = 600
    cfg = config(
        redis_url,
        run_name,
        models[0],
        max_new_tokens=long,
        ignore_eos="true",
        n_samples=3,
        max_inflight_groups=2,
        update_mode=mode,
    )
    worker = await open_worker(cfg, make_servers([server.url]), worker_id="w-upd", max_groups=2)
    run = asyncio.create_task(worker.run())
    t0 = time.monotonic()
    while worker.inflight_requests() < 6:
        assert not run.done() and time.monotonic() - t0 < 20
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.15)  # some tokens into the samples (600 take ~0.6 s)
    assert worker.inflight_requests() == 6, "samples finished before the update could land"
    async with await VersionManager.open(redis_url, run_name) as vm:
        await vm.publish_weights(1, str(models[1]), "safetensors")
    assert await asyncio.wait_for(run, 60) == 2
    groups = await read_groups(redis_url, run_name, 2)
    samples = [(g, s) for g in groups for s in g.samples]
    assert len(samples) == 6
    spanning = 0
    for g, s in samples:
        v = s.token_versions
        assert s.num_tokens == long and len(s.behaviour_logp) == long
        assert np.all(np.diff(v) >= 0) and set(v.tolist()) <= {0, 1}
        spanning += int(v[0] == 0 and v[-1] == 1)
        prompt, out = g.prompt_ids.tolist(), s.output_ids.tolist()
        expected = np.where(
            v == 0,
            recompute_logprobs(models[0], prompt, out, 0.8),
            recompute_logprobs(models[1], prompt, out, 0.8),
        )
        np.testing.assert_allclose(s.behaviour_logp, expected, rtol=0, atol=1e-4)
    assert spanning == 6, "every sample was in flight at the update, so each spans v0 and v1"
    assert worker.counters.updates == 1 and worker.counters.interrupted_samples >= 6
    rec = worker.updates[-1]
    assert rec.version == 1 and rec.interrupted >= 6 and rec.reprefill_tokens > 6 * 7
    assert rec.latency_s is not None and rec.latency_s < 10


@pytest.mark.timeout(60)
async def test_worker_stops_at_gate_capacity(
    redis_url: str, run_name: str, models: tuple[Path, Path], server: ServerHandle
) -> None:
    """eta=0, B=2: capacity 2 at version 0; the worker pushes exactly 2 and waits; publishing
    v1 makes room for 2 more."""
    cfg = config(redis_url, run_name, models[0], "staleness.eta=0", "staleness.batch_groups=2")
    worker = await open_worker(cfg, make_servers([server.url]), worker_id="w-gate", max_groups=4)
    run = asyncio.create_task(worker.run())
    t0 = time.monotonic()
    while worker.counters.groups_pushed < 2:
        assert not run.done() and time.monotonic() - t0 < 20
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    snap = await gate(redis_url, run_name)
    assert (snap.admitted, snap.finished, snap.capacity) == (2, 2, 0)
    assert worker.counters.groups_pushed == 2 and worker.inflight_groups == 0
    assert worker.counters.gate_blocked_s > 0.5
    async with await VersionManager.open(redis_url, run_name) as vm:
        await vm.publish_weights(1, str(models[0]), "safetensors")
    assert await asyncio.wait_for(run, 30) == 4
    snap = await gate(redis_url, run_name)
    assert (snap.admitted, snap.finished, snap.rejected, snap.capacity) == (4, 4, 0, 0)
    groups = await read_groups(redis_url, run_name, 4)
    assert sorted(g.admission_version for g in groups) == [0, 0, 1, 1]


@pytest.mark.timeout(60)
async def test_reward_failures_reject_the_group_with_their_reason(
    redis_url: str, run_name: str, models: tuple[Path, Path], server: ServerHandle
) -> None:
    """rollout.reward_fn raising, returning NaN or outliving reward_timeout_s rejects the
    group: the slot goes back with the reason, the prompt is not served again this epoch."""
    cfg = config(
        redis_url,
        run_name,
        models[0],
        reward_fn="rollout_reward_fns:flaky",
        reward_timeout_s=0.3,
        n_samples=2,
    )
    worker = await open_worker(cfg, make_servers([server.url]), worker_id="w-rew", max_groups=4)
    assert await asyncio.wait_for(worker.run(), 40) == 4
    snap = await gate(redis_url, run_name)
    assert snap.admitted == 4 + snap.rejected and snap.inflight_total == 0
    assert set(snap.rejected_by) <= {"reward_error", "reward_nonfinite", "reward_timeout"}
    assert snap.rejected_by == worker.counters.rejected_by and snap.rejected >= 3
    groups = await read_groups(redis_url, run_name, 4)
    assert all(g.samples and g.samples[0].reward >= 0 for g in groups)
    by_id = {p.id: p for p in get_task("reverse").prompts("train")}
    assert all(by_id[g.prompt_id].answer[-1] % 4 == 3 for g in groups)
    c = await connect(redis_url)
    try:  # rejected prompts were released, not requeued
        assert await c.hlen(keys.prompts(run_name, "train", "holders")) == 0
        assert await c.llen(keys.prompts(run_name, "train", "requeue")) == 0
    finally:
        await c.aclose()


@pytest.mark.timeout(60)
async def test_weight_events_during_an_update_are_coalesced(
    redis_url: str, run_name: str, models: tuple[Path, Path], server: ServerHandle
) -> None:
    """Three publications in a burst: the worker ends on the newest, loading each server at
    most once per version and skipping what a newer event superseded."""
    cfg = config(redis_url, run_name, models[0], max_new_tokens=1000, ignore_eos="true")
    servers = make_servers([server.url])
    worker = await open_worker(cfg, servers, worker_id="w-coal", max_groups=1000)
    run = asyncio.create_task(worker.run())
    t0 = time.monotonic()
    while worker.inflight_requests() == 0:
        assert not run.done() and time.monotonic() - t0 < 20
        await asyncio.sleep(0.02)
    async with await VersionManager.open(redis_url, run_name) as vm:
        for v in (1, 2, 3):
            await vm.publish_weights(v, str(models[v % 2]), "safetensors")
    while worker.version != 3 or servers[0].version != 3:
        assert not run.done() and time.monotonic() - t0 < 30
        await asyncio.sleep(0.02)
    worker.request_stop()
    await asyncio.wait_for(run, 30)
    recs = worker.updates
    assert [r.version for r in recs] == sorted({r.version for r in recs}) and recs[-1].version == 3
    assert len(recs) + sum(r.coalesced for r in recs) == 3
    async with SGLangClient(server.url) as cl:
        assert await cl.weight_version() == 3
    snap = await gate(redis_url, run_name)
    assert snap.admitted == snap.finished + snap.rejected and snap.inflight_total == 0


@pytest.mark.timeout(90)
async def test_killed_server_its_samples_finish_on_the_other(
    redis_url: str,
    run_name: str,
    models: tuple[Path, Path],
    cpu_server_factory: Callable[..., ServerHandle],  # noqa: F811
) -> None:
    a = cpu_server_factory(models[0])
    b = cpu_server_factory(models[0])
    cfg = config(redis_url, run_name, models[0], max_new_tokens=200, ignore_eos="true")
    servers = make_servers([a.url, b.url])
    worker = await open_worker(cfg, servers, worker_id="w-srv", max_groups=6)
    run = asyncio.create_task(worker.run())
    t0 = time.monotonic()
    while not (servers[0].rids and servers[1].rids):
        assert not run.done() and time.monotonic() - t0 < 20
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert a.proc is not None
    a.proc.kill()  # SIGKILL, as a crash
    a.proc.wait()
    assert await asyncio.wait_for(run, 60) == 6
    snap = await gate(redis_url, run_name)
    assert (snap.admitted, snap.finished, snap.rejected) == (6, 6, 0)
    assert worker.counters.resubmitted_dead >= 1 and not servers[0].alive
    groups = await read_groups(redis_url, run_name, 6)
    assert all(s.num_tokens == 200 for g in groups for s in g.samples)


# ------------------------------------------------------------------ worker processes


def write_config(path: Path, cfg: SluiceConfig) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def start_worker(cfg_path: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "sluice", "rollout", "--config", str(cfg_path), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    finally:
        out.close()


async def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await cond()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.faults
@pytest.mark.timeout(120)
async def test_sigkill_worker_prompts_and_slots_come_back(
    redis_url: str,
    run_name: str,
    models: tuple[Path, Path],
    server: ServerHandle,
    tmp_path: Path,
) -> None:
    cfg = config(
        redis_url,
        run_name,
        models[0],
        max_new_tokens=400,
        ignore_eos="true",
        lease_ttl_s=2.0,
        heartbeat_ttl_s=2.0,
        n_samples=2,
        max_inflight_groups=3,
    )
    path = write_config(tmp_path / "run.yaml", cfg)
    a = start_worker(path, tmp_path / "a.log", "--servers", server.url, "--worker-id", "A")
    b: subprocess.Popen[bytes] | None = None
    c = await connect(redis_url)
    k_holders = keys.prompts(run_name, "train", "holders")

    async def holders() -> dict[str, str]:
        return {m.decode(): t.decode() for m, t in (await c.hgetall(k_holders)).items()}

    try:

        async def a_busy() -> Any:
            # Slots first, then each group leases its prompt: wait for both, so the kill finds
            # what this test is about (3 slots and 3 leases held by A).
            leased = [t for t in (await holders()).values() if t.startswith("A/")]
            return await holds(redis_url, run_name, "A") == 3 and len(leased) == 3

        await wait_for(a_busy, 30, "worker A to hold 3 slots and 3 prompt leases")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        killed_at = time.monotonic()
        held = {m for m, t in (await holders()).items() if t.startswith("A/")}
        assert len(held) == 3
        assert (await gate(redis_url, run_name)).inflight == {"A": 3}
        b = start_worker(path, tmp_path / "b.log", "--servers", server.url, "--worker-id", "B")

        async def pushed_by_b() -> Any:
            out = {}
            for _eid, fields in await c.xrange(keys.stream(run_name)):
                g = decode_group(fields[b"d"])
                out[f"{g.metadata['prompt_epoch']}:{g.metadata['prompt_pos']}"] = g
            return out if held <= set(out) else None

        groups = await wait_for(pushed_by_b, 30, "B to push groups for A's prompts")
        # Re-served once A's leases expired (TTL 2 s), before B's cursor went much further.
        assert time.monotonic() - killed_at < 2.0 + 8.0
        for m in held:
            assert groups[m].worker_id == "B" and groups[m].metadata["lease_source"] == "expired"

        async def reaped() -> Any:
            return (await gate(redis_url, run_name)).rejected_by.get("worker_dead") == 3

        await wait_for(reaped, 10, "A's 3 slots to be reaped")
        b.send_signal(signal.SIGTERM)
        assert b.wait(30) == 0, (tmp_path / "b.log").read_text()[-3000:]
        snap = await gate(redis_url, run_name)
        assert snap.admitted == snap.finished + snap.rejected and snap.inflight_total == 0
        assert snap.finished >= 3 and snap.rejected_by["worker_dead"] == 3
        assert all(not t.startswith("A/") for t in (await holders()).values())
    finally:
        await c.aclose()
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.faults
@pytest.mark.timeout(90)
async def test_sigterm_exits_clean(
    redis_url: str,
    run_name: str,
    models: tuple[Path, Path],
    server: ServerHandle,
    tmp_path: Path,
) -> None:
    cfg = config(redis_url, run_name, models[0], max_new_tokens=400, ignore_eos="true", n_samples=2)
    path = write_config(tmp_path / "run.yaml", cfg)
    w = start_worker(path, tmp_path / "w.log", "--servers", server.url, "--worker-id", "T")
    try:

        async def busy() -> Any:
            return await holds(redis_url, run_name, "T") == 4

        await wait_for(busy, 30, "the worker to hold 4 slots")
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0, (tmp_path / "w.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 30
        snap = await gate(redis_url, run_name)
        assert snap.admitted == snap.finished + snap.rejected and snap.inflight_total == 0
        assert snap.rejected_by.get("shutdown", 0) >= 1
        c = await connect(redis_url)
        try:
            assert await c.hlen(keys.prompts(run_name, "train", "holders")) == 0
            assert await c.zcard(keys.prompts(run_name, "train", "leases")) == 0
            m = await c.hgetall(keys.worker_metrics(run_name, "T"))
            assert m[b"status"] == b"stopped"
        finally:
            await c.aclose()
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()


@pytest.mark.faults
@pytest.mark.timeout(120)
async def test_cli_launch_restarts_crashed_server(
    redis_url: str, run_name: str, models: tuple[Path, Path], tmp_path: Path
) -> None:
    """``sluice rollout --launch 1``: kill the launched server; the worker relaunches it, loads
    the run's current weights (v1) into it and pushes every group."""
    cfg = config(redis_url, run_name, models[0], max_new_tokens=600, ignore_eos="true", n_samples=2)
    path = write_config(tmp_path / "run.yaml", cfg)
    async with await VersionManager.open(redis_url, run_name, eta=100, batch_groups=4) as vm:
        await vm.publish_weights(1, str(models[1]), "safetensors")
    w = start_worker(
        path,
        tmp_path / "w.log",
        "--launch",
        "1",
        "--engine",
        "cpu",
        "--max-groups",
        "6",
        "--worker-id",
        "L",
    )
    c = await connect(redis_url)
    k = keys.worker_metrics(run_name, "L")

    async def server_state() -> Any:
        raw = await c.hget(k, "servers")
        return json.loads(raw)[0] if raw is not None else None

    try:

        async def serving_v1() -> Any:
            srv = await server_state()
            return srv if srv and srv["version"] == 1 and srv["inflight"] else None

        first = await wait_for(serving_v1, 60, "the launched server to serve v1")
        os.kill(first["pid"], signal.SIGKILL)

        async def relaunched() -> Any:
            srv = await server_state()
            return srv if srv and srv["restarts"] == 1 and srv["alive"] else None

        again = await wait_for(relaunched, 60, "the worker to relaunch its server")
        assert again["pid"] != first["pid"] and again["version"] == 1
        assert w.wait(60) == 0, (tmp_path / "w.log").read_text()[-3000:]
        snap = await gate(redis_url, run_name)
        assert (snap.finished, snap.rejected, snap.inflight_total) == (6, 0, 0)
        groups = await read_groups(redis_url, run_name, 6)
        # v1 was loaded at start-up and again into the relaunched server: no token is v0.
        assert all(set(s.token_versions.tolist()) == {1} for g in groups for s in g.samples)
        with pytest.raises(ProcessLookupError):
            os.kill(again["pid"], 0)  # the worker stopped the server it launched
    finally:
        await c.aclose()
        if w.poll() is None:
            w.kill()
            w.wait()
