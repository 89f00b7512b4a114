"""``VersionManager``: the run's policy version, admission gate, weight events and worker
liveness, kept in Redis so that any process can die and restart and find the run as it was.

Keys (all in the run's namespace ``sluice:{run}:...``, one Redis Cluster slot, named in
``buffer.keys``):

==========================  ==========  ====================================================
``settings``                hash        ``eta``, ``batch_groups``, ``created`` (fixed at run
                                        creation; ``eta`` changes only via ``set_eta``)
``gate``                    hash        ``version``, ``admitted``, ``finished``, ``rejected``,
                                        ``late`` (finish/reject of slots no longer held)
``gate:rejected_by``        hash        reason -> slots rejected for it
``gate:inflight``           hash        worker id -> slots it holds
``workers:expiry``          zset        worker id -> heartbeat expiry (server ms)
``workers:seen``            hash        worker id -> last heartbeat (server ms)
``weights``                 hash        the latest publication: version, location, fmt, time
``weights:events``          stream      one entry per publication, capped at 1,000 (plus
                                        ``distributed`` announcements, docs/weight-sync.md)
``weights:disk``            hash        the latest disk copy (distributed mode): version,
                                        location, fmt, time
``weights:sync_servers``    hash        server URL -> worker id (distributed weight sync), or
                                        a ``SyncServer`` as JSON (``ipc``, docs/weight-sync.md)
``weights:acks:{N}``        list        servers held for the ipc transfer of ``N`` (expires)
``finished``                hash        the run's clean end: ``step``, ``version``, ``time``
                                        (set by the trainer, deleted when one starts again)
==========================  ==========  ====================================================

The class is a thin shell: it checks its arguments (``staleness.checks``), runs one Lua script
per mutation (``staleness.scripts``, which states what each does atomically), and builds its
answers with pure functions (``staleness.records``; the gate's formula is
``staleness.gate.admission_capacity``). Following weight events is ``staleness.events``.

Every mutation is one Lua script, so concurrent workers and trainers never interleave inside
it, and every timestamp is Redis's own clock (``TIME``), so machines with skewed clocks agree
on which heartbeat has expired. The invariants, each with the test that proves it (in
tests/integration/test_version_manager.py unless named otherwise):

- Slot conservation: ``admitted == finished + rejected + sum(inflight)``. Every admitted slot
  is either finished (its group was pushed), rejected (handed back: by the worker, by ``reap``
  when the worker died, or by the trainer through ``drop``) or still held by exactly one
  worker. Checked after every step of ``test_gate_state_machine_on_real_redis`` (the stateful
  model of tests/gate_model.py), and in ``test_admission_follows_the_formula`` and
  ``test_reap_returns_a_dead_workers_slots``.
- The gate admits ``min(n, capacity)`` with ``capacity`` as in
  ``staleness.gate.admission_capacity``, atomically: ``test_admission_follows_the_formula``,
  ``test_concurrent_admissions_admit_exactly_capacity`` (1,000 concurrent calls admit exactly
  the capacity); the formula's staleness bound is proved on the pure model in
  tests/unit/staleness/test_staleness_math.py.
- Retries are exactly-once: each mutating call (admit, finish, reject, drop, publish) carries a
  request id, and its script stores its result under ``req:<id>`` for REQUEST_TTL_S; a retry
  after a lost reply finds the stored result instead of admitting (or publishing) twice
  (``test_retried_mutation_is_applied_once``).
- A dead worker's slots come back once: ``reap`` rejects the slots of workers whose heartbeat
  expired, and of holders that never heart-beat after ``default_worker_ttl``
  (``test_reap_returns_a_dead_workers_slots``,
  ``test_worker_that_never_heartbeats_is_reaped_after_default_ttl``).
- Versions only increase, so a restarted trainer cannot roll the run back
  (``test_publish_versions_only_increase``); ``events`` never misses the latest publication
  and yields strictly increasing versions (``test_events_reach_two_subscribers_in_order``,
  ``test_events_survive_a_redis_restart``).
- A worker that stops cleanly leaves the liveness books (``deregister``), never while it holds
  a slot (``test_deregister_removes_a_worker_that_holds_no_slot``); a run's finished mark is
  set by ``mark_finished`` and removed by ``clear_finished``
  (``test_finished_mark_is_set_read_and_cleared``).
- ``batch_groups`` is fixed for a run and ``eta`` changes only through ``set_eta``
  (``test_open_creates_then_checks_settings``, ``test_set_eta_takes_effect_at_next_admission``,
  ``test_current_eta_reads_the_live_setting``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis

from buffer import keys
from buffer.connection import check_run_name, connect, with_retries
from staleness import scripts
from staleness.checks import (
    check_count,
    check_location,
    check_reason,
    check_run_settings,
    check_setting,
    check_worker,
)
from staleness.events import MAX_BLOCK_MS, follow_events
from staleness.records import (
    GateSnapshot,
    RunFinished,
    RunNotFound,
    RunSettingsMismatch,
    VersionError,
    WeightEvent,
    WorkerInfo,
    decode,
    gate_snapshot,
)

__all__ = [
    "DEFAULT_WORKER_TTL",
    "EVENTS_MAXLEN",
    "REQUEST_TTL_S",
    "WORKER_DEAD",
    "Admission",
    "GateSnapshot",
    "RunFinished",
    "RunNotFound",
    "RunSettingsMismatch",
    "SyncServer",
    "VersionError",
    "VersionManager",
    "Waste",
    "WeightEvent",
    "WorkerInfo",
    "list_runs",
]

log = logging.getLogger("sluice.staleness")

T = TypeVar("T")

EVENTS_MAXLEN = 1000
"""Publications kept in the events stream; a subscriber further behind still gets the latest."""
DEFAULT_WORKER_TTL = 30.0
"""Seconds a worker that was admitted but never heart-beat counts as alive."""
WORKER_DEAD = "worker_dead"
"""The reason ``reap`` records for the slots of a worker whose heartbeat expired."""
REQUEST_TTL_S = 600
"""How long a mutation's result is remembered under its request id (see ``_request_key``)."""


def _check_ttl(default_worker_ttl: float) -> None:
    if not default_worker_ttl > 0:
        raise ValueError(f"default_worker_ttl={default_worker_ttl} must be > 0 seconds")


async def list_runs(client: aioredis.Redis) -> list[str]:
    """Names of the runs in this Redis (those with a ``sluice:{run}:settings`` key), sorted.
    Uses SCAN, never KEYS, so a large Redis is not blocked."""
    runs: set[str] = set()
    async for k in client.scan_iter(match=keys.SETTINGS_GLOB, count=1000):
        run = keys.run_of_settings_key(decode(k))
        if run is None:
            continue
        try:
            runs.add(check_run_name(run))
        except ValueError:
            continue
    return sorted(runs)


@dataclass(frozen=True)
class Admission:
    """What ``VersionManager.admit`` granted: ``slots`` groups, admitted at ``version``."""

    slots: int
    version: int


@dataclass(frozen=True)
class Waste:
    """``VersionManager.waste``: generated tokens (``pushed``; ``rejected:<reason>`` for groups a
    worker handed back before their push, ``dropped:<reason>`` for pushed groups the trainer
    dropped) and the slots handed back per reason."""

    tokens: dict[str, int]
    groups: dict[str, int]
    refused: int = 0
    """Admission calls the gate granted less than asked (a worker held back by eta)."""

    @property
    def generated_tokens(self) -> int:
        """Tokens pushed, plus those of groups handed back before their push."""
        return sum(v for k, v in self.tokens.items() if k == "pushed" or k.startswith("rejected:"))

    @property
    def wasted_tokens(self) -> int:
        """Tokens of groups never trained: handed back by a worker or dropped by the trainer."""
        return sum(v for k, v in self.tokens.items() if k != "pushed")

    def wasted_by(self) -> dict[str, int]:
        """Wasted tokens by cause (``rejected:cancelled_stale``, ``dropped:stale``, ...)."""
        return {k: v for k, v in self.tokens.items() if k != "pushed" and v}


@dataclass(frozen=True)
class SyncServer:
    """One server registered for weight sync (``register_sync_servers``)."""

    worker: str
    kind: str = "distributed"
    host: str | None = None
    """The host name of the worker that launched it (``ipc``)."""
    tp: int = 1
    """Its tensor-parallel ranks (``ipc``: one payload per rank)."""

    @classmethod
    def parse(cls, value: str) -> SyncServer:
        """A registration's stored value: a plain worker id (distributed) or JSON."""
        if not value.startswith("{"):
            return cls(value)
        try:
            d = json.loads(value)
            return cls(str(d["worker"]), str(d["kind"]), d.get("host"), int(d.get("tp", 1)))
        except (ValueError, KeyError, TypeError):
            return cls(value, "unknown")


class VersionManager:
    """The run's version, admission gate, weight events and worker liveness.

    Open with ``await VersionManager.open(url, run, eta=2, batch_groups=8)``: creates the run's
    settings if absent, else checks them (``RunSettingsMismatch`` names both values); pass
    ``None`` to read the run's values (``RunNotFound`` if the run does not exist).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        run: str,
        *,
        eta: int,
        batch_groups: int,
        owns_client: bool = False,
        default_worker_ttl: float = DEFAULT_WORKER_TTL,
    ) -> None:
        """Wrap a client on a run whose settings are ``eta`` and ``batch_groups``; prefer
        ``open`` / ``from_client``, which read (or create) and check the run's settings."""
        check_run_name(run)
        _check_ttl(default_worker_ttl)
        self.redis = client
        self.run = run
        self.default_worker_ttl = default_worker_ttl
        self._owns_client = owns_client
        self.k_settings = keys.settings(run)
        self.k_gate = keys.gate(run)
        self.k_rejected_by = keys.gate_rejected_by(run)
        self.k_inflight = keys.gate_inflight(run)
        self.k_inflight_at = keys.gate_inflight_at(run)
        self.k_tokens = keys.gate_tokens(run)
        self.k_eta_changes = keys.eta_changes(run)
        self.k_expiry = keys.worker_expiry(run)
        self.k_seen = keys.workers_seen(run)
        self.k_weights = keys.weights(run)
        self.k_events = keys.weight_events(run)
        self.k_disk = keys.weights_disk(run)
        self.k_sync_servers = keys.sync_servers(run)
        self.k_finished = keys.run_finished(run)
        self._admit = client.register_script(scripts.ADMIT_LUA)
        self._release = client.register_script(scripts.RELEASE_LUA)
        self._drop = client.register_script(scripts.DROP_LUA)
        self._reap = client.register_script(scripts.REAP_LUA)
        self._heartbeat = client.register_script(scripts.HEARTBEAT_LUA)
        self._publish = client.register_script(scripts.PUBLISH_LUA)
        self._set_eta = client.register_script(scripts.SET_ETA_LUA)
        self._announce = client.register_script(scripts.ANNOUNCE_LUA)
        self._disk = client.register_script(scripts.DISK_LUA)
        self._deregister = client.register_script(scripts.DEREGISTER_LUA)
        self._mark_finished = client.register_script(scripts.MARK_FINISHED_LUA)
        self.eta = eta
        """The run's eta as of ``open`` (``set_eta`` may change it later; ``snapshot`` reads it)."""
        self.batch_groups = batch_groups

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def open(
        cls,
        url: str,
        run: str,
        *,
        eta: int | None = None,
        batch_groups: int | None = None,
        default_worker_ttl: float = DEFAULT_WORKER_TTL,
    ) -> VersionManager:
        """Connect to ``url`` and attach to ``run`` (see the class docstring)."""
        client = await connect(url, socket_timeout=MAX_BLOCK_MS / 1000 + 10)
        try:
            return await cls._attach(
                client,
                run,
                eta=eta,
                batch_groups=batch_groups,
                owns_client=True,
                default_worker_ttl=default_worker_ttl,
            )
        except BaseException:
            await client.aclose()
            raise

    @classmethod
    async def open_or_create(
        cls,
        url: str,
        run: str,
        *,
        eta: int,
        batch_groups: int,
        check_batch_groups: bool,
        default_worker_ttl: float = DEFAULT_WORKER_TTL,
    ) -> VersionManager:
        """Attach to ``run``, or create it with ``eta`` and ``batch_groups`` when it does not
        exist yet. With ``check_batch_groups`` an existing run whose ``batch_groups`` differs
        raises ``RunSettingsMismatch`` (a trainer's step must consume what the gate admits per
        version); without it the run's settings are taken as they are (compare ``eta`` and
        ``batch_groups`` on the result)."""
        try:
            return await cls.open(
                url,
                run,
                batch_groups=batch_groups if check_batch_groups else None,
                default_worker_ttl=default_worker_ttl,
            )
        except RunNotFound:
            return await cls.open(
                url,
                run,
                eta=eta,
                batch_groups=batch_groups,
                default_worker_ttl=default_worker_ttl,
            )

    @classmethod
    async def from_client(
        cls,
        client: aioredis.Redis,
        run: str,
        *,
        eta: int | None = None,
        batch_groups: int | None = None,
        default_worker_ttl: float = DEFAULT_WORKER_TTL,
    ) -> VersionManager:
        """Like ``open`` on a client you own (it is not closed by ``close``)."""
        return await cls._attach(
            client,
            run,
            eta=eta,
            batch_groups=batch_groups,
            owns_client=False,
            default_worker_ttl=default_worker_ttl,
        )

    @classmethod
    async def _attach(
        cls,
        client: aioredis.Redis,
        run: str,
        *,
        eta: int | None,
        batch_groups: int | None,
        owns_client: bool,
        default_worker_ttl: float,
    ) -> VersionManager:
        """Create the run's settings if absent, else read and check them (one script), then
        wrap the client with them."""
        check_run_name(run)
        _check_ttl(default_worker_ttl)
        if eta is not None:
            check_setting("eta", eta, 0)
        if batch_groups is not None:
            check_setting("batch_groups", batch_groups, 1)
        res = await scripts.call_script(
            run,
            client.register_script(scripts.OPEN_LUA),
            [keys.settings(run), keys.gate(run)],
            ["" if eta is None else eta, "" if batch_groups is None else batch_groups],
            what="open run",
        )
        have_eta, have_b = check_run_settings(run, eta, batch_groups, res)
        if int(res[0]) == 2:
            log.info("created run %s (eta=%d, batch_groups=%d)", run, have_eta, have_b)
        return cls(
            client,
            run,
            eta=have_eta,
            batch_groups=have_b,
            owns_client=owns_client,
            default_worker_ttl=default_worker_ttl,
        )

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    async def __aenter__(self) -> VersionManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self, script: Any, script_keys: list[str], args: list[Any], *, what: str
    ) -> Any:
        return await scripts.call_script(self.run, script, script_keys, args, what=what)

    def _request_key(self) -> str:
        """A fresh request id's key: one per logical call, shared by its retries."""
        return keys.request(self.run, uuid.uuid4().hex)

    async def _retry(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        return await with_retries(op, what=f"run {self.run}: {what}")

    # ------------------------------------------------------------------ version and weights
    async def version(self) -> int:
        """The current policy version (0 until the first publication)."""
        v = await self._retry(lambda: self.redis.hget(self.k_gate, "version"), "read version")
        return int(v or 0)

    async def publish_weights(self, version: int, location: str, fmt: str = "safetensors") -> str:
        """Make ``version`` current: sets the version, records ``{version, location, fmt, time}``
        and appends the event, in one atomic step. Returns the event's stream id.

        Raises ``VersionError`` if ``version`` is not above the current one (versions only
        increase, so a restarted trainer cannot roll the run back)."""
        check_setting("version", version, 1)
        check_location("publish_weights", location)
        res = await self._call(
            self._publish,
            [self.k_settings, self.k_gate, self.k_weights, self.k_events, self._request_key()],
            [version, location, fmt, EVENTS_MAXLEN, REQUEST_TTL_S],
            what=f"publish version {version}",
        )
        return decode(res)

    async def latest_weights(self) -> WeightEvent | None:
        """The latest publication, or None before the first."""
        rec = await self._retry(lambda: self.redis.hgetall(self.k_weights), "read weights")
        return WeightEvent.from_fields(rec) if rec else None

    async def announce_weights(self, version: int, location: str, fmt: str) -> str:
        """Append an event for ``version`` (above the current one) WITHOUT making it current:
        the distributed path announces a broadcast this way, then ``publish_weights`` once the
        weights are there. ``events`` yields the announcement; the later publication of the same
        version is not yielded again to a subscriber that saw it. Returns the event id."""
        check_setting("version", version, 1)
        check_location("announce_weights", location)
        res = await self._call(
            self._announce,
            [self.k_gate, self.k_events],
            [version, location, fmt, EVENTS_MAXLEN],
            what=f"announce version {version}",
        )
        return decode(res)

    async def record_disk_weights(
        self, version: int, location: str, fmt: str = "safetensors"
    ) -> bool:
        """Record a disk copy of ``version`` (the catch-up source for servers that missed a
        broadcast). Keeps the newest: returns False if an equal or newer copy is recorded."""
        check_setting("version", version, 0)
        check_location("record_disk_weights", location)
        res = await self._call(
            self._disk, [self.k_disk], [version, location, fmt], what=f"record disk v{version}"
        )
        return bool(int(res))

    async def latest_disk_weights(self) -> WeightEvent | None:
        """The newest recorded disk copy, or None (then version 0 is ``model.path``)."""
        rec = await self._retry(lambda: self.redis.hgetall(self.k_disk), "read disk weights")
        return WeightEvent.from_fields(rec) if rec else None

    async def register_sync_servers(
        self,
        worker_id: str,
        urls: list[str],
        *,
        kind: str = "distributed",
        host: str | None = None,
        tp_size: int = 1,
    ) -> None:
        """Offer ``urls`` (servers this worker drives) for weight sync of ``kind``:
        ``distributed`` (stored as the worker id) or ``ipc`` (servers this worker launched on
        ``host``, each with ``tp_size`` ranks; stored as JSON, ``SyncServer``)."""
        check_worker(worker_id)
        if urls:
            value = (
                worker_id
                if kind == "distributed"
                else json.dumps({"worker": worker_id, "kind": kind, "host": host, "tp": tp_size})
            )
            mapping: dict[Any, Any] = {u: value for u in urls}
            await self._retry(
                lambda: self.redis.hset(self.k_sync_servers, mapping=mapping),
                "register sync servers",
            )

    async def unregister_sync_servers(self, urls: list[str]) -> None:
        if urls:
            await self._retry(
                lambda: self.redis.hdel(self.k_sync_servers, *urls), "unregister sync servers"
            )

    async def sync_server_records(self, kind: str = "distributed") -> dict[str, SyncServer]:
        """Servers registered for weight sync of ``kind``: URL -> ``SyncServer``."""
        raw = await self._retry(lambda: self.redis.hgetall(self.k_sync_servers), "sync servers")
        out = {}
        for k, v in raw.items():
            rec = SyncServer.parse(decode(v))
            if rec.kind == kind:
                out[decode(k)] = rec
        return out

    async def sync_servers(self, kind: str = "distributed") -> dict[str, str]:
        """Registered servers of ``kind``: URL -> worker id."""
        return {u: r.worker for u, r in (await self.sync_server_records(kind)).items()}

    async def ack_sync(self, version: int, url: str) -> None:
        """The worker of ``url`` holds its new requests for the transfer of ``version``
        (ipc weight sync: the trainer sends only once every target acknowledged)."""
        key = keys.sync_acks(self.run, version)

        async def op() -> Any:
            async with self.redis.pipeline(transaction=True) as p:
                p.rpush(key, url)
                p.expire(key, REQUEST_TTL_S)
                return await p.execute()

        await self._retry(op, f"ack sync v{version}")

    async def wait_sync_acks(self, version: int, urls: set[str], timeout_s: float) -> set[str]:
        """The servers of ``urls`` acknowledged (``ack_sync``) for ``version`` within
        ``timeout_s`` (all of them, or those acknowledged when it ran out)."""
        key = keys.sync_acks(self.run, version)
        got: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while not urls <= got:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            res = await self.redis.blpop([key], timeout=max(0.01, min(left, 1.0)))
            if res is not None:
                got.add(decode(res[1]))
        return got & urls

    def events(
        self, after: int | None = None, *, block_ms: int = MAX_BLOCK_MS
    ) -> AsyncIterator[WeightEvent]:
        """Weight publications with version > ``after``, in version order, forever.

        First yields the current publication if it is newer than ``after`` (``after=None``:
        whatever is current), then every later one. Never misses the latest: after a dropped
        connection or a Redis restart it yields the current publication if it is newer than
        the last one it yielded, skipping versions it missed while away (weights supersede each
        other). Versions yielded are strictly increasing. ``staleness.events`` holds the rule
        and why it reads a capped stream. Raises ``RedisUnavailable`` if Redis stays
        unreachable through ``with_retries``.
        """
        return follow_events(self.redis, self.run, after, block_ms=block_ms)

    # ------------------------------------------------------------------ admission gate
    async def try_admit(self, worker_id: str, n: int = 1) -> int:
        """Admit up to ``n`` new groups for ``worker_id`` within the staleness gate; returns how
        many (0..n). ``admit`` also says the version they were admitted at."""
        return (await self.admit(worker_id, n)).slots

    async def admit(self, worker_id: str, n: int = 1) -> Admission:
        """Admit up to ``n`` new groups for ``worker_id`` within the staleness gate: how many
        (0..n) and the version they were admitted at (the gate's version in the same atomic
        step, so a worker never labels a group newer than the capacity that let it in). One
        atomic Lua step: ``min(n, capacity)`` with ``capacity`` as in
        ``staleness.gate.admission_capacity``; the slots are booked on the worker (which is
        registered as alive for ``default_worker_ttl`` if it never heart-beat or its heartbeat
        expired: a worker asking for room is alive) and under their admission version
        (``inflight_by_version``). Every admitted slot must later be ``finish``-ed or
        ``reject``-ed, or ``reap`` returns it."""
        check_worker(worker_id)
        check_count("try_admit", n)
        if n == 0:
            return Admission(0, await self.version())
        ttl_ms = max(1, round(self.default_worker_ttl * 1000))
        res = await self._call(
            self._admit,
            [
                self.k_settings,
                self.k_gate,
                self.k_inflight,
                self.k_expiry,
                self.k_seen,
                self._request_key(),
                self.k_inflight_at,
            ],
            [worker_id, n, ttl_ms, REQUEST_TTL_S],
            what=f"admit {n} for {worker_id}",
        )
        return Admission(int(res[0]), int(res[1]))

    async def finish(
        self, worker_id: str, n: int = 1, *, version: int | None = None, tokens: int = 0
    ) -> int:
        """``n`` of the worker's groups were pushed: their slots become finished. Returns how many
        the worker still held (fewer if ``reap`` already returned them; the rest counts as
        ``late``: their groups are in the buffer but the trainer's staleness check guards it).
        ``version``: their admission version (they leave ``inflight_by_version`` there; None:
        the worker's oldest); ``tokens``: the tokens they carry (``token_counts``)."""
        check_worker(worker_id)
        check_count("finish", n)
        return await self._release_slots(worker_id, n, "finish", "", version, tokens)

    async def reject(
        self,
        worker_id: str,
        n: int = 1,
        reason: str = "rejected",
        *,
        version: int | None = None,
        tokens: int = 0,
    ) -> int:
        """Hand ``n`` of the worker's slots back (reward filter, failure, ...): counted as rejected,
        by ``reason``. Returns how many the worker still held (see ``finish``). ``tokens``: what
        had been generated for them, counted as wasted under ``reason`` (``token_counts``)."""
        check_worker(worker_id)
        check_count("reject", n)
        check_reason("reject", reason)
        return await self._release_slots(worker_id, n, "reject", reason, version, tokens)

    async def _release_slots(
        self, worker_id: str, n: int, how: str, reason: str, version: int | None, tokens: int
    ) -> int:
        check_count("tokens", tokens)
        return int(
            await self._call(
                self._release,
                [
                    self.k_gate,
                    self.k_inflight,
                    self.k_rejected_by,
                    self._request_key(),
                    self.k_inflight_at,
                    self.k_tokens,
                ],
                [
                    worker_id,
                    n,
                    how,
                    reason,
                    REQUEST_TTL_S,
                    "" if version is None else version,
                    tokens,
                ],
                what=f"{how} {n} for {worker_id}",
            )
        )

    async def drop(self, n: int = 1, reason: str = "stale", *, tokens: int = 0) -> int:
        """The trainer dropped ``n`` finished groups (over-stale, undecodable): their slots move
        from finished to rejected, so the capacity they held comes back. Without this, every
        dropped group would shrink the gate's capacity for good. ``tokens``: the tokens they
        carried, counted as wasted under ``reason``. Returns how many moved."""
        check_count("drop", n)
        check_count("tokens", tokens)
        check_reason("drop", reason)
        return int(
            await self._call(
                self._drop,
                [self.k_gate, self.k_rejected_by, self._request_key(), self.k_tokens],
                [n, reason, REQUEST_TTL_S, tokens],
                what=f"drop {n}",
            )
        )

    async def inflight_by_version(self) -> dict[int, int]:
        """Slots admitted and not yet finished or handed back, by admission version (every
        worker's together): the groups still being generated."""
        raw = await self._retry(lambda: self.redis.hgetall(self.k_inflight_at), "inflight")
        out: dict[int, int] = {}
        for f, c in raw.items():
            _w, _, v = decode(f).rpartition("|")
            try:
                out[int(v)] = out.get(int(v), 0) + int(c)
            except ValueError:
                continue
        return {v: c for v, c in out.items() if c > 0}

    async def waste(self) -> Waste:
        """The run's generated tokens and what was thrown away, with the slots handed back by
        reason (one MULTI)."""

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.k_tokens)
                pipe.hgetall(self.k_rejected_by)
                pipe.hget(self.k_gate, "refused")
                return list(await pipe.execute())

        tok, rej, refused = await self._retry(op, "read waste")
        return Waste(
            tokens={decode(k): int(v) for k, v in tok.items()},
            groups={decode(k): int(v) for k, v in rej.items()},
            refused=int(refused or 0),
        )

    async def current_eta(self) -> int:
        """The run's staleness limit as stored now (``sluice run set-eta`` may have changed it)."""

        async def op() -> Any:
            return await self.redis.hget(self.k_settings, "eta")

        raw = await self._retry(op, "read eta")
        if raw is None:
            raise RunNotFound(f"run {self.run!r} has no settings in this Redis")
        self.eta = int(raw)
        return self.eta

    async def set_eta(self, eta: int, *, why: dict[str, Any] | None = None) -> int:
        """Change the run's staleness limit; the next admission uses it. Returns the old value.
        ``why``: the measurements behind the change (``staleness.eta: auto``), logged with it
        in the run's eta changes (``eta_changes``)."""
        check_setting("eta", eta, 0)
        old = int(await self._call(self._set_eta, [self.k_settings], [eta], what="set eta"))
        self.eta = eta
        if why is not None and old != eta:
            entry = json.dumps({"from": old, "to": eta, "time": time.time(), **why})
            await self._retry(
                lambda: self.redis.xadd(self.k_eta_changes, {"d": entry}, maxlen=1000),
                "log eta change",
            )
        return old

    async def narrow_admission(self, eta: int, *, why: dict[str, Any] | None = None) -> None:
        """The first half of lowering eta without waste: admit as if eta were ``eta`` (the
        gate uses the smaller of the two) while the bound stays the run's eta, until
        ``set_eta`` makes ``eta`` the bound too (and ends the narrowing). Groups admitted
        before stay trainable under the eta they were admitted under; those admitted after
        fit the new one."""
        check_setting("eta", eta, 0)
        await self._retry(
            lambda: self.redis.hset(self.k_settings, "eta_admit", eta), "narrow admission"
        )
        if why is not None:
            entry = json.dumps({"admit": eta, "time": time.time(), **why})
            await self._retry(
                lambda: self.redis.xadd(self.k_eta_changes, {"d": entry}, maxlen=1000),
                "log eta change",
            )

    async def set_eta_auto(self, settings: dict[str, Any] | None) -> None:
        """Mark the run's eta as run by ``staleness.eta: auto`` with these ``settings`` (shown
        by ``sluice status``), or as fixed again (None)."""

        async def op() -> Any:
            if settings is None:
                return await self.redis.hdel(self.k_settings, "eta_auto")
            return await self.redis.hset(self.k_settings, "eta_auto", json.dumps(settings))

        await self._retry(op, "set eta auto")

    async def eta_changes(self, count: int = 20) -> list[dict[str, Any]]:
        """The newest ``count`` changes ``staleness.eta: auto`` made, oldest first, each with
        the measurements behind it."""
        rows = await self._retry(
            lambda: self.redis.xrevrange(self.k_eta_changes, count=count), "read eta changes"
        )
        out: list[dict[str, Any]] = []
        for _id, fields in reversed(rows or []):
            raw = (fields or {}).get(b"d") or (fields or {}).get("d")
            try:
                entry = json.loads(decode(raw)) if raw else None
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    # ------------------------------------------------------------------ worker liveness
    async def heartbeat(self, worker_id: str, ttl: float = DEFAULT_WORKER_TTL) -> None:
        """``worker_id`` is alive for the next ``ttl`` seconds (Redis clock)."""
        check_worker(worker_id)
        if not ttl > 0:
            raise ValueError(f"heartbeat: ttl={ttl} must be > 0 seconds")
        await self._call(
            self._heartbeat,
            [self.k_expiry, self.k_seen],
            [worker_id, max(1, round(ttl * 1000))],
            what=f"heartbeat {worker_id}",
        )

    async def reap(self) -> dict[str, int]:
        """Remove workers whose heartbeat expired (and slot holders with no heartbeat at all);
        their slots are rejected with reason ``worker_dead``. Atomic, so any number of processes
        may call it concurrently and a slot is returned once. Returns {worker: slots returned}."""
        res = await self._call(
            self._reap,
            [
                self.k_gate,
                self.k_inflight,
                self.k_rejected_by,
                self.k_expiry,
                self.k_seen,
                self.k_inflight_at,
            ],
            [WORKER_DEAD],
            what="reap dead workers",
        )
        out = {decode(res[i]): int(res[i + 1]) for i in range(0, len(res), 2)}
        if out:
            log.warning("run %s: reaped dead workers %s", self.run, out)
        return out

    async def deregister(self, worker_id: str) -> int:
        """A worker that stopped cleanly leaves the liveness books (its heartbeat expiry and
        last-seen time), so ``sluice status`` shows it stopped rather than expired. Only when it
        holds no slot: returns the slots it still holds (0: removed); a holder stays until
        ``reap`` hands its slots back."""
        check_worker(worker_id)
        return int(
            await self._call(
                self._deregister,
                [self.k_inflight, self.k_expiry, self.k_seen],
                [worker_id],
                what=f"deregister {worker_id}",
            )
        )

    # ------------------------------------------------------------------ the run's end
    async def mark_finished(self, step: int) -> RunFinished:
        """The run ended cleanly at ``step`` (the trainer reached ``max_steps`` or its
        ``reward_target``). Workers following the run read it (``run_finished``) and exit, or
        wait for the run to start again (``rollout.on_run_finished``); a trainer that starts
        the run again removes it (``clear_finished``). Returns the mark."""
        check_setting("step", step, 0)
        res = await self._call(
            self._mark_finished,
            [self.k_finished, self.k_gate],
            [step],
            what=f"mark finished at step {step}",
        )
        mark = RunFinished(step=step, version=int(decode(res[0])), time=float(decode(res[1])))
        log.info("run %s finished at step %d (version %d)", self.run, step, mark.version)
        return mark

    async def run_finished(self) -> RunFinished | None:
        """The run's finished mark, or None while the run goes on (or never ended)."""
        rec = await self._retry(lambda: self.redis.hgetall(self.k_finished), "read finished mark")
        return RunFinished.from_fields(rec) if rec else None

    async def clear_finished(self) -> RunFinished | None:
        """A trainer starts the run again: remove the finished mark. Returns the mark it
        removed (None: there was none)."""

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.k_finished)
                pipe.delete(self.k_finished)
                return list(await pipe.execute())

        rec, _ = await self._retry(op, "clear finished mark")
        if not rec:
            return None
        mark = RunFinished.from_fields(rec)
        log.info("run %s (finished at step %d) starts again", self.run, mark.step)
        return mark

    # ------------------------------------------------------------------ observability
    async def snapshot(self) -> GateSnapshot:
        """Everything ``sluice status`` shows, read in one MULTI."""

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.k_settings)
                pipe.hgetall(self.k_gate)
                pipe.hgetall(self.k_rejected_by)
                pipe.hgetall(self.k_inflight)
                pipe.zrange(self.k_expiry, 0, -1, withscores=True)
                pipe.hgetall(self.k_seen)
                pipe.hgetall(self.k_weights)
                # TIME through a script on a key of the run: it runs on the run's node (a
                # keyless TIME cannot join a transaction on a Redis Cluster).
                pipe.execute_command("EVAL", scripts.TIME_LUA, 1, self.k_gate)
                return list(await pipe.execute())

        return gate_snapshot(self.run, await self._retry(op, "snapshot"))
