"""``VersionManager`` against a real, private redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from contextlib import aclosing
from itertools import pairwise
from typing import Any

import pytest
from gate_model import Counters, GateBackend, GateMachine
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from buffer import keys
from buffer.connection import connect
from procs import RedisServer
from staleness import (
    RunNotFound,
    RunSettingsMismatch,
    VersionError,
    VersionManager,
    WeightEvent,
    list_runs,
)
from staleness.version_manager import REQUEST_TTL_S, Admission

pytestmark = pytest.mark.timeout(60)


async def test_open_creates_then_checks_settings(redis_url: str, run_name: str) -> None:
    with pytest.raises(RunNotFound, match=run_name):
        await VersionManager.open(redis_url, run_name)
    async with await VersionManager.open(redis_url, run_name, eta=2, batch_groups=8) as vm:
        assert (vm.eta, vm.batch_groups) == (2, 8)
        assert await vm.version() == 0
    # None reads the run's values
    async with await VersionManager.open(redis_url, run_name) as vm:
        assert (vm.eta, vm.batch_groups) == (2, 8)
    with pytest.raises(RunSettingsMismatch, match=r"eta=2 .*eta=3"):
        await VersionManager.open(redis_url, run_name, eta=3, batch_groups=8)
    with pytest.raises(RunSettingsMismatch, match=r"batch_groups=8 .*batch_groups=4"):
        await VersionManager.open(redis_url, run_name, eta=2, batch_groups=4)
    with pytest.raises(ValueError, match="eta"):
        await VersionManager.open(redis_url, run_name, eta=-1, batch_groups=8)
    client = await connect(redis_url)
    try:
        assert run_name in await list_runs(client)
    finally:
        await client.aclose()


async def test_admission_follows_the_formula(redis_url: str, run_name: str) -> None:
    async with await VersionManager.open(redis_url, run_name, eta=1, batch_groups=3) as vm:
        # capacity (0 + 1 + 1) * 3 - 0 = 6
        assert await vm.try_admit("a", 4) == 4
        assert await vm.try_admit("b", 4) == 2
        assert await vm.try_admit("b", 1) == 0
        # a rejected slot comes back; finished ones do not
        assert await vm.reject("a", 1, "reward_filter") == 1
        assert await vm.finish("a", 3) == 3
        assert await vm.try_admit("b", 5) == 1
        # a new version opens one more batch: (1 + 1 + 1) * 3 - (7 - 1) = 3
        await vm.publish_weights(1, "/w/1")
        assert await vm.try_admit("c", 5) == 3
        # the trainer drops 2 over-stale finished groups: their slots come back
        assert await vm.drop(2, "stale") == 2
        assert await vm.try_admit("c", 5) == 2
        s = await vm.snapshot()
        assert (s.version, s.admitted, s.finished, s.rejected, s.capacity) == (1, 12, 1, 3, 0)
        assert s.inflight == {"b": 3, "c": 5} and s.inflight_total == 8
        assert s.rejected_by == {"reward_filter": 1, "stale": 2}
        assert s.admitted == s.finished + s.rejected + s.inflight_total
        # finishing more than held is clamped and counted as late
        assert await vm.finish("b", 5) == 3
        s = await vm.snapshot()
        assert s.late == 2 and s.finished == 4 and "b" not in s.inflight
        assert s.admitted == s.finished + s.rejected + s.inflight_total
        with pytest.raises(ValueError, match="n=-1"):
            await vm.try_admit("a", -1)
        with pytest.raises(ValueError, match="worker id"):
            await vm.try_admit("", 1)


async def test_set_eta_takes_effect_at_next_admission(redis_url: str, run_name: str) -> None:
    async with await VersionManager.open(redis_url, run_name, eta=0, batch_groups=2) as vm:
        assert await vm.try_admit("a", 5) == 2
        other = await VersionManager.open(redis_url, run_name)
        try:
            assert await other.set_eta(2) == 0
        finally:
            await other.close()
        # (0 + 2 + 1) * 2 - 2 = 4
        assert await vm.try_admit("a", 5) == 4
        assert (await vm.snapshot()).eta == 2
        # the old value is now a mismatch for a process that starts with it
        with pytest.raises(RunSettingsMismatch, match="set-eta"):
            await VersionManager.open(redis_url, run_name, eta=0, batch_groups=2)


async def test_inflight_book_by_admission_version_and_token_waste(
    redis_url: str, run_name: str
) -> None:
    async with await VersionManager.open(redis_url, run_name, eta=1, batch_groups=2) as vm:
        assert await vm.admit("a", 3) == Admission(3, 0)
        await vm.publish_weights(1, "/w/1")
        assert await vm.admit("b", 1) == Admission(1, 1)
        assert await vm.admit("a", 1) == Admission(1, 1)
        assert await vm.inflight_by_version() == {0: 3, 1: 2}
        # a finish naming its version leaves that version; one that does not, the oldest
        assert await vm.finish("a", 1, version=1, tokens=40) == 1
        assert await vm.reject("a", 1, "cancelled_stale", tokens=7) == 1
        assert await vm.inflight_by_version() == {0: 2, 1: 1}
        assert await vm.drop(1, "stale", tokens=40) == 1
        w = await vm.waste()
        assert w.tokens == {"pushed": 40, "rejected:cancelled_stale": 7, "dropped:stale": 40}
        assert (w.generated_tokens, w.wasted_tokens) == (47, 47)
        assert w.groups == {"cancelled_stale": 1, "stale": 1}
        # b dies: its entries leave the book with it
        await vm.heartbeat("b", ttl=0.05)
        await asyncio.sleep(0.1)
        assert (await vm.reap()) == {"b": 1}
        assert await vm.inflight_by_version() == {0: 2}
        snap = await vm.snapshot()
        assert snap.admitted == snap.finished + snap.rejected + snap.inflight_total


async def test_narrowed_admission_then_the_bound_and_the_change_log(
    redis_url: str, run_name: str
) -> None:
    async with await VersionManager.open(redis_url, run_name, eta=2, batch_groups=1) as vm:
        await vm.narrow_admission(0, why={"rule": "down"})
        assert await vm.admit("a", 5) == Admission(1, 0)  # (0 + 0 + 1) * 1: the narrowed gate
        assert (await vm.snapshot()).eta == 2  # the bound has not moved
        assert (await vm.waste()).refused == 1  # asked 5, got 1
        assert await vm.set_eta(0, why={"rule": "down", "idle_share": 0.001}) == 2
        snap = await vm.snapshot()
        assert (snap.eta, snap.eta_admit) == (0, None)
        await vm.set_eta(3)  # a change without measurements is not an auto change: not logged
        changes = await vm.eta_changes()
        assert [c.get("admit", c.get("to")) for c in changes] == [0, 0]
        assert changes[1]["from"] == 2 and changes[1]["idle_share"] == 0.001
        await vm.set_eta_auto({"eta_max": 4})
        assert (await vm.snapshot()).eta_auto == {"eta_max": 4}


@pytest.mark.timeout(90)
async def test_concurrent_admissions_admit_exactly_capacity(redis_url: str, run_name: str) -> None:
    eta, b = 2, 97
    capacity = (0 + eta + 1) * b  # 291
    vms = [
        await VersionManager.open(redis_url, run_name, eta=eta, batch_groups=b) for _ in range(20)
    ]
    try:
        asks = [1 + i % 3 for i in range(1000)]  # 2,000 slots asked for, 291 available
        got = await asyncio.gather(
            *(vms[i % 20].try_admit(f"w{i % 50}", n) for i, n in enumerate(asks))
        )
        assert sum(got) == capacity
        assert all(0 <= k <= n for k, n in zip(got, asks, strict=True))
        # the gate is one atomic step: at most one call is cut short, all later ones get 0
        assert sum(1 for k, n in zip(got, asks, strict=True) if 0 < k < n) <= 1
        s = await vms[0].snapshot()
        assert s.admitted == capacity and s.inflight_total == capacity and s.capacity == 0
        assert s.admitted == s.finished + s.rejected + s.inflight_total
    finally:
        for vm in vms:
            await vm.close()


async def test_reap_returns_a_dead_workers_slots(redis_url: str, run_name: str) -> None:
    async with await VersionManager.open(redis_url, run_name, eta=0, batch_groups=4) as vm:
        await vm.heartbeat("dying", ttl=0.8)
        await vm.heartbeat("alive", ttl=30)
        assert await vm.try_admit("dying", 3) == 3
        assert await vm.try_admit("alive", 3) == 1
        assert await vm.try_admit("alive", 1) == 0
        assert await vm.reap() == {}  # nobody has expired yet
        await asyncio.sleep(1.0)
        assert await vm.reap() == {"dying": 3}
        assert await vm.reap() == {}  # returned once
        s = await vm.snapshot()
        assert s.rejected_by == {"worker_dead": 3} and s.inflight == {"alive": 1}
        assert [w.id for w in s.workers] == ["alive"] and s.workers[0].alive
        assert s.admitted == s.finished + s.rejected + s.inflight_total
        # the gate admits again
        assert await vm.try_admit("alive", 5) == 3
        # the "dead" worker was only slow: its late finish does not break the counters
        assert await vm.finish("dying", 1) == 0
        s = await vm.snapshot()
        assert s.late == 1 and s.admitted == s.finished + s.rejected + s.inflight_total


async def test_an_admission_renews_an_expired_heartbeat(redis_url: str, run_name: str) -> None:
    """A worker whose heartbeat lapsed (not reaped yet) and asks for room is alive: its new
    slots are not reaped as a dead worker's."""
    await (await VersionManager.open(redis_url, run_name, eta=0, batch_groups=4)).close()
    async with await VersionManager.open(redis_url, run_name, default_worker_ttl=5.0) as vm:
        await vm.heartbeat("w", ttl=0.2)
        await asyncio.sleep(0.3)
        assert not (await vm.snapshot()).workers[0].alive
        assert await vm.try_admit("w", 2) == 2
        w = (await vm.snapshot()).workers[0]
        assert w.alive and w.expires_in > 4.0 and w.seconds_since_heartbeat < 1.0
        assert await vm.reap() == {}
        await vm.heartbeat("w", ttl=60)  # a live heartbeat is not shortened by an admission
        assert await vm.try_admit("w", 1) == 1
        assert (await vm.snapshot()).workers[0].expires_in > 50


async def test_deregister_removes_a_worker_that_holds_no_slot(
    redis_url: str, run_name: str
) -> None:
    async with await VersionManager.open(redis_url, run_name, eta=0, batch_groups=4) as vm:
        await vm.heartbeat("a", ttl=30)
        await vm.heartbeat("b", ttl=30)
        assert await vm.try_admit("a", 2) == 2
        assert await vm.deregister("a") == 2  # holds slots: stays, for reap
        assert [w.id for w in (await vm.snapshot()).workers] == ["a", "b"]
        await vm.finish("a", 1)
        await vm.reject("a", 1, "shutdown")
        assert await vm.deregister("a") == 0
        s = await vm.snapshot()
        assert [w.id for w in s.workers] == ["b"] and s.inflight == {}
        assert s.admitted == s.finished + s.rejected + s.inflight_total
        assert await vm.reap() == {}  # a deregistered worker is not "dead"
        assert await vm.deregister("never-seen") == 0


async def test_finished_mark_is_set_read_and_cleared(redis_url: str, run_name: str) -> None:
    async with await VersionManager.open(redis_url, run_name, eta=1, batch_groups=2) as vm:
        assert await vm.run_finished() is None
        assert await vm.clear_finished() is None
        await vm.publish_weights(3, "/w/v3")
        first = await vm.mark_finished(12)
        assert (first.step, first.version) == (12, 3) and first.time > 0
        assert await vm.run_finished() == first
        assert await vm.clear_finished() == first
        assert await vm.run_finished() is None
        second = await vm.mark_finished(12)  # the same step again: a different mark
        assert second != first and second.time > first.time
        with pytest.raises(ValueError, match="step"):
            await vm.mark_finished(-1)


async def test_worker_that_never_heartbeats_is_reaped_after_default_ttl(
    redis_url: str, run_name: str
) -> None:
    await (await VersionManager.open(redis_url, run_name, eta=0, batch_groups=2)).close()
    async with await VersionManager.open(redis_url, run_name, default_worker_ttl=0.2) as vm:
        assert await vm.try_admit("silent", 2) == 2
        assert [w.id for w in (await vm.snapshot()).workers] == ["silent"]
        await asyncio.sleep(0.3)
        assert await vm.reap() == {"silent": 2}
        assert await vm.try_admit("next", 2) == 2


async def test_publish_versions_only_increase(redis_url: str, run_name: str) -> None:
    async with await VersionManager.open(redis_url, run_name, eta=1, batch_groups=1) as vm:
        assert await vm.latest_weights() is None
        await vm.publish_weights(1, "/w/1")
        await vm.publish_weights(3, "/w/3", "safetensors")
        with pytest.raises(
            VersionError, match="cannot publish version 3: the current version is 3"
        ):
            await vm.publish_weights(3, "/w/3b")
        with pytest.raises(VersionError, match="version 2"):
            await vm.publish_weights(2, "/w/2")
        latest = await vm.latest_weights()
        assert latest is not None and (latest.version, latest.location, latest.fmt) == (
            3,
            "/w/3",
            "safetensors",
        )
        assert await vm.version() == 3


async def test_retried_mutation_is_applied_once(redis_url: str, run_name: str) -> None:
    # A retry after a lost reply re-sends the same request id: the script returns the stored
    # result and admits (or publishes) nothing twice.
    async with await VersionManager.open(redis_url, run_name, eta=0, batch_groups=5) as vm:
        req = keys.request(run_name, "fixed")
        admit_keys = [
            vm.k_settings,
            vm.k_gate,
            vm.k_inflight,
            vm.k_expiry,
            vm.k_seen,
            req,
            vm.k_inflight_at,
        ]
        for _ in range(2):
            got = await vm._call(vm._admit, admit_keys, ["w", 3, 30000, REQUEST_TTL_S], what="t")
            assert got == [3, 0]  # 3 slots, admitted at version 0
        assert (await vm.snapshot()).admitted == 3
        assert await vm.inflight_by_version() == {0: 3}
        pub = keys.request(run_name, "pub")
        pub_keys = [vm.k_settings, vm.k_gate, vm.k_weights, vm.k_events, pub]
        ids = [
            await vm._call(vm._publish, pub_keys, [1, "/w/1", "st", 100, REQUEST_TTL_S], what="p")
            for _ in range(2)
        ]
        assert ids[0] == ids[1] and await vm.version() == 1


async def _collect(vm: VersionManager, after: int | None, want: int, out: list[int]) -> None:
    async with aclosing(vm.events(after=after, block_ms=200)) as events:
        async for ev in events:
            assert isinstance(ev, WeightEvent)
            out.append(ev.version)
            if ev.version >= want:
                return


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def test_events_reach_two_subscribers_in_order(redis_url: str, run_name: str) -> None:
    pub = await VersionManager.open(redis_url, run_name, eta=1, batch_groups=1)
    subs = [await VersionManager.open(redis_url, run_name) for _ in range(2)]
    try:
        got: list[list[int]] = [[], []]
        tasks = [asyncio.create_task(_collect(s, 0, 6, g)) for s, g in zip(subs, got, strict=True)]
        await pub.publish_weights(1, "/w/1")
        await _until(lambda: all(g == [1] for g in got))
        for v in range(2, 7):
            await pub.publish_weights(v, f"/w/{v}")
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert got == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]
        # a subscriber that was away since version 2 gets the latest first, not 3, 4, 5
        late: list[int] = []
        await asyncio.wait_for(_collect(subs[0], 2, 6, late), 10)
        assert late == [6]
        # after=None starts from whatever is current
        now: list[int] = []
        await asyncio.wait_for(_collect(subs[1], None, 6, now), 10)
        assert now == [6]
    finally:
        for vm in (pub, *subs):
            await vm.close()


@pytest.mark.timeout(60)
async def test_events_survive_a_redis_restart(
    redis_factory: Callable[..., RedisServer], run_name: str
) -> None:
    srv = redis_factory(appendonly=True)
    pub = await VersionManager.open(srv.url, run_name, eta=1, batch_groups=1)
    sub = await VersionManager.open(srv.url, run_name)
    got: list[int] = []
    task = asyncio.create_task(_collect(sub, 0, 5, got))
    try:
        await pub.publish_weights(1, "/w/1")
        await pub.publish_weights(2, "/w/2")
        await _until(lambda: got[-1:] == [2])
        await asyncio.to_thread(srv.restart)
        for v in (3, 4, 5):
            await pub.publish_weights(v, f"/w/{v}")
        await asyncio.wait_for(task, 20)
        # strictly increasing, nothing before 1, and the latest always arrives
        assert got[:2] == [1, 2] and got[-1] == 5
        assert all(a < b for a, b in pairwise(got))
    finally:
        task.cancel()
        await pub.close()
        await sub.close()


# ------------------------------------------------------------------ the gate, on real Redis
class RedisGate:
    """The ``GateBackend`` of tests/gate_model.py on a real ``VersionManager``."""

    def __init__(self, url: str, eta: int, batch_groups: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.vm = self._run(
            VersionManager.open(
                url, "m" + uuid.uuid4().hex[:10], eta=eta, batch_groups=batch_groups
            )
        )

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def admit(self, worker: str, n: int) -> int:
        return int(self._run(self.vm.try_admit(worker, n)))

    def finish(self, worker: str) -> int:
        return int(self._run(self.vm.finish(worker, 1)))

    def reject(self, worker: str, reason: str) -> int:
        return int(self._run(self.vm.reject(worker, 1, reason)))

    def die(self, worker: str) -> int:
        # the worker's last heartbeat expires; reap from "another process"
        self._run(self.vm.heartbeat(worker, ttl=0.001))
        time.sleep(0.005)
        reaped: dict[str, int] = self._run(self.vm.reap())
        assert set(reaped) == {worker}
        return reaped[worker]

    def drop(self) -> int:
        return int(self._run(self.vm.drop(1, "stale")))

    def publish(self, version: int) -> None:
        self._run(self.vm.publish_weights(version, f"/w/{version}"))

    def counters(self) -> Counters:
        s = self._run(self.vm.snapshot())
        return Counters(s.version, s.admitted, s.finished, s.rejected, dict(s.inflight), s.capacity)

    def close(self) -> None:
        self._run(self.vm.close())
        self.loop.close()


@pytest.mark.timeout(120)
def test_gate_state_machine_on_real_redis(redis_url: str) -> None:
    class RedisGateMachine(GateMachine):
        def make_backend(self, eta: int, batch_groups: int) -> GateBackend:
            return RedisGate(redis_url, eta, batch_groups)

    run_state_machine_as_test(
        RedisGateMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


async def test_current_eta_reads_the_live_setting(redis_url: str, run_name: str) -> None:
    async with (
        await VersionManager.open(redis_url, run_name, eta=2, batch_groups=4) as a,
        await VersionManager.open(redis_url, run_name) as b,
    ):
        assert await b.current_eta() == 2
        await a.set_eta(5)
        assert b.eta == 2  # b's cached view is stale until it reads again
        assert await b.current_eta() == 5 and b.eta == 5


async def test_open_or_create_creates_then_attaches(redis_url: str) -> None:
    run = "ooc-" + uuid.uuid4().hex[:8]
    async with await VersionManager.open_or_create(
        redis_url, run, eta=3, batch_groups=4, check_batch_groups=True
    ) as vm:
        assert (vm.eta, vm.batch_groups) == (3, 4)  # created with these
    # A worker takes the run's settings as they are, whatever its config says.
    async with await VersionManager.open_or_create(
        redis_url, run, eta=1, batch_groups=9, check_batch_groups=False
    ) as vm:
        assert (vm.eta, vm.batch_groups) == (3, 4)
    # A trainer whose step size differs from the run's is refused, naming both values.
    with pytest.raises(RunSettingsMismatch, match=r"batch_groups=4 .*batch_groups=9"):
        await VersionManager.open_or_create(
            redis_url, run, eta=3, batch_groups=9, check_batch_groups=True
        )
