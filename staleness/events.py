"""Following the run's weight publications: ``follow_events`` yields every publication (and
announcement) newer than the last one it yielded, across dropped connections and Redis
restarts.

The delivery rule is "never miss the latest": on a dropped connection (or a Redis restart) the
iterator reconnects, re-reads the current record and yields it if it is newer than the last
version it yielded, then continues with later publications; versions in between that it missed
while away are skipped, since weights supersede each other. Versions yielded are strictly
increasing (tests/integration/test_version_manager.py::test_events_reach_two_subscribers_in_order
and ::test_events_survive_a_redis_restart).

Why a capped stream and not pub/sub: a blocking XREAD from the last-seen id loses nothing
published while the consumer is busy between reads (pub/sub drops what arrives while nobody
listens and can disconnect a slow subscriber); it needs no dedicated subscriber connection; the
(record, last event id) pair is read in one MULTI, so there is no gap between "read current"
and "listen". The stream is capped at ``staleness.version_manager.EVENTS_MAXLEN`` entries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from buffer import keys
from buffer.connection import TRANSIENT, closed_transport, raise_if_cancelling, with_retries
from staleness.records import WeightEvent, decode

log = logging.getLogger("sluice.staleness")

MAX_BLOCK_MS = 5000
"""The longest one blocking read of the stream waits (the client's socket timeout is above)."""


async def current_weights(client: aioredis.Redis, run: str) -> tuple[WeightEvent | None, str]:
    """The latest record and the id of its event, read in one MULTI (consistent, since a
    publication writes both in one script). The id is ``0-0`` while the stream is empty."""

    async def op() -> tuple[WeightEvent | None, str]:
        async with client.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.weights(run))
            pipe.xrevrange(keys.weight_events(run), count=1)
            res: list[Any] = await pipe.execute()
        rec, last = res
        cursor = decode(last[0][0]) if last else "0-0"
        return (WeightEvent.from_fields(rec) if rec else None), cursor

    return await with_retries(op, what=f"run {run}: subscribe to weight events")


async def _read_after(client: aioredis.Redis, run: str, cursor: str, block_ms: int) -> Any:
    """The stream entries after ``cursor`` (waiting up to ``block_ms``), or None when the
    connection was lost or Redis is loading its data: then the caller reads the current record
    again. Other errors propagate."""
    try:
        resp: Any = await client.xread({keys.weight_events(run): cursor}, count=100, block=block_ms)
    except (*TRANSIENT, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not closed_transport(e):
            raise
        raise_if_cancelling(e)
        log.warning("run %s: weight events: connection lost (%s); reconnecting", run, e)
        return None
    except ResponseError as e:
        if not str(e).startswith("LOADING"):
            raise
        await asyncio.sleep(0.1)
        return None
    return resp or []


async def follow_events(
    client: aioredis.Redis, run: str, after: int | None = None, *, block_ms: int = MAX_BLOCK_MS
) -> AsyncGenerator[WeightEvent, None]:
    """Weight publications of ``run`` with version > ``after``, in version order, forever.

    First yields the current publication if it is newer than ``after`` (``after=None``:
    whatever is current), then every later one, by the delivery rule above. Raises
    ``RedisUnavailable`` if Redis stays unreachable through ``with_retries``."""
    last = -1 if after is None else after
    while True:
        rec, cursor = await current_weights(client, run)
        if rec is not None and rec.version > last:
            last = rec.version
            yield rec
        while (resp := await _read_after(client, run, cursor, block_ms)) is not None:
            for _stream, entries in resp:
                for entry_id, fields in entries:
                    cursor = decode(entry_id)
                    ev = WeightEvent.from_fields(fields)
                    if ev.version > last:
                        last = ev.version
                        yield ev
