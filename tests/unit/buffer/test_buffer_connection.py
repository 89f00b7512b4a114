"""``with_retries`` retries transient Redis errors, but never a cancellation in disguise."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from buffer.connection import RedisUnavailable, with_retries


async def test_a_cancel_answered_with_a_connection_error_is_not_retried() -> None:
    # The Redis client's clean-up after a cancel can fail on a dead connection and raise its
    # own error in place of the CancelledError: the task must still end cancelled, at once.
    calls = 0

    async def op() -> None:
        nonlocal calls
        calls += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RedisConnectionError("connection closed during clean-up") from None

    task = asyncio.create_task(with_retries(op, what="read"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)
    assert calls == 1


async def test_transient_errors_are_retried_then_reported() -> None:
    calls = 0

    async def op() -> None:
        nonlocal calls
        calls += 1
        raise RedisConnectionError("refused")

    with pytest.raises(RedisUnavailable, match="read: Redis unavailable after 3 attempts"):
        await with_retries(op, what="read", attempts=3, base_delay=0.001)
    assert calls == 3
