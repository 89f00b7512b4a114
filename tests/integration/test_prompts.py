"""``PromptSource`` on a real Redis: the shared epoch cursor and prompt leases."""

from __future__ import annotations

import asyncio

import pytest

from buffer.connection import connect
from rollout_workers.prompts import PromptSetMismatch, PromptSource, permutation
from rollout_workers.tasks import get_task

pytestmark = pytest.mark.timeout(60)


def source(client, run, prompts, worker="w", ttl=30.0):  # type: ignore[no-untyped-def]
    return PromptSource(client, run, prompts, seed=7, worker_id=worker, lease_ttl_s=ttl)


async def test_concurrent_leasers_never_share_a_prompt(redis_url: str, run_name: str) -> None:
    prompts = list(get_task("reverse", n_train=60, n_eval=0).prompts("train"))
    clients = [await connect(redis_url) for _ in range(6)]
    try:
        sources = [source(c, run_name, prompts, worker=f"w{i}") for i, c in enumerate(clients)]

        async def take(src: PromptSource, k: int) -> list:  # type: ignore[type-arg]
            return [await src.lease() for _ in range(k)]

        # 6 leasers on 6 connections, 10 each: exactly epoch 0, every position once.
        got = [x for xs in await asyncio.gather(*(take(s, 10) for s in sources)) for x in xs]
        assert sorted((g.epoch, g.pos) for g in got) == [(0, p) for p in range(60)]
        assert sorted(g.index for g in got) == list(range(60))
        assert len({g.prompt.id for g in got}) == 60
        assert all(g.source == "new" for g in got)
        # Position p maps to the seeded permutation of epoch 0, the same for every worker.
        perm0 = permutation(60, 7, 0)
        assert all(g.index == perm0[g.pos] for g in got)
        # The next lease starts epoch 1, in a different order.
        nxt = await sources[0].lease()
        assert (nxt.epoch, nxt.pos) == (1, 0)
        assert permutation(60, 7, 1) != perm0
        assert nxt.index == permutation(60, 7, 1)[0]
        # Releasing finished prompts empties the lease table.
        for g in [*got, nxt]:
            owner = next(s for s in sources if g.token in s.held)
            assert await owner.release(g)
        st = await sources[0].state()
        assert st["leases"] == {} and st["requeue"] == [] and (st["epoch"], st["pos"]) == (1, 1)
    finally:
        for c in clients:
            await c.aclose()


async def test_expired_lease_is_served_again(redis_url: str, run_name: str) -> None:
    prompts = list(get_task("reverse", n_train=20, n_eval=0).prompts("train"))
    c = await connect(redis_url)
    try:
        dead = source(c, run_name, prompts, worker="dead", ttl=0.3)
        alive = source(c, run_name, prompts, worker="alive", ttl=30.0)
        held = [await dead.lease() for _ in range(3)]
        # Before expiry, the cursor advances.
        first = await alive.lease()
        assert first.source == "new" and (first.epoch, first.pos) == (0, 3)
        await asyncio.sleep(0.4)
        again = [await alive.lease() for _ in range(3)]
        assert all(a.source == "expired" for a in again)
        assert sorted(a.member for a in again) == sorted(h.member for h in held)
        assert {a.index for a in again} == {h.index for h in held}
        # The dead holder's token no longer releases (or renews) them.
        assert not await dead.release(held[0])
        assert await dead.renew_all() == 0
        # Then the cursor continues where it was.
        nxt = await alive.lease()
        assert nxt.source == "new" and nxt.pos == 4
        # A requeued lease is served before anything else; renew keeps a lease alive.
        assert await alive.release(nxt, requeue=True)
        back = await alive.lease()
        assert back.source == "requeued" and back.member == nxt.member
        short = source(c, run_name, prompts, worker="renewer", ttl=0.5)
        kept = await short.lease()
        for _ in range(4):
            await asyncio.sleep(0.2)
            assert await short.renew_all() == 1
        other = await alive.lease()
        assert other.member != kept.member and other.source == "new"
    finally:
        await c.aclose()


async def test_workers_with_different_prompt_sets_are_refused(
    redis_url: str, run_name: str
) -> None:
    a = list(get_task("reverse", n_train=20, n_eval=0).prompts("train"))
    b = list(get_task("reverse", n_train=21, n_eval=0).prompts("train"))
    c = await connect(redis_url)
    try:
        await source(c, run_name, a).lease()
        with pytest.raises(PromptSetMismatch, match="20 prompts"):
            await source(c, run_name, b).lease()
    finally:
        await c.aclose()
