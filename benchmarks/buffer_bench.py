"""Buffer throughput against raw redis-py on the same bytes, in the same run.

For each sample length T (output tokens per sample), the same groups (8 samples each) are moved
twice through a private redis-server (or ``--redis-url``):

* **buffer**: ``RedisTrajectoryBuffer.put`` (encode + one XADD; retries look up a lost reply), then
  ``get_batch`` (XREADGROUP + validated decode) and ``ack`` (XACK + XDEL in one transaction);
* **raw**: a naive redis-py loop: ``msgpack.packb`` of the same arrays as bytes + XADD, then
  XREADGROUP + ``msgpack.unpackb`` + XACK.

Rounds alternate raw and buffer; rates are medians over rounds. ``put_ratio`` and
``get_ratio`` are buffer / raw throughput (1.0 = no overhead), the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

DEFAULT_TOKENS = (256, 2048, 16384)
GROUP_SIZE = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=list(DEFAULT_TOKENS),
        help="output tokens per sample to test (default 256 2048 16384)",
    )
    p.add_argument(
        "--mb-per-round",
        type=float,
        default=48.0,
        help="payload megabytes moved per round and side (default 48)",
    )
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--batch", type=int, default=8, help="groups per read (default 8)")


def _make_groups(tokens: int, count: int, seed: int) -> list[Any]:
    import numpy as np

    from buffer.schema import Sample, TrajectoryGroup

    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(count):
        samples = [
            Sample(
                output_ids=rng.integers(0, 150_000, tokens, dtype=np.int32),
                behaviour_logp=-rng.random(tokens, dtype=np.float32),
                token_versions=np.full(tokens, 3, dtype=np.int32),
                reward=float(rng.random()),
                finish_reason="length",
                index=i,
            )
            for i in range(GROUP_SIZE)
        ]
        groups.append(
            TrajectoryGroup(
                run_id="bench",
                prompt_id=uuid.uuid4().hex,
                prompt_ids=rng.integers(0, 150_000, 128, dtype=np.int32),
                samples=samples,
                worker_id="bench",
                admission_version=3,
            )
        )
    return groups


def _naive_doc(g: Any) -> dict[str, Any]:
    return {
        "gid": g.group_id,
        "prompt": g.prompt_ids.tobytes(),
        "samples": [
            {
                "o": s.output_ids.tobytes(),
                "l": s.behaviour_logp.tobytes(),
                "v": s.token_versions.tobytes(),
                "r": s.reward,
                "f": s.finish_reason,
            }
            for s in g.samples
        ],
    }


async def _raw_round(r: Any, groups: list[Any], batch: int) -> tuple[float, float]:
    import msgpack

    stream = f"bench:raw:{uuid.uuid4().hex}"
    await r.xgroup_create(stream, "g", id="0", mkstream=True)
    t0 = time.perf_counter()
    for g in groups:
        await r.xadd(stream, {"d": msgpack.packb(_naive_doc(g), use_bin_type=True)})
    put_s = time.perf_counter() - t0
    got = 0
    t0 = time.perf_counter()
    while got < len(groups):
        resp = await r.xreadgroup(
            "g", "c", {stream: ">"}, count=min(batch, len(groups) - got), block=1000
        )
        ids = []
        for eid, fields in resp[0][1]:
            msgpack.unpackb(fields[b"d"], raw=False)
            ids.append(eid)
        await r.xack(stream, "g", *ids)
        got += len(ids)
    get_s = time.perf_counter() - t0
    await r.delete(stream)
    return put_s, get_s


async def _buffer_round(url: str, groups: list[Any], batch: int) -> tuple[float, float]:
    from buffer import keys
    from buffer.redis_buffer import RedisTrajectoryBuffer

    run = "bench" + uuid.uuid4().hex[:8]
    buf = await RedisTrajectoryBuffer.open(url, run, consumer="c")
    try:
        await buf.ensure_group()
        t0 = time.perf_counter()
        for g in groups:
            await buf.put(g)
        put_s = time.perf_counter() - t0
        got = 0
        t0 = time.perf_counter()
        while got < len(groups):
            delivered = await buf.get_batch(min(batch, len(groups) - got), block_ms=1000)
            await buf.ack([d.entry_id for d in delivered])
            got += len(delivered)
        get_s = time.perf_counter() - t0
        await buf.redis.delete(buf.stream_key)
        left = [k async for k in buf.redis.scan_iter(match=keys.namespace(run), count=1000)]
        if left:
            await buf.redis.delete(*left)
    finally:
        await buf.close()
    return put_s, get_s


async def _bench(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from buffer.codec import encode_group
    from buffer.connection import connect

    r = await connect(url)
    results = []
    try:
        for tokens in args.tokens:
            probe = _make_groups(tokens, 1, 0)[0]
            group_bytes = len(encode_group(probe))
            count = max(16, int(args.mb_per_round * 1e6 / group_bytes))
            groups = _make_groups(tokens, count, tokens)
            raw_put, raw_get, buf_put, buf_get = [], [], [], []
            for _ in range(args.rounds):
                p, g = await _raw_round(r, groups, args.batch)
                raw_put.append(p)
                raw_get.append(g)
                p, g = await _buffer_round(url, groups, args.batch)
                buf_put.append(p)
                buf_get.append(g)
            n_samples = count * GROUP_SIZE
            mb = count * group_bytes / 1e6

            def rate(times: list[float], n: float = n_samples) -> float:
                return n / statistics.median(times)

            row = {
                "tokens": tokens,
                "groups": count,
                "samples": n_samples,
                "group_bytes": group_bytes,
                "put_per_s": rate(buf_put),
                "get_per_s": rate(buf_get),
                "raw_put_per_s": rate(raw_put),
                "raw_get_per_s": rate(raw_get),
                "put_mb_per_s": rate(buf_put, mb),
                "get_mb_per_s": rate(buf_get, mb),
            }
            # Paired: each round's buffer time against the raw time of the same round, so load
            # that shifts both between rounds cancels; the median over rounds is reported.
            row["put_ratio"] = statistics.median(
                r / b for r, b in zip(raw_put, buf_put, strict=True)
            )
            row["get_ratio"] = statistics.median(
                r / b for r, b in zip(raw_get, buf_get, strict=True)
            )
            results.append(row)
    finally:
        await r.aclose()
    return results


def run(args: argparse.Namespace) -> int:
    from benchmarks.common import machine_info, print_table, write_json
    from procs import RedisServer

    server = None
    url = args.redis_url
    if url is None:
        server = RedisServer().start()
        url = server.url
    try:
        results = asyncio.run(_bench(url, args))
    finally:
        if server is not None:
            server.cleanup()
    print_table(
        f"buffer vs raw redis-py ({GROUP_SIZE} samples/group; rates in samples/s)",
        [
            "tokens",
            "put/s",
            "raw put/s",
            "put ratio",
            "get/s",
            "raw get/s",
            "get ratio",
            "put MB/s",
            "get MB/s",
        ],
        [
            [
                r["tokens"],
                r["put_per_s"],
                r["raw_put_per_s"],
                round(r["put_ratio"], 3),
                r["get_per_s"],
                r["raw_get_per_s"],
                round(r["get_ratio"], 3),
                r["put_mb_per_s"],
                r["get_mb_per_s"],
            ]
            for r in results
        ],
    )
    write_json(
        args.json,
        {
            "benchmark": "buffer",
            "machine": machine_info(),
            "group_size": GROUP_SIZE,
            "results": results,
        },
    )
    return 0
