"""The trajectory buffer on a real redis-server: codec round trips, exactly-once delivery,
reclaim, dead-lettering, crash recovery with AOF, authentication."""

from __future__ import annotations

import asyncio
import pickle
import struct
import time
import uuid

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer import (
    SCHEMA_VERSION,
    CodecError,
    RedisTrajectoryBuffer,
    RedisUnavailable,
    Sample,
    TrajectoryGroup,
    decode_group,
    encode_group,
)
from buffer.codec import MAGIC, MAX_TOKENS_PER_SAMPLE, pack
from buffer.connection import connect, redact_url, with_retries

pytestmark = pytest.mark.timeout(120)


def make_group(
    n: int = 4, tokens: int = 16, run: str = "r", seed: int = 0, **kw: object
) -> TrajectoryGroup:
    rng = np.random.default_rng(seed)
    samples = [
        Sample(
            output_ids=rng.integers(0, 1000, tokens, dtype=np.int32),
            behaviour_logp=-rng.random(tokens, dtype=np.float32),
            token_versions=np.sort(rng.integers(0, 5, tokens)).astype(np.int32),
            reward=float(rng.random()),
            finish_reason="stop",
            index=i,
        )
        for i in range(n)
    ]
    return TrajectoryGroup(
        run_id=run,
        prompt_id=f"p{seed}",
        prompt_ids=rng.integers(0, 1000, 5, dtype=np.int32),
        samples=samples,
        worker_id="w0",
        admission_version=2,
        **kw,  # type: ignore[arg-type]
    )


def assert_same(a: TrajectoryGroup, b: TrajectoryGroup) -> None:
    for f in (
        "run_id",
        "prompt_id",
        "group_id",
        "worker_id",
        "admission_version",
        "created_at",
        "finished_at",
        "metadata",
        "schema_version",
    ):
        assert getattr(a, f) == getattr(b, f), f
    np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
    assert b.prompt_ids.dtype == np.int32
    assert len(a.samples) == len(b.samples)
    for x, y in zip(a.samples, b.samples, strict=True):
        np.testing.assert_array_equal(x.output_ids, y.output_ids)
        np.testing.assert_array_equal(x.behaviour_logp, y.behaviour_logp)
        np.testing.assert_array_equal(x.token_versions, y.token_versions)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)  # type: ignore[arg-type]
        np.testing.assert_array_equal(x.turn_starts, y.turn_starts)  # type: ignore[arg-type]
        assert (y.output_ids.dtype, y.behaviour_logp.dtype, y.token_versions.dtype) == (
            np.int32,
            np.float32,
            np.int32,
        )
        assert (x.reward, x.finish_reason, x.index) == (y.reward, y.finish_reason, y.index)


# ----------------------------------------------------------------------------- codec
i32 = st.integers(-(2**31), 2**31 - 1)
f32 = st.floats(width=32, allow_nan=False, allow_infinity=True)


@st.composite
def groups(draw: st.DrawFn) -> TrajectoryGroup:
    n = draw(st.integers(1, 6))
    samples = []
    for i in range(n):
        t = draw(st.integers(0, 40))
        samples.append(
            Sample(
                output_ids=np.array(draw(st.lists(i32, min_size=t, max_size=t)), dtype=np.int32),
                behaviour_logp=np.array(
                    draw(st.lists(f32, min_size=t, max_size=t)), dtype=np.float32
                ),
                token_versions=np.array(
                    draw(st.lists(i32, min_size=t, max_size=t)), dtype=np.int32
                ),
                reward=draw(st.floats(allow_nan=False, allow_infinity=False)),
                finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
                index=i,
            )
        )
    meta = draw(
        st.dictionaries(
            st.text(max_size=10),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(-(2**63), 2**63 - 1),
                st.floats(allow_nan=False),
                st.text(max_size=20),
            ),
            max_size=5,
        )
    )
    return TrajectoryGroup(
        run_id=draw(st.text(min_size=1, max_size=20)),
        prompt_id=draw(st.text(max_size=30)),
        prompt_ids=np.array(draw(st.lists(i32, max_size=50)), dtype=np.int32),
        samples=samples,
        worker_id=draw(st.text(max_size=20)),
        admission_version=draw(st.integers(0, 2**40)),
        created_at=draw(st.floats(0, 2e9)),
        finished_at=draw(st.floats(0, 2e9)),
        metadata=meta,
    )


@given(groups())
@settings(max_examples=150, deadline=None)
def test_codec_round_trip_every_field(g: TrajectoryGroup) -> None:
    assert_same(g, decode_group(encode_group(g)))


def test_encode_refuses_mismatched_lengths() -> None:
    g = make_group()
    g.samples[1].behaviour_logp = g.samples[1].behaviour_logp[:-1]
    with pytest.raises(CodecError, match="sample 1"):
        encode_group(g)


def _parts(g: TrajectoryGroup) -> tuple[dict, list[np.ndarray]]:
    """A group's payload taken apart by hand (header, the eight arrays), to break one thing."""
    payload = encode_group(g)
    magic, hlen = struct.unpack_from("<4sI", payload)
    assert magic == MAGIC
    head = msgpack.unpackb(payload[8 : 8 + hlen], raw=False)
    off = 8 + hlen + (-(8 + hlen) % 8)
    arrays = []
    for k in ("p", "len", "o", "l", "v", "mk", "nt", "ts"):
        dt = np.dtype(head[k]["t"])
        arrays.append(np.frombuffer(payload, dt, head[k]["n"], off).copy())
        off += head[k]["n"] * dt.itemsize
    assert off == len(payload)
    assert pack(head, arrays) == payload  # the helper rebuilds the encoder's bytes exactly
    return head, arrays


def _corruptions() -> list[tuple[str, bytes, str]]:
    g = make_group(n=2, tokens=8)
    good = encode_group(g)
    h, arrs = _parts(g)
    h["sv"] = 99
    unknown = pack(h, arrs)
    h, arrs = _parts(g)
    h["l"]["t"] = "<f8"
    wrong_dtype = pack(h, arrs)
    h, arrs = _parts(g)
    h["o"]["n"] = MAX_TOKENS_PER_SAMPLE * 10_000
    oversized = pack(h, arrs)
    h, arrs = _parts(g)
    h["r"][0] = float("nan")
    nan_reward = pack(h, arrs)
    h, arrs = _parts(g)
    arrs[1] = np.array([8, 9], "<i4")  # sample lengths sum to 17, arrays hold 16 tokens
    arrs[2] = np.concatenate([arrs[2], arrs[2][:1]])
    h["o"]["n"] += 1
    lens_disagree = pack(h, arrs)
    h, arrs = _parts(g)
    h["o"]["n"] += 1  # the header claims one token more than the data holds
    short_array = pack(h, arrs)
    head = msgpack.packb(_parts(g)[0], use_bin_type=True)
    bad_pad = MAGIC + struct.pack("<I", len(head)) + head + b"\x01" * (-(8 + len(head)) % 8 or 8)
    rng = np.random.default_rng(5)
    return [
        ("random bytes", rng.bytes(300), "magic"),
        ("unknown schema version", unknown, "unknown schema version 99"),
        ("truncated array", good[:-3], "truncated or corrupt"),
        ("array shorter than its header says", short_array, "truncated or corrupt"),
        ("extra bytes after the arrays", good + b"\0\0\0\0", "truncated or corrupt"),
        ("wrong dtype", wrong_dtype, "dtype '<f8'"),
        ("oversized field", oversized, "exceeds the limit"),
        (
            "pickle payload",
            pickle.dumps({"sv": SCHEMA_VERSION, "evil": object}),
            "magic",
        ),
        ("truncated message", good[: len(good) // 2], "truncated or corrupt"),
        ("header length past the end", MAGIC + struct.pack("<I", 1 << 30) + b"x", "does not fit"),
        ("garbage header", MAGIC + struct.pack("<I", 4) + b"\xc1\xc1\xc1\xc1", "not a msgpack"),
        ("header not a map", MAGIC + struct.pack("<I", 1) + b"\x01" + bytes(7), "must be a map"),
        ("non-zero padding", bad_pad, "padding"),
        ("nan reward", nan_reward, "not a finite number"),
        ("lengths disagree", lens_disagree, "lengths disagree"),
    ]


@pytest.mark.parametrize("name,payload,match", _corruptions(), ids=[c[0] for c in _corruptions()])
def test_decode_rejects_corrupt_payloads(name: str, payload: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_group(payload)


# ----------------------------------------------------------------------------- buffer on Redis
async def test_put_get_ack_round_trip_and_memory_bounded(redis_url: str, run_name: str) -> None:
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="c1") as buf:
        sent = [make_group(seed=i, run=run_name) for i in range(5)]
        for g in sent:
            await buf.put(g)
        got = await buf.get_batch(5, block_ms=2000)
        assert len(got) == 5
        for a, b in zip(sent, [d.group for d in got], strict=True):
            assert_same(a, b)
        st1 = await buf.stats()
        assert (st1.length, st1.pending, st1.dead_letter) == (5, 5, 0)
        assert st1.bytes > 0
        assert await buf.ack([d.entry_id for d in got]) == 5
        st2 = await buf.stats()
        assert (st2.length, st2.pending) == (0, 0)  # acked entries are deleted
        # blocking read with nothing there returns [] after the block, without busy-waiting
        t0 = time.monotonic()
        assert await buf.get_batch(3, block_ms=300) == []
        assert 0.25 <= time.monotonic() - t0 < 2.0


async def test_get_batch_blocks_until_batch_complete(redis_url: str, run_name: str) -> None:
    async with (
        await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="c") as buf,
        await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="p") as prod,
    ):
        await buf.ensure_group()

        async def late_puts() -> None:
            for i in range(3):
                await asyncio.sleep(0.1)
                await prod.put(make_group(seed=i, run=run_name))

        task = asyncio.create_task(late_puts())
        got = await buf.get_batch(3, block_ms=5000)
        await task
        assert len(got) == 3


async def test_many_producers_and_consumers_exactly_once(redis_url: str, run_name: str) -> None:
    n_producers, n_consumers, total = 4, 3, 2000
    per_producer = total // n_producers
    received: dict[str, list[str]] = {f"c{i}": [] for i in range(n_consumers)}
    sent: set[str] = set()

    async def producer(p: int) -> None:
        async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer=f"p{p}") as buf:
            for i in range(per_producer):
                g = make_group(n=2, tokens=4, run=run_name, seed=p * 100_000 + i)
                sent.add(g.group_id)
                await buf.put(g)

    async def consumer(name: str, stop: asyncio.Event) -> None:
        async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer=name) as buf:
            while not (stop.is_set() and sum(map(len, received.values())) >= total):
                batch = await buf.get_batch(16, block_ms=100)
                received[name].extend(d.group.group_id for d in batch)
                await buf.ack([d.entry_id for d in batch])
                if stop.is_set() and not batch:
                    return

    stop = asyncio.Event()
    async with await RedisTrajectoryBuffer.open(redis_url, run_name) as b:
        await b.ensure_group()
    consumers = [asyncio.create_task(consumer(c, stop)) for c in received]
    await asyncio.gather(*(producer(p) for p in range(n_producers)))
    stop.set()
    await asyncio.wait_for(asyncio.gather(*consumers), timeout=60)
    everything = [gid for ids in received.values() for gid in ids]
    assert len(everything) == total
    assert set(everything) == sent  # each group exactly once, none lost
    assert all(received.values()), "every consumer should have taken a share"
    async with await RedisTrajectoryBuffer.open(redis_url, run_name) as b:
        st = await b.stats()
        assert (st.length, st.pending, st.dead_letter) == (0, 0, 0)


async def test_dead_consumer_batch_is_reclaimed(redis_url: str, run_name: str) -> None:
    async with (
        await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="dies") as dead,
        await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="lives") as live,
    ):
        for i in range(6):
            await dead.put(make_group(seed=i, run=run_name))
        taken = await dead.get_batch(4, block_ms=1000)  # ... and never acks
        assert len(taken) == 4
        rest = await live.get_batch(10, block_ms=200)
        assert len(rest) == 2  # the dead consumer's four are not redelivered as new
        await live.ack([d.entry_id for d in rest])
        assert await live.reclaim(min_idle_ms=60_000) == []  # not idle long enough yet
        await asyncio.sleep(0.3)
        reclaimed = await live.reclaim(min_idle_ms=200)
        assert sorted(d.group.group_id for d in reclaimed) == sorted(
            d.group.group_id for d in taken
        )
        assert sorted(d.entry_id for d in reclaimed) == sorted(d.entry_id for d in taken)
        await live.ack([d.entry_id for d in reclaimed])
        assert (await live.stats()).pending == 0


async def test_own_pending_after_restart_with_same_name(redis_url: str, run_name: str) -> None:
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="t0") as a:
        await a.put(make_group(run=run_name))
        first = await a.get_batch(1, block_ms=1000)
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="t0") as b:
        again = await b.own_pending()
        assert [d.entry_id for d in again] == [d.entry_id for d in first]  # not a duplicate


async def test_corrupt_entries_are_dead_lettered_and_consumers_continue(
    redis_url: str, run_name: str
) -> None:
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="c") as buf:
        good_before = make_group(seed=1, run=run_name)
        good_after = make_group(seed=2, run=run_name)
        await buf.put(good_before)
        corruptions = _corruptions()
        for _, payload, _ in corruptions:
            await buf.put_encoded(payload, uuid.uuid4().hex)
        await buf.redis.xadd(buf.stream_key, {"x": b"no payload field"})
        await buf.put(good_after)
        got = await buf.get_batch(len(corruptions) + 3, block_ms=500)
        assert [d.group.group_id for d in got] == [good_before.group_id, good_after.group_id]
        st = await buf.stats()
        assert st.dead_letter == len(corruptions) + 1
        assert st.pending == 2  # the dead-lettered ones were acked
        reasons = [r["reason"] for r in await buf.dead_letters()]
        assert any("unknown schema version 99" in r for r in reasons)
        assert any("no 'd' payload" in r for r in reasons)
        assert all(r for r in reasons)


async def test_put_with_lost_reply_is_stored_once(redis_url: str, run_name: str) -> None:
    """The XADD reaches Redis but its reply is lost (connection dropped): the retry finds the
    first attempt and does not store the group again."""
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="c") as buf:
        real_xadd = buf.redis.xadd
        calls = 0

        async def xadd_then_lose_reply(*a: object, **kw: object) -> object:
            nonlocal calls
            calls += 1
            entry = await real_xadd(*a, **kw)  # type: ignore[arg-type]
            if calls == 1:
                raise ConnectionError("connection reset after the command was sent")
            return entry

        buf.redis.xadd = xadd_then_lose_reply  # type: ignore[method-assign]
        g = make_group(run=run_name)
        entry = await buf.put(g)
        assert calls == 1  # the retry found the entry instead of adding it again
        assert (await buf.stats()).length == 1
        got = await buf.get_batch(2, block_ms=300)
        assert [d.entry_id for d in got] == [entry]


async def test_retry_after_consumed_and_acked_is_not_stored_again(
    redis_url: str, run_name: str
) -> None:
    """The first attempt landed, a trainer consumed and acked it (entry deleted), and only then
    does the producer retry: the seen mark written by ``ack`` stops the duplicate."""
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="c") as buf:
        g = make_group(run=run_name)
        entry = await buf.put(g)
        got = await buf.get_batch(1, block_ms=1000)
        await buf.ack([d.entry_id for d in got])
        assert (await buf.stats()).length == 0
        assert await buf.find_put(g.group_id, lookback_s=60) == entry
        assert await buf.find_put(make_group(run=run_name).group_id, lookback_s=60) is None


async def test_redis_crash_between_put_and_get_loses_nothing(
    redis_factory: object, run_name: str, request: pytest.FixtureRequest
) -> None:
    if request.config.getoption("--redis-url"):
        pytest.skip("kills its own redis-server")
    srv = redis_factory(appendonly=True)  # type: ignore[operator]
    sent = [make_group(seed=i, run=run_name) for i in range(20)]
    async with await RedisTrajectoryBuffer.open(srv.url, run_name, consumer="c") as buf:
        await buf.ensure_group()
        for g in sent:
            await buf.put(g)
        half = await buf.get_batch(10, block_ms=1000)
        await buf.ack([d.entry_id for d in half[:5]])  # 5 acked, 5 pending, 10 never read
    srv.restart(crash=True)  # SIGKILL, then start again from the AOF
    async with await RedisTrajectoryBuffer.open(srv.url, run_name, consumer="c") as buf:
        pending = await buf.own_pending()
        fresh = await buf.get_batch(20, block_ms=300)
        ids = [d.group.group_id for d in pending + fresh]
        assert sorted(ids) == sorted(g.group_id for g in sent[5:])
        st = await buf.stats()
        assert st.length == 15


async def test_put_raises_when_redis_stays_down(redis_server: object, run_name: str) -> None:
    buf = await RedisTrajectoryBuffer.open(redis_server.url, run_name)  # type: ignore[attr-defined]
    redis_server.kill()  # type: ignore[attr-defined]
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable, match="put group"):
        await buf.put(make_group(run=run_name))
    assert time.monotonic() - t0 < 30
    await buf.close()


async def test_put_survives_a_short_outage(
    redis_factory: object, run_name: str, request: pytest.FixtureRequest
) -> None:
    if request.config.getoption("--redis-url"):
        pytest.skip("restarts its own redis-server")
    srv = redis_factory(appendonly=True)  # type: ignore[operator]
    async with await RedisTrajectoryBuffer.open(srv.url, run_name, consumer="c") as buf:
        await buf.put(make_group(seed=0, run=run_name))
        srv.kill()

        async def restart_soon() -> None:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(srv.start)

        task = asyncio.create_task(restart_soon())
        await buf.put(make_group(seed=1, run=run_name))  # retried with backoff until Redis is back
        await task
        assert len(await buf.get_batch(2, block_ms=1000)) == 2


async def test_password_protected_redis(
    redis_factory: object, run_name: str, request: pytest.FixtureRequest
) -> None:
    if request.config.getoption("--redis-url"):
        pytest.skip("starts its own password-protected redis-server")
    srv = redis_factory(password="s3cret-pw")  # type: ignore[operator]
    wrong = srv.url.replace("s3cret-pw", "nope")
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable) as ei:
        await RedisTrajectoryBuffer.open(wrong, run_name)
    assert time.monotonic() - t0 < 5  # fails fast, no retry loop on bad credentials
    assert "credentials" in str(ei.value) and "nope" not in str(ei.value)
    no_pw = srv.url.replace(":s3cret-pw@", "")
    with pytest.raises(RedisUnavailable, match="needs a password"):
        await RedisTrajectoryBuffer.open(no_pw, run_name)
    async with await RedisTrajectoryBuffer.open(srv.url, run_name, consumer="c") as buf:
        await buf.put(make_group(run=run_name))
        assert len(await buf.get_batch(1, block_ms=1000)) == 1


async def test_password_from_environment(
    redis_factory: object,
    run_name: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if request.config.getoption("--redis-url"):
        pytest.skip("starts its own password-protected redis-server")
    srv = redis_factory(password="envpw")  # type: ignore[operator]
    monkeypatch.setenv("SLUICE_REDIS_PASSWORD", "envpw")
    r = await connect(f"redis://127.0.0.1:{srv.port}/0")
    assert await r.ping()
    await r.aclose()


def test_redact_url_hides_credentials() -> None:
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("rediss://:pw@h:1/2") == "rediss://:***@h:1/2"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


async def test_bad_url_scheme_named() -> None:
    with pytest.raises(ValueError, match="scheme must be"):
        await connect("http://127.0.0.1:1/0")


async def test_with_retries_gives_up_with_named_operation() -> None:
    calls = 0

    async def always_down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    with pytest.raises(RedisUnavailable, match="my op"):
        await with_retries(always_down, what="my op", attempts=3, base_delay=0.001)
    assert calls == 3


async def test_ack_commits_with_extra_commands_in_one_transaction(
    redis_url: str, run_name: str
) -> None:
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="c") as buf:
        for i in range(3):
            await buf.put(make_group(seed=i, run=run_name))
        got = await buf.get_batch(3, block_ms=1000)
        pointer = f"{run_name}:checkpoint"
        n = await buf.ack([d.entry_id for d in got], also=lambda pipe: pipe.set(pointer, "ckpt-7"))
        assert n == 3
        assert await buf.redis.get(pointer) == b"ckpt-7"
        assert (await buf.stats()).length == 0
        # an ack of nothing but the extra commands still commits them
        assert await buf.ack([], also=lambda pipe: pipe.set(pointer, "ckpt-8")) == 0
        assert await buf.redis.get(pointer) == b"ckpt-8"
        # the seen marks were written: a late retry of these puts finds them
        assert await buf.find_put(got[0].group.group_id, lookback_s=60) == got[0].entry_id


def test_decoded_arrays_are_aligned_read_only_views_of_the_payload() -> None:
    """No copy after Redis: every array is a view into the payload bytes, 8-byte aligned."""
    g = make_group(n=3, tokens=11)
    payload = encode_group(g)
    d = decode_group(payload)
    arrays = [d.prompt_ids] + [
        a for s in d.samples for a in (s.output_ids, s.behaviour_logp, s.token_versions)
    ]
    for a in arrays:
        assert np.shares_memory(a, np.frombuffer(payload, np.uint8))
        assert not a.flags.writeable
    # Each field's data starts 8-byte aligned (samples after the first follow on).
    assert d.prompt_ids.ctypes.data % 8 == 0
    assert all(x.ctypes.data % 4 == 0 for x in arrays)
