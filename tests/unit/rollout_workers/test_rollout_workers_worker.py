"""rollout_workers.worker on fakes (no Redis, no server): every admitted slot is finished or
handed back with its reason, the gate bounds what is admitted, the worker heart-beats while it
waits for its servers, leaves the liveness books when it stops, and follows the run's end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from rollout_fakes import (
    FakeBuffer,
    FakeEvals,
    FakePrompts,
    FakeRecords,
    FakeVersions,
    answer,
    client_of,
    server,
)

from rollout_workers import worker as worker_module
from rollout_workers.config import RolloutConfig
from rollout_workers.parts import RunInfo, WorkerParts
from rollout_workers.pool import Server, ServerState
from rollout_workers.tasks import Prompt, get_task
from rollout_workers.worker import RolloutWorker
from staleness.version_manager import RunFinished, WeightEvent

pytestmark = pytest.mark.timeout(20)

RUN = RunInfo(
    name="r", seed=3, redis_url="redis://unused", model_path="/w/v0", eta=100, batch_groups=2
)


@dataclass
class Rig:
    worker: RolloutWorker
    versions: FakeVersions
    buffer: FakeBuffer
    prompts: FakePrompts
    records: FakeRecords
    evals: FakeEvals
    closed: list[bool]


def rig(
    servers: list[Server] | None = None,
    *,
    versions: FakeVersions | None = None,
    max_groups: int | None = None,
    **rollout: Any,
) -> Rig:
    task = get_task("reverse")
    vs = versions or FakeVersions()
    buffer, prompts = FakeBuffer(), FakePrompts(list(task.prompts("train"))[:5])
    records, evals, closed = FakeRecords(), FakeEvals(), []

    async def close() -> None:
        closed.append(True)

    parts = WorkerParts(vs, buffer, prompts, records, evals, close)
    rc = RolloutConfig(**{"n_samples": 2, "max_inflight_groups": 2, **rollout})
    servers = servers or [server(state=ServerState.NEEDS_LOAD, version=None)]
    worker = RolloutWorker(parts, servers, rc, task, RUN, worker_id="w", max_groups=max_groups)
    return Rig(worker, vs, buffer, prompts, records, evals, closed)


async def until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.001)


def test_the_worker_needs_model_path_and_a_positive_max_groups() -> None:
    task, rc = get_task("reverse"), RolloutConfig()

    async def close() -> None:
        pass

    parts = WorkerParts(
        FakeVersions(), FakeBuffer(), FakePrompts([]), FakeRecords(), FakeEvals(), close
    )
    no_model = RunInfo("r", 0, "redis://x", "", 0, 1)
    with pytest.raises(ValueError, match=r"model\.path is empty"):
        RolloutWorker(parts, [server()], rc, task, no_model, worker_id="w")
    with pytest.raises(ValueError, match="max_groups must be >= 1"):
        RolloutWorker(parts, [server()], rc, task, RUN, worker_id="w", max_groups=0)


async def test_pushes_max_groups_and_finishes_every_slot() -> None:
    r = rig(max_groups=3, eval_every=1, eval_prompts=2)
    assert await r.worker.run() == 3
    vs = r.versions
    assert len(r.buffer.groups) == 3 and (vs.admitted, vs.finished, vs.rejected) == (3, 3, [])
    g = r.buffer.groups[0]
    assert g.worker_id == "w" and g.admission_version == 0 and g.n == 2
    assert all(s.token_versions.tolist() == [0, 0] for s in g.samples)
    assert set(r.prompts.released.values()) == {False}  # released, not requeued
    assert r.evals.records[0]["prompts"] == 2 and r.worker.counters.evals == 1
    assert r.worker.status == "stopped" and r.records.metrics[-1]["groups_pushed"] == 3
    assert r.closed == [True] and client_of(r.worker.servers[0]).closed
    assert vs.heartbeats >= 1


async def test_the_gate_bounds_what_is_admitted() -> None:
    r = rig(versions=FakeVersions(capacity=2), max_groups=4)
    run = asyncio.create_task(r.worker.run())
    await until(lambda: r.worker.counters.gate_waits >= 3)
    assert r.versions.admitted == 2 and r.worker.counters.groups_pushed == 2
    r.worker.request_stop()
    assert await run == 2


async def test_a_reward_failure_hands_the_slot_back_with_its_reason() -> None:
    r = rig(
        max_groups=1,
        reward_fn="rollout_fakes:reward_failing_on_p0",
        n_samples=1,
        max_inflight_groups=1,
    )
    r.prompts.prompts = [Prompt("p0", [1, 5], None), Prompt("p1", [1, 6], None)]
    assert await r.worker.run() == 1
    assert r.versions.rejected == ["reward_error"] and r.versions.finished == 1
    assert r.worker.counters.rejected_by == {"reward_error": 1}
    assert r.prompts.released == {"p0": False, "p1": False}  # a rejected prompt is not requeued


async def test_a_stop_hands_in_flight_slots_back_and_requeues_their_prompts() -> None:
    s = server(state=ServerState.NEEDS_LOAD, version=None)
    client_of(s).generate_gate = asyncio.Event()  # generation that never ends
    r = rig([s], shutdown_grace_s=0.1)
    run = asyncio.create_task(r.worker.run())
    await until(lambda: r.worker.inflight_requests() == 4)
    r.worker.request_stop()
    assert await run == 0
    assert r.versions.rejected == ["shutdown", "shutdown"] and r.versions.finished == 0
    assert set(r.prompts.released.values()) == {True}
    assert sum(c.startswith("abort:") for c in client_of(s).calls) == 4


async def test_a_group_past_eta_is_cancelled_and_handed_back_as_cancelled_stale() -> None:
    s = server(state=ServerState.NEEDS_LOAD, version=None)
    client_of(s).generate_gate = asyncio.Event()
    vs = FakeVersions(eta=0, capacity=1)
    r = rig([s], versions=vs, n_samples=1, shutdown_grace_s=0.1)
    run = asyncio.create_task(r.worker.run())
    await until(lambda: r.worker.inflight_requests() == 1)
    vs.current = 1
    vs.queue.put_nowait(WeightEvent(1, "/w/v1", "safetensors", 0.0))
    await until(lambda: r.versions.rejected == ["cancelled_stale"])
    assert r.worker.counters.cancelled_stale == 1 and r.worker.metrics()["doomed_groups"] == 1
    assert list(r.prompts.released.values()) == [True]  # its prompt is served again
    r.worker.request_stop()
    await run
    assert r.versions.admitted == len(r.versions.rejected) + r.versions.finished


async def test_the_worker_heartbeats_while_it_waits_for_its_servers() -> None:
    s = server(state=ServerState.NEEDS_LOAD, version=None)
    client_of(s).healthy = False
    r = rig([s], max_groups=2, heartbeat_ttl_s=0.3, metrics_interval_s=0.05, server_wait_s=60)
    run = asyncio.create_task(r.worker.run())
    await until(lambda: r.versions.heartbeats >= 4)  # the first one, then every 0.1 s
    await until(lambda: len(r.records.metrics) >= 2)
    assert r.worker.status == "starting" and r.versions.admitted == 0 and not run.done()
    assert r.records.metrics[-1]["status"] == "starting"  # sluice status sees it waiting
    client_of(s).healthy = True
    assert await run == 2
    assert r.versions.deregistered == ["w"]  # a clean stop leaves the liveness books
    assert r.records.metrics[-1]["status"] == "stopped"


async def test_the_end_of_the_run_stops_the_worker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_module, "RUN_END_POLL_S", 0.02)
    caplog.set_level(logging.INFO, logger="sluice.rollout")
    vs = FakeVersions(capacity=2)
    r = rig(versions=vs)
    run = asyncio.create_task(r.worker.run())
    await until(lambda: r.worker.counters.gate_waits >= 2)  # blocked at the gate
    vs.finished_mark = RunFinished(step=7, version=3, time=100.5)
    assert await run == 2
    assert r.worker.run_finished == vs.finished_mark and r.worker.status == "stopped"
    assert vs.admitted == vs.finished == 2 and vs.deregistered == ["w"]
    assert "run r finished at step 7: worker exits" in caplog.messages


async def test_a_run_finished_before_the_worker_started_is_waited_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started in any order with a resumed trainer: the old mark does not stop the worker; the
    trainer clears it, and the mark of the run's next end does."""
    monkeypatch.setattr(worker_module, "RUN_END_POLL_S", 0.02)
    vs = FakeVersions(capacity=2)
    vs.finished_mark = RunFinished(step=5, version=2, time=50.0)
    r = rig(versions=vs)
    run = asyncio.create_task(r.worker.run())
    await until(lambda: r.worker.counters.gate_waits >= 2)
    await asyncio.sleep(0.15)  # several polls of the mark
    assert not run.done()
    vs.finished_mark = None  # `sluice train --resume`
    vs.capacity = 3
    await until(lambda: r.worker.counters.groups_pushed == 3)
    vs.finished_mark = RunFinished(step=9, version=4, time=80.0)
    assert await run == 3
    assert r.worker.run_finished == vs.finished_mark


async def test_with_on_run_finished_wait_the_worker_stays_for_the_next_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_module, "RUN_END_POLL_S", 0.02)
    caplog.set_level(logging.INFO, logger="sluice.rollout")
    vs = FakeVersions(capacity=2)
    r = rig(versions=vs, on_run_finished="wait")
    run = asyncio.create_task(r.worker.run())
    await until(lambda: r.worker.counters.gate_waits >= 2)
    vs.finished_mark = RunFinished(step=7, version=3, time=100.5)
    await until(lambda: any("waits for it to start again" in m for m in caplog.messages))
    await asyncio.sleep(0.1)
    assert not run.done() and r.worker.run_finished is None
    vs.finished_mark, vs.capacity = None, 4  # the run starts again
    await until(lambda: r.worker.counters.groups_pushed == 4)
    r.worker.request_stop()
    assert await run == 4


@pytest.mark.parametrize("given", [False, True])
async def test_ipc_offers_given_servers_only_when_asked_and_only_loopback(given: bool) -> None:
    """weight_sync=ipc: a worker offers the trainer the servers it launched; --servers URLs only
    with rollout.ipc_given_servers, and then only loopback ones (the hand-over maps the
    trainer's memory into the server)."""
    import dataclasses

    task = get_task("reverse")
    offered: list[str] = []

    class Versions(FakeVersions):
        async def register_sync_servers(self, worker_id: str, urls: list[str], **kw: Any) -> None:
            assert kw["kind"] == "ipc"
            offered.extend(urls)
            await super().register_sync_servers(worker_id, urls, **kw)

    vs = Versions()

    async def close() -> None:
        pass

    parts = WorkerParts(vs, FakeBuffer(), FakePrompts(list(task.prompts("train"))[:2]),
                        FakeRecords(), FakeEvals(), close)  # fmt: skip
    rc = RolloutConfig(n_samples=2, max_inflight_groups=1, ipc_given_servers=given)
    servers = [server("http://127.0.0.1:30001"), server("http://10.1.2.3:30002")]
    run = dataclasses.replace(RUN, ipc=True)
    worker = RolloutWorker(parts, servers, rc, task, run, worker_id="w", max_groups=1)
    assert await worker.run() == 1
    assert offered == (["http://127.0.0.1:30001"] if given else [])
    assert vs.registered == []  # withdrawn when the worker stopped


def test_loopback_urls() -> None:
    lo = worker_module._loopback
    assert lo("http://127.0.0.1:1") and lo("http://localhost:2") and lo("http://[::1]:3")
    assert not lo("http://10.0.0.1:1") and not lo("http://example.com:1")


async def test_dynamic_sampling_hands_zero_variance_groups_back_and_counts_them() -> None:
    # Every sample answers [5, 2]: equal rewards, no GRPO signal -> never pushed.
    r = rig(
        dynamic_sampling=True,
        n_samples=2,
        max_inflight_groups=1,
        reward_fn="rollout_fakes:reward_by_length",
    )
    run = asyncio.create_task(r.worker.run())
    await until(lambda: r.worker.counters.filtered_groups >= 3)
    # Then a group whose two samples differ in length, so in reward: pushed.
    c = client_of(r.worker.servers[0])
    c.answers = [answer([5, 2], [0, 0]), answer([5, 5, 2], [0, 0, 0])]
    await until(lambda: r.worker.counters.groups_pushed >= 1)
    r.worker.request_stop()
    await run
    vs, cnt = r.versions, r.worker.counters
    filtered = vs.rejected.count("zero_variance")
    assert filtered == cnt.filtered_groups == cnt.rejected_by["zero_variance"] >= 3
    assert len(r.records.filtered) == filtered
    assert all(n == 2 for n, _ in r.records.filtered)
    # Every admitted slot is finished or handed back (shutdown ones included).
    assert vs.admitted == vs.finished + len(vs.rejected)
    assert vs.finished == len(r.buffer.groups) == cnt.groups_pushed
    assert len({s.reward for s in r.buffer.groups[0].samples}) == 2
    assert r.records.metrics[-1]["filtered_groups"] == filtered


async def test_dynamic_sampling_off_pushes_equal_reward_groups() -> None:
    r = rig(dynamic_sampling=False, max_groups=2)
    assert await r.worker.run() == 2
    assert r.worker.counters.filtered_groups == 0 and r.versions.rejected == []
