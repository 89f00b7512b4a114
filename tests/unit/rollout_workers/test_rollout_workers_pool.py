"""rollout_workers.pool: the servers' states and who gets work, with fake clients."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from rollout_fakes import client_of, server

from rollout_workers.pool import NoServer, Server, ServerPool, ServerState, Shutdown

pytestmark = pytest.mark.timeout(10)

UP, UPDATING, NEEDS_LOAD, DEAD = (
    ServerState.UP,
    ServerState.UPDATING,
    ServerState.NEEDS_LOAD,
    ServerState.DEAD,
)


async def pending(coro: asyncio.Future[Server] | asyncio.Task[Server]) -> bool:
    """True if ``coro`` is still waiting after every ready callback ran."""
    for _ in range(5):
        await asyncio.sleep(0)
    return not coro.done()


def test_a_pool_needs_a_server() -> None:
    with pytest.raises(ValueError, match="at least one inference server"):
        ServerPool([])


async def test_a_dead_server_is_not_acquired() -> None:
    a, b = server("http://a"), server("http://b")
    pool = ServerPool([a, b])
    b.track("x")  # b is busier: a would be chosen while it is up
    assert await pool.acquire() is a
    pool.mark_dead(a)
    pool.mark_dead(a)
    assert (a.state, a.deaths) == (DEAD, 1)  # counted once
    assert not a.alive
    assert [await pool.acquire() for _ in range(3)] == [b, b, b]
    pool.mark_dead(b)
    waiting = asyncio.ensure_future(pool.acquire())
    assert await pending(waiting)
    pool.mark_up(a, 0)  # back (the health loop loaded it)
    assert await waiting is a


async def test_a_server_that_needs_a_load_gets_no_work_until_loaded() -> None:
    s = server(state=NEEDS_LOAD, version=None)
    pool = ServerPool([s])
    waiting = asyncio.ensure_future(pool.acquire())
    assert await pending(waiting)
    async with pool.exclusive(s):
        assert s.state is UPDATING
        assert await pending(waiting)
        pool.loaded(s, 0)
        assert await pending(waiting)  # new requests wait until the update ends
    assert s.state is UP
    assert await waiting is s


async def test_acquire_waits_for_a_server_at_the_minimum_version() -> None:
    old, new = server("http://old", version=1), server("http://new", version=1)
    pool = ServerPool([old, new])
    waiting = asyncio.ensure_future(pool.acquire(min_version=2))
    assert await pending(waiting)
    async with pool.exclusive(new):
        pool.loaded(new, 2)
    assert await waiting is new
    assert await pool.acquire(min_version=1) is new  # newest weights first
    async with pool.exclusive(old):
        pool.loaded(old, 2)
    new.track("r1")
    assert await pool.acquire(min_version=2) is old  # then the least loaded


async def test_an_update_ends_in_the_state_it_left() -> None:
    s = server(version=1)
    pool = ServerPool([s])
    async with pool.exclusive(s):
        pool.require_load(s)  # the load failed
        assert s.state is UPDATING and s.settled is NEEDS_LOAD and s.alive
    assert s.state is NEEDS_LOAD
    async with pool.exclusive(s):
        pool.mark_dead(s)  # died during the update
        assert s.alive is False and s.deaths == 1
        pool.loaded(s, 2)  # a late success does not revive it: the health loop decides
    assert (s.state, s.version) == (DEAD, 2)
    with pytest.raises(RuntimeError):
        async with pool.exclusive(s):
            raise RuntimeError("interrupted")
    assert s.state is DEAD  # an update that raised leaves the state it found


async def test_a_closed_pool_hands_out_nothing() -> None:
    s = server(state=NEEDS_LOAD)
    pool = ServerPool([s])
    waiting = asyncio.ensure_future(pool.acquire())
    assert await pending(waiting)
    pool.close()
    with pytest.raises(Shutdown):
        await waiting
    pool.mark_up(s, 0)
    with pytest.raises(Shutdown):
        await pool.acquire()


async def test_live_counts_servers_loaded_or_being_updated_from_up() -> None:
    a, b, c = server("http://a"), server("http://b", state=NEEDS_LOAD), server("http://c")
    pool = ServerPool([a, b, c])
    pool.mark_dead(c)
    async with pool.exclusive(a):
        assert pool.live() == [a]
    assert pool.live() == [a]


class Loader:
    def __init__(self, pool: ServerPool, version: int = 3) -> None:
        self.pool = pool
        self.version = version
        self.brought_up: list[str] = []
        self.behind_urls: set[str] = set()

    def behind(self, s: Server) -> bool:
        return s.url in self.behind_urls

    async def bring_up(self, s: Server) -> None:
        self.brought_up.append(s.url)
        self.pool.mark_up(s, self.version)


async def test_health_check_marks_silent_servers_dead_and_loads_those_back() -> None:
    up, silent, back = server("http://up"), server("http://silent"), server("http://back")
    pool = ServerPool([up, silent, back])
    loader = Loader(pool)
    pool.mark_dead(back)
    client_of(silent).dead = True
    for s in pool.servers:
        await pool.check(s, loader)
    assert (up.state, silent.state, back.state) == (UP, DEAD, UP)
    assert loader.brought_up == ["http://back"] and back.version == 3
    assert silent.deaths == 1 and back.deaths == 1
    loader.behind_urls = {"http://up"}  # distributed: a live server that missed a broadcast
    await pool.check(up, loader)
    assert loader.brought_up == ["http://back", "http://up"]


async def test_health_check_leaves_a_server_in_an_update_alone() -> None:
    s = server(state=NEEDS_LOAD)
    pool = ServerPool([s])
    loader = Loader(pool)
    async with pool.exclusive(s):
        await pool.check(s, loader)
    assert loader.brought_up == [] and s.state is NEEDS_LOAD


class Process:
    def __init__(self, pid: int, alive: bool = True) -> None:
        self.pid = pid
        self.running = alive
        self.stopped = False

    def alive(self) -> bool:
        return self.running

    def stop(self, timeout: float = 30.0) -> int | None:
        self.stopped = True
        return -9


async def test_an_exited_launched_server_is_relaunched_and_loaded() -> None:
    first, second = Process(100, alive=False), Process(200)
    s = server()
    s.handle, s.restart = first, lambda: second
    pool = ServerPool([s])
    loader = Loader(pool)
    await pool.check(s, loader)
    assert first.stopped and s.handle is second and s.restarts == 1 and s.deaths == 1
    assert loader.brought_up == [s.url] and s.state is UP  # loaded before any work


async def test_wait_for_a_server_marks_the_silent_ones_dead() -> None:
    a, b = server("http://a", state=NEEDS_LOAD), server("http://b", state=NEEDS_LOAD)
    client_of(b).healthy = False
    pool = ServerPool([a, b])
    await pool.wait_for_a_server(5.0, asyncio.Event())
    assert (a.state, b.state) == (NEEDS_LOAD, DEAD) and b.deaths == 0
    client_of(a).dead = True
    with pytest.raises(NoServer, match=r"answered /health within 0s .* at http://a, http://b"):
        await pool.wait_for_a_server(0.0, asyncio.Event())
    stop = asyncio.Event()
    stop.set()
    await pool.wait_for_a_server(60.0, stop)  # a stop ends the wait at once


async def test_waiting_for_a_server_says_for_which_and_how_long(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = server("http://a", state=NEEDS_LOAD), server("http://b", state=NEEDS_LOAD)
    client_of(a).dead, client_of(b).healthy = True, False
    pool = ServerPool([a, b])
    caplog.set_level(logging.INFO, logger="sluice.rollout")
    t0 = time.monotonic()
    with pytest.raises(NoServer) as e:
        await pool.wait_for_a_server(1.2, asyncio.Event(), log_every=0.5)
    assert 1.2 <= time.monotonic() - t0 < 3.0
    msg = str(e.value)
    assert "\n" not in msg and "http://a, http://b" in msg and "check --servers" in msg
    msgs = [r.getMessage() for r in caplog.records]
    waits = [m for m in msgs if m.startswith("waiting for an inference server")]
    assert 2 <= len(waits) <= 3, waits  # at once, after 0.5 s, (after 1 s)
    assert all("at http://a, http://b: " in w and "s of 1.2s" in w for w in waits), waits
    # The server answers: the wait ends and says after how long.
    caplog.clear()

    async def late() -> None:
        await asyncio.sleep(0.6)
        client_of(a).dead = False

    task = asyncio.ensure_future(late())
    await pool.wait_for_a_server(5.0, asyncio.Event(), log_every=10.0)
    await task
    assert a.state is NEEDS_LOAD and b.state is DEAD
    msgs = [r.getMessage() for r in caplog.records]
    assert len([m for m in msgs if "waiting for an inference server" in m]) == 1
    assert any(m.startswith("inference server http://a answers after") for m in msgs), msgs


async def test_abort_requests_reaches_live_servers_only() -> None:
    a, b = server("http://a"), server("http://b")
    pool = ServerPool([a, b])
    a.track("r1")
    b.track("r2")
    pool.mark_dead(b)
    assert pool.inflight_requests() == 2
    await pool.abort_requests(timeout=1.0)
    assert client_of(a).calls == ["abort:r1"] and client_of(b).calls == []
    a.untrack("r1")
    assert a.busy_total() >= 0.0 and a.busy_since is None
