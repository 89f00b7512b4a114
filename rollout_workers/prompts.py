"""Prompts shared by every rollout worker of a run, through Redis.

A durable **epoch cursor** walks a permutation of the task's prompts; the permutation of epoch
``e`` is ``random.Random(f"{seed}/{e}")``'s shuffle of ``range(n)``, so every worker (built with
the same task and run seed) maps a position to the same prompt without sharing the order.
A **lease** (``epoch:pos``) is held until released or until its TTL (Redis clock) passes;
workers renew the leases of the groups they are still generating.

Which prompt ``lease`` hands out, in order (one Lua script, so concurrent leasers never
interleave):

1. a prompt released with ``requeue=True`` (a worker shut down before finishing it);
2. the oldest **expired** lease (its holder died): served again before the cursor advances;
3. the next cursor position; past the last one the epoch ends and the next one starts.

Invariants (tests/integration/test_prompts.py):

- Within an epoch every position is handed out by the cursor exactly once, whatever the number
  of concurrent leasers (``test_concurrent_leasers_never_share_a_prompt``); a position is
  handed out again only after its lease expired or was requeued (``test_expired_lease_is_served
  _again``), and then before any new position.
- ``release``/``renew`` act only for the current holder's token: a worker whose lease expired
  and was re-served cannot release the new holder's lease.
- Every worker of a run must use the same prompt set: the first leaser records the set's size
  and fingerprint and later leasers with a different set are refused (``PromptSetMismatch``).

Keys (``sluice:{run}:prompts:...``): ``cursor`` hash (epoch, pos, n, fingerprint), ``leases``
zset (member -> expiry ms), ``holders`` hash (member -> lease token), ``requeue`` list.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from buffer import keys
from buffer.connection import with_retries
from rollout_workers.tasks.base import Prompt


class PromptSetMismatch(ValueError):
    """This worker's prompt set differs from the one the run's first worker registered."""


# KEYS: cursor, leases, holders, requeue. ARGV: n, fingerprint, ttl ms, token.
# Returns {member, source} with source 'requeued' | 'expired' | 'new'.
_LEASE_LUA = """
local n = tonumber(ARGV[1])
local fp = redis.call('HGET', KEYS[1], 'fingerprint')
if fp and fp ~= ARGV[2] then
  return redis.error_reply('SLUICE_PROMPTS ' .. (redis.call('HGET', KEYS[1], 'n') or '?'))
end
if not fp then
  redis.call('HSET', KEYS[1], 'n', n, 'fingerprint', ARGV[2])
  redis.call('HSETNX', KEYS[1], 'epoch', 0)
  redis.call('HSETNX', KEYS[1], 'pos', 0)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = nil
local source = 'new'
while true do
  local m = redis.call('LPOP', KEYS[4])
  if not m then break end
  if not redis.call('ZSCORE', KEYS[2], m) then
    member = m
    source = 'requeued'
    break
  end
end
if not member then
  local exp = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, 1)
  if #exp > 0 then
    member = exp[1]
    source = 'expired'
  end
end
if not member then
  local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
  local pos = tonumber(redis.call('HGET', KEYS[1], 'pos') or '0')
  if pos >= n then
    epoch = epoch + 1
    pos = 0
  end
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'pos', pos + 1)
  member = epoch .. ':' .. pos
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), member)
redis.call('HSET', KEYS[3], member, ARGV[4])
return {member, source}
"""

# KEYS: leases, holders, requeue. ARGV: member, token, requeue (0/1). Returns 1 if released.
_RELEASE_LUA = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[3] == '1' then redis.call('RPUSH', KEYS[3], ARGV[1]) end
return 1
"""

# KEYS: leases, holders. ARGV: ttl ms, member1, token1, member2, token2, ...
# Extends the leases still held by their token; returns how many.
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local k = 0
for i = 2, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
    k = k + 1
  end
end
return k
"""


@dataclass(frozen=True)
class Lease:
    """One leased prompt: ``member`` is ``"{epoch}:{pos}"``, ``token`` proves who holds it."""

    member: str
    token: str
    epoch: int
    pos: int
    index: int
    """Index of the prompt in the task's prompt list."""
    prompt: Prompt
    source: str
    """'new' (cursor), 'expired' (re-served after its holder's TTL) or 'requeued'."""


def fingerprint(prompts: Sequence[Prompt]) -> str:
    """A digest of the prompt set (ids and tokens) that every worker of a run must share."""
    h = hashlib.sha1(usedforsecurity=False)
    for p in prompts:
        h.update(p.id.encode())
        h.update(b"\0")
        h.update(",".join(map(str, p.input_ids)).encode())
        h.update(b"\n")
    return h.hexdigest()


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The prompt order of ``epoch``: a shuffle of ``range(n)`` seeded by ``(seed, epoch)``."""
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class PromptSource:
    """Leases prompts of one split of a task for one worker (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        run: str,
        prompts: Sequence[Prompt],
        *,
        seed: int,
        worker_id: str,
        lease_ttl_s: float,
        name: str = "train",
    ) -> None:
        if not prompts:
            raise ValueError("PromptSource: the task has no prompts in this split")
        if not lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {lease_ttl_s}")
        self.redis = client
        self.run = run
        self.prompts = list(prompts)
        self.seed = seed
        self.worker_id = worker_id
        self.ttl_ms = max(1, round(lease_ttl_s * 1000))
        self.fingerprint = fingerprint(self.prompts)
        self.k_cursor = keys.prompts(run, name, "cursor")
        self.k_leases = keys.prompts(run, name, "leases")
        self.k_holders = keys.prompts(run, name, "holders")
        self.k_requeue = keys.prompts(run, name, "requeue")
        self._lease = client.register_script(_LEASE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._perms: dict[int, list[int]] = {}
        self.held: dict[str, Lease] = {}
        """Leases this source handed out and has not released (what ``renew_all`` extends)."""

    def _index(self, epoch: int, pos: int) -> int:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            perm = self._perms[epoch] = permutation(len(self.prompts), self.seed, epoch)
        return perm[pos]

    async def lease(self) -> Lease:
        """Lease the next prompt (requeued, else expired, else the cursor's next)."""
        token = f"{self.worker_id}/{uuid.uuid4().hex}"
        script_keys = [self.k_cursor, self.k_leases, self.k_holders, self.k_requeue]
        args: list[str | int] = [len(self.prompts), self.fingerprint, self.ttl_ms, token]

        async def op() -> Any:
            try:
                return await self._lease(keys=script_keys, args=args)
            except ResponseError as e:
                if "SLUICE_PROMPTS" in str(e):
                    have = str(e).split("SLUICE_PROMPTS", 1)[1].strip()
                    raise PromptSetMismatch(
                        f"run {self.run!r}: this worker's prompt set ({len(self.prompts)} "
                        f"prompts) differs from the one the run started with ({have} prompts): "
                        "every worker of a run needs the same task and task options"
                    ) from None
                raise

        # A retried lease after a lost reply may lease a second prompt; the first then expires
        # and is served again, so nothing is lost.
        member_raw, source_raw = await with_retries(op, what=f"run {self.run}: lease prompt")
        member, source = _s(member_raw), _s(source_raw)
        epoch_s, _, pos_s = member.partition(":")
        epoch, pos = int(epoch_s), int(pos_s)
        idx = self._index(epoch, pos)
        lease = Lease(member, token, epoch, pos, idx, self.prompts[idx], source)
        self.held[token] = lease
        return lease

    async def release(self, lease: Lease, *, requeue: bool = False) -> bool:
        """Give the lease up: the prompt is done for this epoch, or with ``requeue`` it is served
        again next. Returns False if the lease had expired and was re-served meanwhile."""
        self.held.pop(lease.token, None)

        async def op() -> Any:
            return await self._release(
                keys=[self.k_leases, self.k_holders, self.k_requeue],
                args=[lease.member, lease.token, "1" if requeue else "0"],
            )

        return bool(await with_retries(op, what=f"run {self.run}: release prompt lease"))

    async def renew_all(self) -> int:
        """Extend every lease this source holds by the TTL; returns how many were still held."""
        if not self.held:
            return 0
        args: list[Any] = [self.ttl_ms]
        for lease in list(self.held.values()):
            args += [lease.member, lease.token]

        async def op() -> Any:
            return await self._renew(keys=[self.k_leases, self.k_holders], args=args)

        return int(await with_retries(op, what=f"run {self.run}: renew prompt leases"))

    async def state(self) -> dict[str, Any]:
        """Cursor (epoch, pos, n), live leases {member: token} and the requeue list."""

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.k_cursor)
                pipe.hgetall(self.k_holders)
                pipe.lrange(self.k_requeue, 0, -1)
                return list(await pipe.execute())

        cursor, holders, requeue = await with_retries(op, what=f"run {self.run}: prompt state")
        return {
            "epoch": int(cursor.get(b"epoch", 0)),
            "pos": int(cursor.get(b"pos", 0)),
            "n": int(cursor.get(b"n", 0)),
            "leases": {_s(m): _s(t) for m, t in holders.items()},
            "requeue": [_s(m) for m in requeue],
        }
