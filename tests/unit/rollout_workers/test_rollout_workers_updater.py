"""rollout_workers.updater (and inflight): coalescing, cancelling past eta, loads, bring-up,
the distributed receive; fake servers and a fake version source."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

import pytest
from rollout_fakes import FakeRecords, FakeVersions, client_of, server

from inference.protocol import InferenceError, ServerDead
from rollout_workers.inflight import InFlight
from rollout_workers.metrics import Counters
from rollout_workers.pool import Server, ServerPool, ServerState
from rollout_workers.updater import WeightUpdater
from staleness.version_manager import WeightEvent
from weights.plan import FMT_ANNOUNCE, FMT_DONE, SyncPlan

pytestmark = pytest.mark.timeout(10)


def ev(v: int, fmt: str = "safetensors", location: str | None = None) -> WeightEvent:
    return WeightEvent(v, location or f"/w/v{v}", fmt, 0.0)


def make(
    servers: list[Server],
    versions: FakeVersions | None = None,
    *,
    mode: Literal["abort_all", "pause"] = "abort_all",
) -> tuple[WeightUpdater, FakeVersions, InFlight, Counters, FakeRecords, list[int]]:
    vs = versions or FakeVersions()
    groups, counters, records = InFlight(), Counters(), FakeRecords()
    serving: list[int] = []
    up = WeightUpdater(
        ServerPool(servers),
        vs,
        groups,
        counters,
        worker_id="w",
        model_path="/w/v0",
        update_mode=mode,
        store_update=records.store_update,
        on_serving=serving.append,
    )
    return up, vs, groups, counters, records, serving


async def until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0)


async def test_events_during_an_update_are_coalesced_to_the_newest() -> None:
    s = server(version=0)
    c = client_of(s)
    c.load_gate = asyncio.Event()
    up, vs, _, counters, records, serving = make([s])
    loops = [asyncio.create_task(up.watch_events()), asyncio.create_task(up.run())]
    try:
        vs.queue.put_nowait(ev(1))
        await c.load_started.wait()  # v1 is loading: v2 and v3 arrive meanwhile
        vs.queue.put_nowait(ev(2))
        vs.queue.put_nowait(ev(3))
        await until(lambda: counters.events_seen == 3)
        c.load_gate.set()
        await until(lambda: len(up.updates) == 2 and s.state is ServerState.UP)
    finally:
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    assert [v for _, v in c.loads] == [1, 3]  # v2 was never loaded
    assert [(r.version, r.from_version, r.coalesced) for r in up.updates] == [(1, 0, 0), (3, 1, 1)]
    assert [r["version"] for r in records.updates] == [1, 3] and serving == [1, 3]
    assert counters.updates == 2 and up.version == 3


async def test_an_update_cancels_exactly_the_groups_past_eta() -> None:
    s = server(version=0)
    up, _, groups, counters, _, _ = make([s], FakeVersions(eta=1))
    never = asyncio.Event()

    async def generating() -> None:
        await never.wait()

    tasks = {v: asyncio.create_task(generating()) for v in (0, 1, 2, 3)}
    for v, t in tasks.items():
        groups.add(t, v)
    await up.apply(ev(3), received=0.0)
    await asyncio.sleep(0)
    # v3 - 0 = 3 and v3 - 1 = 2 are past eta 1; v3 - 2 = 1 is not.
    assert {v for v, t in tasks.items() if t.cancelled()} == {0, 1}
    assert counters.cancelled_stale == 2
    assert all(groups.cancelled_stale(tasks[v]) for v in (0, 1))
    await up.apply(ev(4), received=0.0)  # v4 - 2 = 2 > 1: one more; the others count once
    await asyncio.sleep(0)
    assert counters.cancelled_stale == 3 and tasks[2].cancelled() and not tasks[3].done()
    for t in tasks.values():
        groups.done(t)
        t.cancel()
    assert len(groups) == 0


async def test_a_failed_load_leaves_the_server_needing_one_and_a_dead_one_dead() -> None:
    a, b, c = server("http://a"), server("http://b"), server("http://c")
    client_of(a).fail_load = InferenceError(500, "oom", "/update_weights_from_disk")
    client_of(b).fail_load = ServerDead("gone")
    up, *_ = make([a, b, c])
    rec = await up.apply(ev(1), received=0.0)
    assert (rec.servers, rec.failed) == (3, 2)
    assert (a.state, b.state, c.state) == (
        ServerState.NEEDS_LOAD,
        ServerState.DEAD,
        ServerState.UP,
    )
    assert client_of(c).calls == ["load:v1:abort=True"] and c.version == 1


async def test_pause_mode_pauses_loads_and_continues() -> None:
    s = server()
    up, *_ = make([s], mode="pause")
    await up.apply(ev(1), received=0.0)
    assert client_of(s).calls == ["pause:abort", "load:v1:abort=False", "resume"]


async def test_bring_up_loads_only_what_the_server_lacks() -> None:
    current, behind = server("http://current"), server("http://behind")
    up, vs, *_ = make([current, behind])
    vs.latest = ev(2)
    await up.start()
    client_of(current).version = 2
    for s in (current, behind):
        s.state = ServerState.NEEDS_LOAD
        await up.bring_up(s)
    assert client_of(current).loads == [] and current.state is ServerState.UP
    assert client_of(behind).loads == [("/w/v2", 2)] and behind.state is ServerState.UP
    behind.mixed = True  # a broadcast failed part-way: its label cannot be trusted
    behind.state = ServerState.NEEDS_LOAD
    await up.bring_up(behind)
    assert client_of(behind).loads == [("/w/v2", 2), ("/w/v2", 2)] and not behind.mixed
    client_of(current).dead = True
    await up.bring_up(current)
    assert current.state is ServerState.DEAD


def plan(version: int, *, init: bool, urls: list[str], group: str = "g1") -> SyncPlan:
    return SyncPlan(
        version=version,
        group=group,
        master_addr="127.0.0.1",
        master_port=29500,
        world_size=1 + len(urls),
        ranks={u: i + 1 for i, u in enumerate(urls)},
        init=init,
        buckets=[{"names": ["a"], "dtypes": ["float32"], "shapes": [[2]]}] * 3,
        timeout_s=5.0,
    )


async def test_a_broadcast_is_received_bucket_by_bucket_by_members_only() -> None:
    member, outsider = server("http://m", version=0), server("http://o", version=0)
    up, vs, *_ = make([member, outsider])
    first = plan(1, init=True, urls=["http://m"])
    rec = await up.apply(ev(1, FMT_ANNOUNCE, first.to_json()), received=0.0)
    c = client_of(member)
    assert c.calls == ["pause:abort", "join:g1:rank=1", "resume"]
    assert c.buckets == [("g1", 0), ("g1", 0), ("g1", 1)]  # the label moves with the last
    assert (member.group, member.version, member.mixed) == ("g1", 1, False)
    assert (rec.failed, outsider.state) == (1, ServerState.NEEDS_LOAD)  # caught up from disk
    client_of(member).fail_load = InferenceError(500, "nccl", "/update_weights_from_distributed")
    await up.apply(ev(2, FMT_ANNOUNCE, plan(2, init=False, urls=["http://m"]).to_json()), 0.0)
    assert (member.group, member.mixed, member.state) == (None, True, ServerState.NEEDS_LOAD)
    vs.disk = ev(2)  # the trainer's fallback copy: a mixed server reloads it
    await up.bring_up(member)
    assert (member.version, member.mixed, member.state) == (2, False, ServerState.UP)
    bad = await up.apply(ev(3, FMT_ANNOUNCE, "not json"), received=0.0)
    assert bad.failed == 1 and member.state is ServerState.NEEDS_LOAD


async def test_a_missed_broadcast_is_caught_up_from_the_latest_disk_copy() -> None:
    s = server(version=1)
    up, vs, *_ = make([s])
    vs.disk = None
    await up.apply(ev(2, FMT_DONE, "group:g1"), received=0.0)
    # No disk copy yet: model.path (v0) is older than what the server holds (complete v1
    # weights): never loaded over them (seen on an H200: a catch-up to v0 left a server
    # behind a version the gate had admitted against, and the run stalled).
    assert client_of(s).loads == [] and s.version == 1
    assert up.behind(s)  # the health loop keeps trying while a newer copy is missing
    await up.bring_up(s)
    assert client_of(s).loads == [] and s.version == 1
    vs.disk = ev(2)
    await up.bring_up(s)
    assert s.version == 2 and not up.behind(s)
    assert client_of(s).loads == [("/w/v2", 2)]


async def test_a_mixed_server_is_reloaded_even_from_an_older_copy() -> None:
    """A transfer that failed part-way leaves a mix of two versions: any complete copy is
    better, an older one included."""
    s = server(version=1)
    s.mixed = True
    up, vs, *_ = make([s])
    vs.disk = None
    await up.apply(ev(2, FMT_DONE, "group:g1"), received=0.0)
    assert client_of(s).loads == [("/w/v0", 0)]


async def test_no_catch_up_while_an_update_is_applied() -> None:
    """While an update is applied its transfer brings the servers up: the health loop's
    catch-up must not take the server first and load an older copy."""
    s = server(version=1)
    up, vs, *_ = make([s])
    vs.disk = None
    up.weights, up.version = ev(2, FMT_DONE, "group:g1"), 2
    assert up.behind(s)
    up._applying = True
    assert not up.behind(s)


async def test_catch_up_to_loads_a_version_the_gate_admitted_against() -> None:
    s = server(version=0)
    up, vs, *_ = make([s])
    loop = asyncio.create_task(up.run())
    try:
        await up.catch_up_to(0)
        vs.latest = ev(1)
        await up.catch_up_to(1)
        await until(lambda: s.version == 1)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert up.version == 1 and client_of(s).loads == [("/w/v1", 1)]


async def test_a_server_labelled_by_another_run_is_loaded_over() -> None:
    """Version labels are a run's own: a server still labelled v1 by an earlier run, joining a
    run at v0 (disk weights), loads v0; with distributed/ipc weights a label above the run's
    version is not 'newer weights of this run' either."""
    s = server(version=1)
    up, *_ = make([s])
    await up.bring_up(s)  # the run is at v0 (model.path)
    assert client_of(s).loads == [("/w/v0", 0)] and s.version == 0

    s2 = server(version=7)
    up2, vs2, *_ = make([s2])
    vs2.disk = ev(2)
    up2.weights, up2.version = ev(3, FMT_DONE, "group:g1"), 3
    await up2.bring_up(s2)
    assert client_of(s2).loads == [("/w/v2", 2)]
