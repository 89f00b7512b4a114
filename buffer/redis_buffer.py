"""``RedisTrajectoryBuffer``: trajectory groups on a Redis stream with a consumer group.

Guarantees (each proved by a test in ``tests/integration/test_buffer.py``):

* ``put`` either returns the entry id of a stored group or raises ``RedisUnavailable``, and
  stores each ``group_id`` once even when its reply was lost: before re-sending, a retry looks
  for its first attempt in the stream (entries since the first attempt, by the ``g`` field) and
  in the seen marks, which ``ack`` writes *before* it deletes an entry — so at every moment a
  stored group is in the stream or marked seen. The common path stays one plain XADD and one
  round trip per read and per ack (a Lua check-and-add halved put throughput; a read-side
  check cost a round trip per batch).
* Each entry is delivered to exactly one consumer of the consumer group; it stays pending until
  ``ack``; ``reclaim`` hands entries that sat unacknowledged on a dead consumer to a live one.
* ``ack`` removes the entry (XACK + XDEL in one transaction): Redis memory is bounded by what is
  in flight, not by history.
* On a Redis Cluster (``redis+cluster://``) a put returns once a replica of the stream's
  master has the entry too (``WAIT 1``, pipelined on the XADD's connection), so a failover
  to that replica loses no put that returned (tests/integration/test_redis_cluster.py). While
  the master has no replica answering (after a failover, until the old master rejoins), puts
  go on at the master's durability alone, logged, and wait again ``_REPLICA_RETRY_S`` later.
* An entry that fails to decode is moved to the dead-letter stream with its reason and raw bytes
  and acknowledged; consumers never see it and never crash on it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError

from buffer import keys
from buffer.codec import CodecError, decode_group, encode_group
from buffer.connection import connect, is_cluster, with_retries
from buffer.schema import TrajectoryGroup

log = logging.getLogger("sluice.buffer")

CONSUMER_GROUP = "trainers"
# Seen marks live in one hash per hour (field group id -> entry id), so an ack writes one HSET
# whatever its batch size. A put's retry looks only seconds back, so a few hours is plenty.
SEEN_BUCKET_S = 3600
SEEN_TTL_S = 3 * SEEN_BUCKET_S
# Slack added to a put's look-back for its own first attempt (Redis stamps entry ids with its
# own clock; we only measure elapsed time, so this covers scheduling delays, not clock skew).
_CLOCK_MARGIN_S = 5.0
DEAD_LETTER_MAXLEN = 10_000
# A blocking read longer than this is split so the socket timeout never fires mid-block.
_MAX_BLOCK_MS = 5_000
# On a cluster: how long a put waits for one replica to acknowledge its entry, and how long
# puts go without waiting after a wait found no replica (the master has none now).
_REPLICA_WAIT_MS = 500
_REPLICA_RETRY_S = 5.0


# KEYS[1] stream, KEYS[2] seen hash; ARGV: group, ttl, n, entry ids (n), group ids (n; '' when
# unknown). Marks each known group seen, then XACK + XDEL: one command on the hot path, and the
# seen mark is written before the entry is deleted.
_ACK_LUA = """
local n = tonumber(ARGV[3])
local marks = {}
for i = 1, n do
  local g = ARGV[3 + n + i]
  if g ~= '' then
    marks[#marks + 1] = g
    marks[#marks + 1] = ARGV[3 + i]
  end
end
if #marks > 0 then
  redis.call('HSET', KEYS[2], unpack(marks))
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 4, 3 + n))
redis.call('XDEL', KEYS[1], unpack(ARGV, 4, 3 + n))
return acked
"""
# Entry ids per ack script call (Lua's unpack has a stack limit of a few thousand values).
_ACK_CHUNK = 1000


@dataclass(frozen=True)
class Delivered:
    """A group handed to this consumer; ``entry_id`` is what ``ack`` takes."""

    entry_id: str
    group: TrajectoryGroup


@dataclass(frozen=True)
class BufferStats:
    length: int
    """Entries in the stream (delivered-but-unacked included)."""
    pending: int
    """Entries delivered to a consumer and not yet acknowledged."""
    dead_letter: int
    """Entries in the dead-letter stream."""
    bytes: int
    """Memory Redis reports for the stream key."""

    def as_dict(self) -> dict[str, int]:
        return {
            "length": self.length,
            "pending": self.pending,
            "dead_letter": self.dead_letter,
            "bytes": self.bytes,
        }


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisTrajectoryBuffer:
    """The run's trajectory stream. Create with ``await RedisTrajectoryBuffer.open(url, run)``."""

    def __init__(
        self,
        client: aioredis.Redis,
        run: str,
        consumer: str | None = None,
        *,
        owns_client: bool = False,
    ) -> None:
        self.redis = client
        self.run = run
        self.consumer = consumer or default_consumer_name()
        self.stream_key = keys.stream(run)
        self.dead_key = keys.dead_letters(run)
        self._owns_client = owns_client
        self._group_ready = False
        self._ack_script = client.register_script(_ACK_LUA)
        self._group_of: dict[str, str] = {}  # delivered, not yet acked: entry id -> group id
        self._seen_bucket = -1  # the hour bucket whose seen-mark key is cached below
        self._seen_bucket_key = ""
        self._cluster = is_cluster(client)
        self._no_replica_until = 0.0
        self.unreplicated_puts = 0
        """Puts (on a cluster) that returned without a replica's acknowledgement."""
        self.dead_lettered = 0
        """Entries this instance moved to the dead-letter stream (the trainer hands their
        admission slots back: each was a finished group that will never be trained)."""

    @classmethod
    async def open(cls, url: str, run: str, consumer: str | None = None) -> RedisTrajectoryBuffer:
        client = await connect(url, socket_timeout=(_MAX_BLOCK_MS / 1000) + 10)
        return cls(client, run, consumer, owns_client=True)

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    async def __aenter__(self) -> RedisTrajectoryBuffer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- producer side
    async def put(self, group: TrajectoryGroup) -> str:
        """Store one group; returns its stream entry id. Raises ``RedisUnavailable`` if the
        write cannot be confirmed after retries (never drops silently)."""
        payload = encode_group(group)
        return await self.put_encoded(payload, group.group_id)

    async def put_encoded(self, payload: bytes, group_id: str) -> str:
        first_attempt = time.monotonic()
        attempts = 0

        async def op() -> Any:
            nonlocal attempts
            if attempts:  # the previous attempt may have landed with its reply lost
                lookback = time.monotonic() - first_attempt + _CLOCK_MARGIN_S
                existing = await self.find_put(group_id, lookback)
                if existing is not None:
                    log.info(
                        "put of group %s had landed as %s before its reply was lost",
                        group_id,
                        existing,
                    )
                    return existing
            attempts += 1
            if self._cluster:
                return await self._xadd_replicated(payload, group_id)
            return await self.redis.xadd(self.stream_key, {"d": payload, "g": group_id})

        entry = await with_retries(op, what=f"put group {group_id}")
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def _xadd_replicated(self, payload: bytes, group_id: str) -> Any:
        """XADD, then ``WAIT 1`` on the same connection (one pipeline to the stream's master):
        returns once a replica has the entry, or after ``_REPLICA_WAIT_MS`` without one."""
        fields: Any = {"d": payload, "g": group_id}
        if time.monotonic() < self._no_replica_until:
            self.unreplicated_puts += 1
            return await self.redis.xadd(self.stream_key, fields)
        node = self.redis.get_node_from_key(self.stream_key)  # type: ignore[attr-defined]
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self.stream_key, fields)
                pipe.execute_command("WAIT", 1, _REPLICA_WAIT_MS, target_nodes=node)
                entry, acked = await pipe.execute()
        except RedisClusterException as e:
            # redis-py's own retry of this pipeline after a lost connection routes the WAIT
            # anew (its node was taken by the first try) and refuses it before sending
            # anything: a lost reply, which ``put_encoded`` retries after its look-up.
            raise RedisConnectionError(f"put of group {group_id}: {e}") from e
        if not acked:
            self.unreplicated_puts += 1
            self._no_replica_until = time.monotonic() + _REPLICA_RETRY_S
            log.warning(
                "run %s: no replica acknowledged put %s within %d ms: puts go on at the "
                "master's durability alone (retrying in %.0f s)",
                self.run,
                group_id,
                _REPLICA_WAIT_MS,
                _REPLICA_RETRY_S,
            )
        return entry

    async def find_put(self, group_id: str, lookback_s: float) -> str | None:
        """Entry id under which ``group_id`` was stored in the last ``lookback_s`` seconds
        (still in the stream, or acked and marked seen), else None. Scans the stream first and
        checks the seen mark after, so an entry acked during the scan is still found."""
        sec, usec = await self.redis.time()
        start_ms = max(0, int(sec) * 1000 + int(usec) // 1000 - int(lookback_s * 1000))
        lo = f"{start_ms}-0"
        want = group_id.encode()
        while True:
            rows: Any = await self.redis.xrange(self.stream_key, min=lo, max="+", count=256)
            for eid, fields in rows:
                if fields.get(b"g") == want:
                    return str(eid.decode())
            if len(rows) < 256:
                break
            lo = "(" + rows[-1][0].decode()
        bucket = int(time.time()) // SEEN_BUCKET_S
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in (bucket - 1, bucket, bucket + 1):  # client clocks may disagree a little
                pipe.hget(self._seen_key(b), group_id)
            marks = await pipe.execute()
        seen = next((m for m in marks if m is not None), None)
        return seen.decode() if seen is not None else None

    # ---------------------------------------------------------------- consumer side
    async def ensure_group(self) -> None:
        """Create the consumer group (from the start of the stream) if it does not exist."""
        if self._group_ready:
            return

        async def op() -> None:
            try:
                await self.redis.xgroup_create(
                    self.stream_key, CONSUMER_GROUP, id="0", mkstream=True
                )
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

        await with_retries(op, what="create consumer group")
        self._group_ready = True

    async def get_batch(self, n_groups: int, block_ms: int = 1000) -> list[Delivered]:
        """Up to ``n_groups`` new groups for this consumer; blocks (server side, no polling)
        until ``n_groups`` arrived or ``block_ms`` passed. Returns what it has (maybe [])."""
        if n_groups <= 0:
            raise ValueError(f"n_groups must be positive, got {n_groups}")
        await self.ensure_group()
        out: list[Delivered] = []
        deadline = time.monotonic() + block_ms / 1000
        while len(out) < n_groups:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            block = max(1, min(remaining_ms, _MAX_BLOCK_MS)) if remaining_ms > 0 else None
            got = await self._read(">", n_groups - len(out), block)
            out.extend(got)
            if remaining_ms <= 0:
                break
        return out

    async def own_pending(self, count: int = 1000) -> list[Delivered]:
        """Entries already delivered to this consumer name and not acked (after a restart with
        the same consumer name)."""
        await self.ensure_group()
        return await self._read("0", count, None)

    async def _read(self, start: str, count: int, block: int | None) -> list[Delivered]:
        async def op() -> Any:
            return await self.redis.xreadgroup(
                CONSUMER_GROUP, self.consumer, {self.stream_key: start}, count=count, block=block
            )

        resp = await with_retries(op, what="read batch")
        if not resp:
            return []
        entries = resp[0][1]
        return await self._decode_entries(entries)

    async def _decode_entries(self, entries: Sequence[Any]) -> list[Delivered]:
        decoded: list[Delivered] = []
        settle: list[str] = []
        group_of = self._group_of
        for entry_id, fields in entries:
            eid = entry_id.decode() if type(entry_id) is bytes else str(entry_id)
            if fields is None:  # deleted while pending: nothing to deliver, just settle it
                settle.append(eid)
                continue
            payload = fields.get(b"d")
            try:
                if payload is None:
                    raise CodecError("stream entry has no 'd' payload field")
                group = decode_group(payload)
            except CodecError as e:
                await self.dead_letter(eid, payload or b"", str(e))
                continue
            decoded.append(Delivered(eid, group))
        if settle:
            await self.ack(settle)
        for d in decoded:
            group_of[d.entry_id] = d.group.group_id
        return decoded

    def _seen_key(self, bucket: int) -> str:
        return keys.seen(self.run, str(bucket))

    async def dead_letter(self, entry_id: str, payload: bytes, reason: str) -> None:
        """Move an entry to the dead-letter stream (raw bytes + reason) and settle it."""
        log.warning("dead-lettering entry %s of run %s: %s", entry_id, self.run, reason)

        async def op() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    self.dead_key,
                    {"d": payload, "reason": reason, "entry": entry_id, "t": str(time.time())},
                    maxlen=DEAD_LETTER_MAXLEN,
                    approximate=True,
                )
                pipe.xack(self.stream_key, CONSUMER_GROUP, entry_id)
                pipe.xdel(self.stream_key, entry_id)
                await pipe.execute()

        await with_retries(op, what=f"dead-letter {entry_id}")
        self.dead_lettered += 1

    async def ack(
        self, entry_ids: Sequence[str], also: Callable[[Pipeline], None] | None = None
    ) -> int:
        """Acknowledge and delete entries, in one MULTI/EXEC with whatever ``also`` queues on the
        pipeline (e.g. the trainer's checkpoint pointer). Marks each delivered group seen first
        (see ``put``). Returns how many were pending."""
        if not entry_ids and also is None:
            return 0
        bucket = int(time.time()) // SEEN_BUCKET_S
        if bucket != self._seen_bucket:
            self._seen_bucket, self._seen_bucket_key = bucket, self._seen_key(bucket)
        script_keys = [self.stream_key, self._seen_bucket_key]
        group_of = self._group_of
        chunks = [list(entry_ids[i : i + _ACK_CHUNK]) for i in range(0, len(entry_ids), _ACK_CHUNK)]
        # The group ids are looked up once, before any attempt: a retry re-sends the same marks.
        args: list[list[Any]] = [
            [CONSUMER_GROUP, SEEN_TTL_S, len(ids), *ids, *[group_of.get(e, "") for e in ids]]
            for ids in chunks
        ]

        async def op() -> int:
            if also is None and len(args) == 1:
                return int(await self._ack_script(keys=script_keys, args=args[0]))
            async with self.redis.pipeline(transaction=True) as pipe:
                for a in args:
                    if self._cluster:  # redis-py's cluster pipeline refuses EVALSHA; EVAL
                        # also needs no script cache on a master just promoted by a failover
                        pipe.execute_command("EVAL", _ACK_LUA, len(script_keys), *script_keys, *a)
                    else:
                        await self._ack_script(keys=script_keys, args=a, client=pipe)
                if also is not None:
                    also(pipe)
                res = await pipe.execute()
            return sum(int(r) for r in res[: len(args)])

        acked = await with_retries(op, what=f"ack {len(entry_ids)} entries")
        for e in entry_ids:
            group_of.pop(e, None)
        return acked

    async def reclaim(self, min_idle_ms: int, count: int = 100) -> list[Delivered]:
        """Take over entries pending on any consumer for at least ``min_idle_ms`` (a dead
        trainer's batch) and return them decoded, now owned by this consumer."""
        await self.ensure_group()
        out: list[Delivered] = []
        start = "0-0"
        while len(out) < count:

            async def op(cursor: str = start, want: int = count - len(out)) -> Any:
                return await self.redis.xautoclaim(
                    self.stream_key,
                    CONSUMER_GROUP,
                    self.consumer,
                    min_idle_time=min_idle_ms,
                    start_id=cursor,
                    count=want,
                )

            resp = await with_retries(op, what="reclaim")
            nxt, claimed = resp[0], resp[1]
            deleted = resp[2] if len(resp) > 2 else []
            if deleted:
                ids = [d.decode() if isinstance(d, bytes) else str(d) for d in deleted]
                await self.ack(ids)
            out.extend(await self._decode_entries(claimed))
            start = nxt.decode() if isinstance(nxt, bytes) else str(nxt)
            if start == "0-0":
                break
        return out

    # ---------------------------------------------------------------- observability
    async def stats(self) -> BufferStats:
        async def op() -> BufferStats:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self.stream_key)
                pipe.xlen(self.dead_key)
                pipe.memory_usage(self.stream_key)
                length, dead, mem = await pipe.execute()
            pending = 0
            try:
                info = await self.redis.xpending(self.stream_key, CONSUMER_GROUP)
                pending = int(info["pending"])
            except ResponseError:  # no group yet (NOGROUP) or no stream
                pending = 0
            return BufferStats(int(length), pending, int(dead), int(mem or 0))

        return await with_retries(op, what="buffer stats")

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-lettered entries: entry id, reason and time (payload left out)."""
        rows: Any = await self.redis.xrevrange(self.dead_key, count=count)

        def text(f: dict[bytes, bytes], k: bytes) -> str:
            return f.get(k, b"").decode(errors="replace")

        return [
            {"entry": text(f, b"entry"), "reason": text(f, b"reason"), "time": text(f, b"t")}
            for _, f in rows or []
        ]
