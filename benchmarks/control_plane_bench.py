"""Control-plane load: how many rollout workers one Redis holds.

N simulated rollout workers (asyncio, no model) and one consuming trainer share a run on one
private ``redis-server``. Each simulated worker is built by the worker's own
``rollout_workers.parts.connect`` (its two connections, the version manager, buffer, prompt
leases and metrics records) and makes the real calls of the real worker at its rates:

* per group: ``try_admit`` (the gate's Lua script), ``version``, ``PromptSource.lease``, a
  simulated generation (``--groups-per-s`` per worker, ``--inflight`` groups at a time),
  ``RedisTrajectoryBuffer.put`` of a real encoded group of ``--group-tokens`` output tokens
  over ``--samples`` samples, ``finish`` and ``release``;
* housekeeping at the worker's intervals (``rollout`` defaults): heartbeat + reap every
  ``heartbeat_ttl_s / 3``, the run's finished mark every 2 s, lease renewal every
  ``lease_ttl_s / 3``, the metrics hash every ``metrics_interval_s``;
* the weight-event watch: ``VersionManager.events`` (a blocking XREAD per worker).

The trainer (its own process) reads batches with ``get_batch``, acks them (the seen marks, XACK
and XDEL) and publishes a new version every ``--publish-every-s`` seconds, which wakes every
worker's watch. The gate is sized so it never binds (``batch_groups`` far above what is in
flight): this measures Redis and the calls, not the staleness policy.

N grows in steps (``--workers``), ``--step-s`` seconds each; the first ``--warmup-s`` of a step
are not measured. Workers are spread over ``--procs`` load-generator processes. Per step it
reports operations/s by kind, client-observed p50/p99 latency of admission and put, Redis's own
CPU (INFO cpu) and memory, Redis's server-side time per call (INFO commandstats), the
generators' CPU and the consumer's lag; and the first N whose p99 admission latency passes
``--threshold-ms`` (after which it stops, unless ``--keep-going``). The books are checked at
the end: ``admitted == finished + rejected + sum(inflight)``.

Client-observed latency includes the generator's own event loop: when the generators' CPU is
near 100 % of their cores, the latency is the machine's, not Redis's (the JSON carries both).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import resource
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

DEFAULT_WORKERS = (50, 100, 200, 400, 700, 1000)
RUN_END_POLL_S = 2.0  # rollout_workers.worker.RUN_END_POLL_S
LATENCY_KINDS = ("admit", "put")
RAMP_BURST = 25  # workers a generator connects at once
RAMP_LIMIT_S = 60.0  # a step whose workers take longer to connect ends the bench
# Kinds the generators count; the trainer's are read, ack, publish.
KINDS = (
    "admit",
    "version",
    "lease",
    "put",
    "finish",
    "release",
    "heartbeat",
    "reap",
    "run_finished",
    "renew",
    "metrics",
    "event",
    "reaped",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG of latency and ops/s against N")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=list(DEFAULT_WORKERS),
        help="simulated workers per step, increasing (default 50 100 200 400 700 1000)",
    )
    p.add_argument("--step-s", type=float, default=10.0, help="seconds per step (default 10)")
    p.add_argument(
        "--warmup-s", type=float, default=3.0, help="unmeasured seconds at a step's start (3)"
    )
    p.add_argument(
        "--groups-per-s", type=float, default=5.0, help="groups per second per worker (5)"
    )
    p.add_argument("--inflight", type=int, default=8, help="groups in flight per worker (8)")
    p.add_argument("--group-tokens", type=int, default=2048, help="output tokens per group (2048)")
    p.add_argument("--samples", type=int, default=8, help="samples per group (8)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens (128)")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument("--batch", type=int, default=256, help="groups per trainer read (256)")
    p.add_argument(
        "--publish-every-s", type=float, default=5.0, help="seconds between versions (5)"
    )
    p.add_argument(
        "--threshold-ms", type=float, default=5.0, help="p99 admission latency limit (5)"
    )
    p.add_argument(
        "--abort-ms",
        type=float,
        default=500.0,
        help="stop after a step whose p99 admission passed this, even with --keep-going (500)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="run every step even after p99 admission passed the threshold",
    )


# ---------------------------------------------------------------- pure summaries
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def first_past(rows: list[dict[str, Any]], threshold_ms: float) -> int | None:
    """The smallest N whose p99 admission latency passed ``threshold_ms`` (None: none did)."""
    for r in sorted(rows, key=lambda r: r["workers"]):
        p99 = r["admit_ms"]["p99"]
        if p99 is not None and p99 > threshold_ms:
            return int(r["workers"])
    return None


def kept_up(row: dict[str, Any], groups_per_s: float, within: float = 0.9) -> bool:
    """The generators made at least ``within`` of the offered admissions + puts (one admission
    and one put per group): the step measured N workers at their rate, not a slowed-down N."""
    return bool(row["admit_plus_put_per_s"] >= within * 2 * groups_per_s * row["workers"])


def workers_per_redis_core(rows: list[dict[str, Any]], groups_per_s: float) -> float | None:
    """An estimate, linear in N: the workers one Redis core (100 % CPU) would serve at this
    rate, from the measured Redis CPU per worker of the largest step that kept up (None when
    none did). Redis runs commands on one thread, so its core is its ceiling."""
    ok = [r for r in rows if kept_up(r, groups_per_s) and r["redis_cpu_pct"] > 0]
    if not ok:
        return None
    r = max(ok, key=lambda r: r["workers"])
    return 100.0 * float(r["workers"]) / float(r["redis_cpu_pct"])


def groups_per_redis_core(rows: list[dict[str, Any]]) -> float | None:
    """An estimate: groups a second one Redis core (100 % CPU) would carry, from the measured
    Redis CPU per pushed group (everything the workers and the trainer send, housekeeping
    included) of the step with the most groups. None before any group was pushed."""
    ok = [r for r in rows if r["ops_per_s"]["put"] > 0 and r["redis_cpu_us_per_group"] > 0]
    if not ok:
        return None
    r = max(ok, key=lambda r: r["ops_per_s"]["put"])
    return 1e6 / float(r["redis_cpu_us_per_group"])


def _commandstats(info: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """INFO commandstats -> {command: (calls, usec)}."""
    out = {}
    for k, v in info.items():
        if k.startswith("cmdstat_") and isinstance(v, dict):
            out[k[len("cmdstat_") :]] = (int(v.get("calls", 0)), float(v.get("usec", 0)))
    return out


# ---------------------------------------------------------------- one simulated worker
class _Recorder:
    """Counts by kind and latencies (ms) of admit and put, kept while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.counts: dict[str, int] = defaultdict(int)
        self.lat: dict[str, list[float]] = {k: [] for k in LATENCY_KINDS}
        self.errors = 0

    async def timed(self, kind: str, coro: Any) -> Any:
        t0 = time.perf_counter()
        res = await coro
        if self.on:
            self.counts[kind] += 1
            if kind in self.lat:
                self.lat[kind].append((time.perf_counter() - t0) * 1000)
        return res

    def count(self, kind: str, n: int = 1) -> None:
        if self.on:
            self.counts[kind] += n

    def take(self) -> dict[str, Any]:
        out = {"counts": dict(self.counts), "lat": self.lat, "errors": self.errors}
        self.counts = defaultdict(int)
        self.lat = {k: [] for k in LATENCY_KINDS}
        self.errors = 0
        return out


def _template(cfg: dict[str, Any], seed: int) -> list[Any]:
    import numpy as np

    from buffer.schema import Sample

    rng = np.random.default_rng(seed)
    per = max(1, cfg["group_tokens"] // cfg["samples"])
    return [
        Sample(
            output_ids=rng.integers(0, 150_000, per, dtype=np.int32),
            behaviour_logp=-rng.random(per, dtype=np.float32),
            token_versions=np.zeros(per, dtype=np.int32),
            reward=float(rng.random()),
            finish_reason="length",
            index=i,
        )
        for i in range(cfg["samples"])
    ]


class _SimWorker:
    def __init__(self, wid: str, cfg: dict[str, Any], rec: _Recorder, prompts: list[Any]) -> None:
        from rollout_workers.config import RolloutConfig

        self.wid = wid
        self.cfg = cfg
        self.rec = rec
        self.prompts = prompts
        self.rc = RolloutConfig(max_inflight_groups=cfg["inflight"])
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.groups: set[asyncio.Task[None]] = set()
        self.bg: list[asyncio.Task[None]] = []
        self.samples = _template(cfg, hash(wid) & 0xFFFF)
        self.parts: Any = None
        self.version = 0

    async def start(self) -> None:
        from rollout_workers.parts import RunInfo, connect

        info = RunInfo(
            name=self.cfg["run"],
            seed=0,
            redis_url=self.cfg["url"],
            model_path="unused",
            eta=self.cfg["eta"],
            batch_groups=self.cfg["batch_groups"],
        )
        self.parts = await connect(info, self.wid, self.prompts, self.rc)
        await self.parts.versions.heartbeat(self.wid, self.rc.heartbeat_ttl_s)
        for fn in (self._housekeeping, self._watch, self._admission):
            self.bg.append(asyncio.create_task(self._guard(fn)))

    async def _guard(self, fn: Any) -> None:
        """A loop that failed is counted (the JSON's ``errors``) and started again."""
        while True:
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.rec.errors += 1
                if self.rec.errors == 1:
                    print(f"{self.wid}: {fn.__name__}: {e!r}", flush=True)
                await asyncio.sleep(0.1)

    async def _admission(self) -> None:
        vs, rec = self.parts.versions, self.rec
        backoff = 0.02
        while not self.stop.is_set():
            self.wake.clear()
            room = self.rc.max_inflight_groups - len(self.groups)
            if room <= 0:
                await self.wake.wait()
                continue
            k = await rec.timed("admit", vs.try_admit(self.wid, room))
            if k == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.02
            version = await rec.timed("version", vs.version())
            for _ in range(k):
                t = asyncio.create_task(self._group(version))
                self.groups.add(t)
                t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        self.groups.discard(t)
        self.wake.set()
        if not t.cancelled() and t.exception() is not None:
            self.rec.errors += 1

    async def _group(self, version: int) -> None:
        from buffer.schema import TrajectoryGroup

        p, rec = self.parts, self.rec
        lease = await rec.timed("lease", p.prompts.lease())
        try:
            # A group takes inflight / rate seconds on average, so the worker makes
            # --groups-per-s groups a second with --inflight in flight.
            mean = self.cfg["inflight"] / self.cfg["groups_per_s"]
            await asyncio.sleep(mean * random.uniform(0.5, 1.5))
        except asyncio.CancelledError:
            await p.versions.reject(self.wid, 1, "shutdown")
            await p.prompts.release(lease, requeue=True)
            raise
        group = TrajectoryGroup(
            run_id=self.cfg["run"],
            prompt_id=lease.prompt.id,
            prompt_ids=self._prompt_ids,
            samples=self.samples,
            worker_id=self.wid,
            admission_version=version,
        )
        push = asyncio.ensure_future(self._push(group, lease))
        try:
            await asyncio.shield(push)
        except asyncio.CancelledError:
            await push

    @property
    def _prompt_ids(self) -> Any:
        import numpy as np

        return np.arange(self.cfg["prompt_tokens"], dtype=np.int32)

    async def _push(self, group: Any, lease: Any) -> None:
        p, rec = self.parts, self.rec
        await rec.timed("put", p.buffer.put(group))
        await rec.timed("finish", p.versions.finish(self.wid, 1))
        await rec.timed("release", p.prompts.release(lease))

    async def _housekeeping(self) -> None:
        vs, rc, rec = self.parts.versions, self.rc, self.rec
        hb_every = rc.heartbeat_ttl_s / 3
        lease_every = rc.lease_ttl_s / 3
        tick = min(hb_every, lease_every, rc.metrics_interval_s, RUN_END_POLL_S, 1.0)
        # Spread the workers' phases, as workers started at different times are.
        last_hb = last_lease = last_metrics = last_end = time.monotonic() - random.uniform(0, 5)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last_hb >= hb_every:
                await rec.timed("heartbeat", vs.heartbeat(self.wid, rc.heartbeat_ttl_s))
                rec.count("reaped", len(await rec.timed("reap", vs.reap())))
                last_hb = now
            if now - last_end >= RUN_END_POLL_S:
                await rec.timed("run_finished", vs.run_finished())
                last_end = now
            if now - last_lease >= lease_every:
                await rec.timed("renew", self.parts.prompts.renew_all())
                last_lease = now
            if now - last_metrics >= rc.metrics_interval_s:
                m = {"groups_pushed": 0, "status": "running", "servers": [], "version": 0}
                await rec.timed("metrics", self.parts.records.write_metrics(m))
                last_metrics = now

    async def _watch(self) -> None:
        async for ev in self.parts.versions.events(after=self.version):
            self.version = ev.version
            self.rec.count("event")

    async def close(self) -> None:
        self.stop.set()
        self.wake.set()
        for t in self.bg:
            t.cancel()
        for t in list(self.groups):
            t.cancel()
        await asyncio.gather(*self.bg, *self.groups, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.parts.versions.deregister(self.wid)
        await self.parts.close()


# ---------------------------------------------------------------- a generator process
def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _generator(idx: int, cfg: dict[str, Any], conn: Any) -> None:
    from rollout_workers.tasks.base import Prompt

    _raise_nofile()
    prompts = [Prompt(id=f"p{i}", input_ids=[1, 2, 3, i], answer=i) for i in range(4096)]
    rec = _Recorder()
    workers: list[_SimWorker] = []
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            n_local = msg
            t_ramp = time.time()
            while len(workers) < n_local:  # connect in bursts, not one at a time
                new = [
                    _SimWorker(f"sim-{idx}-{len(workers) + i}", cfg, rec, prompts)
                    for i in range(min(RAMP_BURST, n_local - len(workers)))
                ]
                await asyncio.gather(*(w.start() for w in new))
                workers.extend(new)
            conn.send({"ramp_s": time.time() - t_ramp})
            while not conn.poll():  # the driver's window, once every generator has ramped
                await asyncio.sleep(0.01)
            window = conn.recv()
            if window is None:  # the driver stopped (its ramp limit passed)
                break
            measure_from, end_at = window
            await asyncio.sleep(max(0.0, measure_from - time.time()))
            rec.take()
            rec.on = True
            cpu0 = time.process_time()
            await asyncio.sleep(max(0.0, end_at - time.time()))
            rec.on = False
            cpu = time.process_time() - cpu0
            out = rec.take()
            out["cpu_s"] = cpu
            out["workers"] = len(workers)
            conn.send(out)
    finally:
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
        conn.send({"closed": len(workers)})


def _generator_main(idx: int, cfg: dict[str, Any], conn: Any) -> None:
    import logging

    # A reaped worker is counted (ops "reaped"), not logged: the table shows it.
    logging.getLogger("sluice").setLevel(logging.ERROR)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_generator(idx, cfg, conn))


# ---------------------------------------------------------------- the trainer process
async def _trainer(cfg: dict[str, Any], consumed: Any, stop: Any, cpu: Any) -> None:
    from buffer.redis_buffer import RedisTrajectoryBuffer
    from staleness.version_manager import VersionManager

    buf = await RedisTrajectoryBuffer.open(cfg["url"], cfg["run"], consumer="bench-trainer")
    vm = await VersionManager.open(cfg["url"], cfg["run"])
    try:
        await buf.ensure_group()
        version = await vm.version()
        last_pub = time.monotonic()
        while not stop.is_set():
            got = await buf.get_batch(cfg["batch"], block_ms=200)
            if got:
                await buf.ack([d.entry_id for d in got])
                with consumed.get_lock():
                    consumed.value += len(got)
            if time.monotonic() - last_pub >= cfg["publish_every_s"]:
                version += 1
                await vm.publish_weights(version, f"/bench/v{version}")
                last_pub = time.monotonic()
            cpu.value = time.process_time()
    finally:
        await vm.close()
        await buf.close()


def _trainer_main(cfg: dict[str, Any], consumed: Any, stop: Any, cpu: Any) -> None:
    asyncio.run(_trainer(cfg, consumed, stop, cpu))


# ---------------------------------------------------------------- the driver
def _redis_sample(r: Any, run: str) -> dict[str, Any]:
    from buffer import keys

    info = r.info("all")
    return {
        "t": time.time(),
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "used_memory": int(info["used_memory"]),
        "used_memory_rss": int(info["used_memory_rss"]),
        "clients": int(info["connected_clients"]),
        "commands": int(info["total_commands_processed"]),
        "keys": int(r.dbsize()),
        "stream_len": int(r.xlen(keys.stream(run))),
        "cmd": _commandstats(info),
    }


def _summarize_step(
    n: int,
    reports: list[dict[str, Any]],
    r0: dict[str, Any],
    r1: dict[str, Any],
    consumed: int,
    trainer_cpu_s: float,
    window: float,
    procs: int,
) -> dict[str, Any]:
    counts: dict[str, int] = defaultdict(int)
    lat: dict[str, list[float]] = {k: [] for k in LATENCY_KINDS}
    errors = 0
    gen_cpu = 0.0
    for rep in reports:
        for k, v in rep["counts"].items():
            counts[k] += v
        for k in LATENCY_KINDS:
            lat[k].extend(rep["lat"][k])
        errors += rep["errors"]
        gen_cpu += rep["cpu_s"]
    ops = {k: counts.get(k, 0) / window for k in KINDS}
    ops["trainer_read_groups"] = consumed / window
    calls: dict[str, dict[str, float]] = {}
    for c, (n1, u1) in r1["cmd"].items():
        n0, u0 = r0["cmd"].get(c, (0, 0.0))
        if n1 - n0 > 0:
            calls[c] = {"per_s": (n1 - n0) / window, "usec_per_call": (u1 - u0) / (n1 - n0)}

    def ms(kind: str) -> dict[str, float | None]:
        v = lat[kind]
        return {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}

    return {
        "workers": n,
        "window_s": window,
        "ops_per_s": ops,
        "admit_plus_put_per_s": ops["admit"] + ops["put"],
        "redis_commands_per_s": (r1["commands"] - r0["commands"]) / window,
        "admit_ms": ms("admit"),
        "put_ms": ms("put"),
        "redis_cpu_pct": 100 * (r1["cpu_s"] - r0["cpu_s"]) / window,
        "redis_cpu_us_per_group": 1e6 * (r1["cpu_s"] - r0["cpu_s"]) / max(1, counts.get("put", 0)),
        "redis_cpu_us_per_command": 1e6
        * (r1["cpu_s"] - r0["cpu_s"])
        / max(1, r1["commands"] - r0["commands"]),
        "redis_used_memory": r1["used_memory"],
        "redis_used_memory_rss": r1["used_memory_rss"],
        "redis_memory_growth_per_s": (r1["used_memory"] - r0["used_memory"]) / window,
        "redis_keys": r1["keys"],
        "redis_clients": r1["clients"],
        "stream_len": r1["stream_len"],
        "server_calls": calls,
        "generator_cpu_pct": 100 * gen_cpu / window,
        "generator_cores": procs,
        "trainer_cpu_pct": 100 * trainer_cpu_s / window,
        "errors": errors,
    }


def _run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from staleness.version_manager import VersionManager

    ns = sorted(set(args.workers))
    run = "cp" + uuid.uuid4().hex[:8]
    # The gate never binds: this measures Redis and the calls, not the staleness policy.
    cfg = {
        "url": url,
        "run": run,
        "eta": 1,
        "batch_groups": 10_000_000,
        "inflight": args.inflight,
        "groups_per_s": args.groups_per_s,
        "group_tokens": args.group_tokens,
        "samples": args.samples,
        "prompt_tokens": args.prompt_tokens,
        "batch": args.batch,
        "publish_every_s": args.publish_every_s,
    }

    async def create() -> None:
        vm = await VersionManager.open(url, run, eta=cfg["eta"], batch_groups=cfg["batch_groups"])
        await vm.close()

    asyncio.run(create())
    ctx = mp.get_context("spawn")
    consumed = ctx.Value("q", 0)
    tcpu = ctx.Value("d", 0.0)
    stop = ctx.Event()
    trainer = ctx.Process(target=_trainer_main, args=(cfg, consumed, stop, tcpu), daemon=True)
    trainer.start()
    pipes, gens = [], []
    for i in range(args.procs):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_generator_main, args=(i, cfg, b), daemon=True)
        p.start()
        pipes.append(a)
        gens.append(p)
    r = redis.Redis.from_url(url)
    rows: list[dict[str, Any]] = []
    balanced: dict[str, Any] = {}
    try:
        for n in ns:
            share = [n // args.procs + (1 if i < n % args.procs else 0) for i in range(args.procs)]
            for conn, k in zip(pipes, share, strict=True):
                conn.send(k)
            ramp = 0.0
            for conn in pipes:
                ramp = max(ramp, conn.recv()["ramp_s"] if conn.poll(RAMP_LIMIT_S) else 1e9)
            if ramp > RAMP_LIMIT_S:
                print(f"N={n}: workers not connected within {RAMP_LIMIT_S:.0f}s: stopping")
                break
            start = time.time()
            measure_from = start + args.warmup_s
            end = start + args.step_s
            for conn in pipes:
                conn.send((measure_from, end))
            time.sleep(max(0.0, measure_from - time.time()))
            r0 = _redis_sample(r, run)
            c0, t0 = consumed.value, tcpu.value
            time.sleep(max(0.0, end - time.time()))
            r1 = _redis_sample(r, run)
            c1, t1 = consumed.value, tcpu.value
            window = r1["t"] - r0["t"]
            reports = [conn.recv() for conn in pipes]
            row = _summarize_step(n, reports, r0, r1, c1 - c0, t1 - t0, window, args.procs)
            row["workers_started"] = sum(rep["workers"] for rep in reports)
            row["ramp_s"] = ramp
            row["kept_up"] = kept_up(row, args.groups_per_s)
            rows.append(row)
            print(
                f"N={n}: admit p50/p99 {_f(row['admit_ms']['p50'])}/{_f(row['admit_ms']['p99'])}"
                f" ms, put p99 {_f(row['put_ms']['p99'])} ms, admit+put "
                f"{row['admit_plus_put_per_s']:,.0f}/s, redis cpu {row['redis_cpu_pct']:.0f}%,"
                f" generators cpu {row['generator_cpu_pct']:.0f}%",
                flush=True,
            )
            p99 = row["admit_ms"]["p99"]
            if p99 is not None and (
                p99 > args.abort_ms or (not args.keep_going and p99 > args.threshold_ms)
            ):
                break
    finally:
        for conn in pipes:
            with contextlib.suppress(OSError):
                conn.send(None)
        for conn in pipes:
            with contextlib.suppress(EOFError, OSError):
                if conn.poll(60):
                    conn.recv()
        for p in gens:
            p.join(30)
        stop.set()
        trainer.join(30)
        balanced = _books(url, run)
        r.close()
    return {"rows": rows, "books": balanced, "run": run, "config": cfg}


def _books(url: str, run: str) -> dict[str, Any]:
    from staleness.version_manager import VersionManager

    async def read() -> dict[str, Any]:
        vm = await VersionManager.open(url, run)
        try:
            snap = await vm.snapshot()
        finally:
            await vm.close()
        held = snap.inflight_total
        return {
            "admitted": snap.admitted,
            "finished": snap.finished,
            "rejected": snap.rejected,
            "inflight": held,
            "late": snap.late,
            "version": snap.version,
            "balanced": snap.admitted == snap.finished + snap.rejected + held,
        }

    return asyncio.run(read())


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def run(args: argparse.Namespace) -> int:
    from benchmarks.common import machine_info, print_table, write_json
    from procs import RedisServer

    if args.procs < 1 or args.inflight < 1 or args.groups_per_s <= 0 or args.step_s <= 0:
        raise SystemExit("control-plane: --procs, --inflight, --groups-per-s, --step-s must be > 0")
    if args.warmup_s >= args.step_s:
        raise SystemExit("control-plane: --warmup-s must be below --step-s")
    import signal

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # stop the generators, trainer and Redis on the way out

    signal.signal(signal.SIGTERM, _term)
    load_before = os.getloadavg()
    server = RedisServer().start()
    try:
        res = _run(server.url, args)
    finally:
        server.cleanup()
    rows = res["rows"]
    past = first_past(rows, args.threshold_ms)
    held = [r["workers"] for r in rows if r["admit_ms"]["p99"] is not None]
    held = [n for n in held if past is None or n < past]
    print_table(
        f"control plane, one Redis ({args.groups_per_s:g} groups/s/worker, "
        f"{args.group_tokens} tokens/group, {args.procs} generator processes)",
        [
            "workers",
            "admit+put/s",
            "redis cmd/s",
            "admit p50 ms",
            "admit p99 ms",
            "put p50 ms",
            "put p99 ms",
            "redis CPU %",
            "redis MB",
            "gen CPU %",
            "lag",
        ],
        [
            [
                r["workers"],
                r["admit_plus_put_per_s"],
                r["redis_commands_per_s"],
                r["admit_ms"]["p50"],
                r["admit_ms"]["p99"],
                r["put_ms"]["p50"],
                r["put_ms"]["p99"],
                r["redis_cpu_pct"],
                r["redis_used_memory"] / 1e6,
                r["generator_cpu_pct"],
                r["stream_len"],
            ]
            for r in rows
        ],
        width=170,
    )
    print(
        f"p99 admission > {args.threshold_ms:g} ms first at N={past}"
        if past is not None
        else f"p99 admission stayed <= {args.threshold_ms:g} ms up to N={max(held, default=0)}"
    )
    print(f"books: {res['books']}")
    doc = {
        "benchmark": "control-plane",
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "threshold_ms": args.threshold_ms,
        "first_n_past_threshold": past,
        "max_n_held": max(held, default=None),
        "workers_per_redis_core_estimate": workers_per_redis_core(rows, args.groups_per_s),
        "groups_per_s_per_redis_core_estimate": groups_per_redis_core(rows),
        "books": res["books"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": rows,
    }
    write_json(args.json, doc)
    if args.plot:
        plot(rows, args.plot, args.threshold_ms, doc["machine"])
    return 0 if res["books"].get("balanced") else 1


def plot(
    rows: list[dict[str, Any]], path: str | Path, threshold_ms: float, m: dict[str, Any]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["workers"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for kind, style in (("admit", "-"), ("put", "--")):
        for q, c in (("p50", "tab:blue"), ("p99", "tab:red")):
            a.plot(
                ns,
                [r[f"{kind}_ms"][q] for r in rows],
                style,
                marker="o",
                color=c,
                label=f"{kind} {q}",
            )
    a.axhline(threshold_ms, color="grey", lw=0.8, ls=":")
    a.set_yscale("log")
    a.set_xlabel("simulated workers")
    a.set_ylabel("client-observed latency (ms)")
    a.set_title("admission and put latency")
    a.legend(fontsize=8)
    kinds = ("admit", "lease", "put", "finish", "release", "version", "heartbeat", "event")
    for k in kinds:
        b.plot(ns, [r["ops_per_s"][k] for r in rows], marker=".", label=k)
    b.plot(
        ns,
        [r["redis_commands_per_s"] for r in rows],
        "k-",
        lw=2,
        label="redis commands (scripts' inner calls too)",
    )
    b.set_yscale("log")
    b.set_xlabel("simulated workers")
    b.set_ylabel("per second")
    b.set_title("operations by kind")
    b2 = b.twinx()
    b2.plot(ns, [r["redis_cpu_pct"] for r in rows], "k:", label="redis CPU %")
    b2.set_ylabel("redis CPU % of one core")
    b2.set_ylim(0, 110)
    b.legend(fontsize=6, loc="center right")
    fig.suptitle(
        f"control plane on one Redis ({m.get('cpus')} CPUs, {m.get('cpu', '')})", fontsize=9
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
