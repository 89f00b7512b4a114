"""``staleness.events.follow_events``: the delivery rule ("never miss the latest", strictly
increasing versions) across lost connections and a loading Redis, on an in-memory fake of the
three calls it makes (no Redis; tests/integration/test_version_manager.py runs it on a real
server, through a real restart)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import aclosing
from typing import Any, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from buffer import keys
from staleness.events import follow_events

Step = Callable[["FakeRedis"], None] | BaseException


class FakeRedis:
    """The weights record and the events stream of one run; ``xread`` first runs the next
    scripted step (a publication, or an error to raise), then answers from the stream."""

    def __init__(self, run: str, steps: list[Step]) -> None:
        self.k_weights, self.k_events = keys.weights(run), keys.weight_events(run)
        self.record: dict[bytes, bytes] = {}
        self.stream: list[tuple[bytes, dict[bytes, bytes]]] = []
        self.steps = deque(steps)
        self.reads: list[str] = []

    def publish(self, version: int, *, current: bool = True) -> None:
        fields = {b"version": str(version).encode(), b"location": f"/w/{version}".encode()}
        self.stream.append((f"{len(self.stream) + 1}-0".encode(), fields))
        if current:
            self.record = dict(fields)

    def pipeline(self, transaction: bool) -> FakePipe:
        assert transaction
        return FakePipe(self)

    async def xread(self, streams: dict[str, str], count: int, block: int) -> Any:
        ((name, cursor),) = streams.items()
        assert name == self.k_events and count == 100 and block == 7
        self.reads.append(cursor)
        if not self.steps:
            raise AssertionError("no more steps: the test should have stopped reading")
        step = self.steps.popleft()
        if isinstance(step, BaseException):
            raise step
        step(self)
        after = int(cursor.split("-")[0])
        new = [(i, f) for i, f in self.stream if int(i.split(b"-")[0]) > after]
        return [[name.encode(), new]] if new else []


class FakePipe:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.calls: list[str] = []

    async def __aenter__(self) -> FakePipe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def hgetall(self, name: str) -> None:
        assert name == self.redis.k_weights
        self.calls.append("hgetall")

    def xrevrange(self, name: str, count: int) -> None:
        assert name == self.redis.k_events and count == 1
        self.calls.append("xrevrange")

    async def execute(self) -> list[Any]:
        assert self.calls == ["hgetall", "xrevrange"]
        return [dict(self.redis.record), self.redis.stream[-1:]]


def pub(*versions: int, current: bool = True) -> Step:
    def step(r: FakeRedis) -> None:
        for v in versions:
            r.publish(v, current=current)

    return step


async def collect(r: FakeRedis, after: int | None, n: int) -> list[int]:
    got: list[int] = []
    async with aclosing(follow_events(cast(Any, r), "run", after, block_ms=7)) as events:
        async for ev in events:
            got.append(ev.version)
            if len(got) == n:
                break
    return got


async def test_current_first_then_each_later_publication() -> None:
    r = FakeRedis("run", [pub(2), pub(), pub(3, 4)])
    r.publish(1)
    assert await collect(r, None, 4) == [1, 2, 3, 4]
    assert r.reads == ["1-0", "2-0", "2-0"]


async def test_after_skips_what_the_caller_has() -> None:
    r = FakeRedis("run", [pub(3)])
    r.publish(1)
    r.publish(2)
    assert await collect(r, 2, 1) == [3]


async def test_a_lost_connection_resumes_at_the_latest() -> None:
    # v3 and v4 are published while the connection is down: the re-read record gives 4, 3 is
    # skipped (weights supersede each other), and reading resumes after 4's event
    lost = RedisConnectionError("connection reset")

    def away(r: FakeRedis) -> None:
        r.publish(3)
        r.publish(4)
        raise lost

    r = FakeRedis("run", [pub(2), away, pub(5)])
    r.publish(1)
    assert await collect(r, 0, 4) == [1, 2, 4, 5]
    assert r.reads == ["1-0", "2-0", "4-0"]


async def test_a_closed_transport_and_a_loading_redis_re_read_the_record() -> None:
    r = FakeRedis(
        "run",
        [
            RuntimeError("unable to perform operation on <TCPTransport>; the handler is closed"),
            ResponseError("LOADING Redis is loading the dataset in memory"),
            pub(2),
        ],
    )
    r.publish(1)
    # v1 is yielded once, though the record is read three times
    assert await collect(r, 0, 2) == [1, 2]
    assert r.reads == ["1-0", "1-0", "1-0"]


async def test_an_announced_version_is_not_yielded_again_when_published() -> None:
    r = FakeRedis("run", [pub(2, current=False), pub(2), pub(3)])
    r.publish(1)
    assert await collect(r, 0, 3) == [1, 2, 3]
    assert r.reads == ["1-0", "2-0", "3-0"]


@pytest.mark.parametrize(
    "error", [RuntimeError("some other bug"), ResponseError("WRONGTYPE Operation")]
)
async def test_other_errors_propagate(error: BaseException) -> None:
    r = FakeRedis("run", [error])
    r.publish(1)
    with pytest.raises(type(error), match=str(error).split()[0]):
        await collect(r, 0, 2)
