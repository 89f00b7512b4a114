"""``VersionManager``: the run's policy version, admission gate, weight events and worker
liveness, kept in Redis so that any process can die and restart and find the run as it was.

Keys (all in the run's namespace ``sluice:{run}:...``, one Redis Cluster slot):

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
``weights:sync_servers``    hash        server URL -> worker id, for distributed weight sync
==========================  ==========  ====================================================

Every mutation is one Lua script, so concurrent workers and trainers never interleave inside
it, and every timestamp is Redis's own clock (``TIME``), so machines with skewed clocks agree
on which heartbeat has expired.

Slot conservation (checked after every step of ``tests/integration/test_version_manager.py``'s stateful
test): ``admitted == finished + rejected + sum(inflight)``. Every admitted slot is either
finished (its group was pushed), rejected (handed back: by the worker, by ``reap`` when the
worker died, or by the trainer through ``drop``) or still held by exactly one worker.

Retries are exactly-once: each mutating call (admit, finish, reject, drop, publish) carries a
request id, and its script stores its result under ``req:<id>`` for REQUEST_TTL_S; a retry after
a lost reply finds the stored result instead of admitting (or publishing) twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from buffer import keys
from buffer.connection import (
    TRANSIENT,
    check_run_name,
    closed_transport,
    connect,
    with_retries,
)
from staleness.gate import admission_capacity

log = logging.getLogger("sluice.staleness")

T = TypeVar("T")

EVENTS_MAXLEN = 1000
"""Publications kept in the events stream; a subscriber further behind still gets the latest."""
DEFAULT_WORKER_TTL = 30.0
"""Seconds a worker that was admitted but never heart-beat counts as alive."""
WORKER_DEAD = "worker_dead"
"""The reason ``reap`` records for the slots of a worker whose heartbeat expired."""
_MAX_BLOCK_MS = 5000
REQUEST_TTL_S = 600
"""How long a mutation's result is remembered under its request id (see ``_request_key``)."""

# KEYS: settings, gate. ARGV: eta or '', batch_groups or ''.
# Returns {0} if the run does not exist and no values were given, {2, eta, B} if it created the
# run, {1, eta, B} if it existed.
_OPEN_LUA = """
local eta = redis.call('HGET', KEYS[1], 'eta')
if not eta then
  if ARGV[1] == '' or ARGV[2] == '' then return {0} end
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'eta', ARGV[1], 'batch_groups', ARGV[2], 'created', t[1])
  for _, f in ipairs({'version', 'admitted', 'finished', 'rejected', 'late'}) do
    redis.call('HSETNX', KEYS[2], f, 0)
  end
  return {2, ARGV[1], ARGV[2]}
end
return {1, eta, redis.call('HGET', KEYS[1], 'batch_groups')}
"""

# KEYS: settings, gate, inflight, expiry, seen, request. ARGV: worker, n, default ttl ms.
# The staleness gate: admits min(n, capacity) with
#   capacity = max(0, (version + eta + 1) * batch_groups - (admitted - rejected))
# (the same formula as staleness.gate.admission_capacity) and books them on the worker.
_ADMIT_LUA = """
local done = redis.call('GET', KEYS[6])
if done then return tonumber(done) end
local s = redis.call('HMGET', KEYS[1], 'eta', 'batch_groups')
if not s[1] then return redis.error_reply('SLUICE_NORUN run settings are missing') end
local g = redis.call('HMGET', KEYS[2], 'version', 'admitted', 'rejected')
local v = tonumber(g[1] or '0')
local a = tonumber(g[2] or '0')
local r = tonumber(g[3] or '0')
local cap = (v + tonumber(s[1]) + 1) * tonumber(s[2]) - (a - r)
if cap < 0 then cap = 0 end
local k = math.min(tonumber(ARGV[2]), cap)
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('HSET', KEYS[5], ARGV[1], now)
end
if k > 0 then
  redis.call('HINCRBY', KEYS[2], 'admitted', k)
  redis.call('HINCRBY', KEYS[3], ARGV[1], k)
end
redis.call('SET', KEYS[6], k, 'EX', ARGV[4])
return k
"""

# KEYS: gate, inflight, rejected_by, request. ARGV: worker, n, 'finish' | 'reject', reason,
# request ttl s.
# Moves up to n of the worker's held slots to finished or rejected; the excess (slots reap
# already returned) is counted in 'late'. Returns how many were moved.
_RELEASE_LUA = """
local done = redis.call('GET', KEYS[4])
if done then return tonumber(done) end
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local n = tonumber(ARGV[2])
local k = math.min(n, held)
if k > 0 then
  if held == k then redis.call('HDEL', KEYS[2], ARGV[1])
  else redis.call('HINCRBY', KEYS[2], ARGV[1], -k) end
  if ARGV[3] == 'finish' then
    redis.call('HINCRBY', KEYS[1], 'finished', k)
  else
    redis.call('HINCRBY', KEYS[1], 'rejected', k)
    redis.call('HINCRBY', KEYS[3], ARGV[4], k)
  end
end
if n > k then redis.call('HINCRBY', KEYS[1], 'late', n - k) end
redis.call('SET', KEYS[4], k, 'EX', ARGV[5])
return k
"""

# KEYS: gate, rejected_by, request. ARGV: n, reason, request ttl s. Finished groups the
# trainer dropped (over-stale) hand their slots back: finished -= k, rejected += k.
# Returns k = min(n, finished).
_DROP_LUA = """
local done = redis.call('GET', KEYS[3])
if done then return tonumber(done) end
local f = tonumber(redis.call('HGET', KEYS[1], 'finished') or '0')
local k = math.min(tonumber(ARGV[1]), f)
if k > 0 then
  redis.call('HINCRBY', KEYS[1], 'finished', -k)
  redis.call('HINCRBY', KEYS[1], 'rejected', k)
  redis.call('HINCRBY', KEYS[2], ARGV[2], k)
end
redis.call('SET', KEYS[3], k, 'EX', ARGV[3])
return k
"""

# KEYS: gate, inflight, rejected_by, expiry, seen. ARGV: reason.
# Workers whose heartbeat expired, and holders of slots with no heartbeat at all, are removed;
# their slots are rejected. Returns {worker, slots, worker, slots, ...}.
_REAP_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. now)
for _, w in ipairs(redis.call('HKEYS', KEYS[2])) do
  if not redis.call('ZSCORE', KEYS[4], w) then table.insert(dead, w) end
end
local out = {}
for _, w in ipairs(dead) do
  local n = tonumber(redis.call('HGET', KEYS[2], w) or '0')
  if n > 0 then
    redis.call('HINCRBY', KEYS[1], 'rejected', n)
    redis.call('HINCRBY', KEYS[3], ARGV[1], n)
  end
  redis.call('HDEL', KEYS[2], w)
  redis.call('ZREM', KEYS[4], w)
  redis.call('HDEL', KEYS[5], w)
  table.insert(out, w)
  table.insert(out, n)
end
return out
"""

# KEYS: expiry, seen. ARGV: worker, ttl ms.
_HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], now)
return now
"""

# KEYS: settings, gate, weights, events, request. ARGV: version, location, fmt, maxlen,
# request ttl s.
# Sets the version, the latest record and appends the event in one step; versions only grow.
_PUBLISH_LUA = """
local done = redis.call('GET', KEYS[5])
if done then return done end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('SLUICE_NORUN run settings are missing')
end
local cur = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
local v = tonumber(ARGV[1])
if v <= cur then
  return redis.error_reply('SLUICE_VERSION ' .. ARGV[1] .. ' ' .. tostring(cur))
end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[2], 'version', ARGV[1])
redis.call('HSET', KEYS[3], 'version', ARGV[1], 'location', ARGV[2], 'fmt', ARGV[3], 'time', now)
local id = redis.call('XADD', KEYS[4], 'MAXLEN', ARGV[4], '*',
                      'version', ARGV[1], 'location', ARGV[2], 'fmt', ARGV[3], 'time', now)
redis.call('SET', KEYS[5], id, 'EX', ARGV[5])
return id
"""

# KEYS: gate, events. ARGV: version, location, fmt, maxlen.
# An announcement: appends an event for a version above the current one without making it
# current (the weights are not there yet). Returns the event id.
_ANNOUNCE_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if tonumber(ARGV[1]) <= cur then
  return redis.error_reply('SLUICE_VERSION ' .. ARGV[1] .. ' ' .. tostring(cur))
end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
return redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*',
                  'version', ARGV[1], 'location', ARGV[2], 'fmt', ARGV[3], 'time', now)
"""

# KEYS: disk. ARGV: version, location, fmt. Records a disk copy if newer than the recorded one.
# Returns 1 if recorded, 0 if an equal or newer copy was already there.
_DISK_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if tonumber(ARGV[1]) <= cur then return 0 end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'location', ARGV[2], 'fmt', ARGV[3], 'time', now)
return 1
"""

# KEYS: settings. ARGV: eta. Returns the previous eta.
_SET_ETA_LUA = """
local old = redis.call('HGET', KEYS[1], 'eta')
if not old then return redis.error_reply('SLUICE_NORUN run settings are missing') end
redis.call('HSET', KEYS[1], 'eta', ARGV[1])
return old
"""


class RunNotFound(LookupError):
    """The run has no settings in this Redis and none were given to create it."""


class RunSettingsMismatch(ValueError):
    """A process started with ``eta`` or ``batch_groups`` different from the run's."""


class VersionError(ValueError):
    """A weight publication whose version is not above the current one."""


@dataclass(frozen=True)
class WeightEvent:
    """One weight publication."""

    version: int
    """The policy version these weights are (> every earlier publication's)."""
    location: str
    """Where the weights are: a path or URL the consumers can load."""
    fmt: str
    """Their format, e.g. ``safetensors``."""
    time: float
    """Redis server time of the publication (unix seconds)."""

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> WeightEvent:
        return cls(
            version=int(fields[b"version"]),
            location=fields.get(b"location", b"").decode(),
            fmt=fields.get(b"fmt", b"").decode(),
            time=float(fields.get(b"time", b"0")),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "location": self.location,
            "fmt": self.fmt,
            "time": self.time,
        }


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    seconds_since_heartbeat: float
    expires_in: float
    """Seconds until the heartbeat expires (negative: expired, ``reap`` will take its slots)."""
    inflight: int

    @property
    def alive(self) -> bool:
        return self.expires_in > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seconds_since_heartbeat": round(self.seconds_since_heartbeat, 3),
            "expires_in": round(self.expires_in, 3),
            "alive": self.alive,
            "inflight": self.inflight,
        }


@dataclass(frozen=True)
class GateSnapshot:
    """A consistent read (one MULTI) of the run's version, settings and counters.

    ``admitted == finished + rejected + inflight_total`` holds in every snapshot.
    """

    run: str
    version: int
    eta: int
    batch_groups: int
    admitted: int
    finished: int
    rejected: int
    rejected_by: dict[str, int]
    inflight: dict[str, int]
    late: int
    """finish/reject calls for slots the worker no longer held (``reap`` had returned them)."""
    capacity: int
    workers: list[WorkerInfo]
    weights: WeightEvent | None
    time: float
    """Redis server time of the snapshot."""
    inflight_total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inflight_total", sum(self.inflight.values()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "version": self.version,
            "eta": self.eta,
            "batch_groups": self.batch_groups,
            "admitted": self.admitted,
            "finished": self.finished,
            "rejected": self.rejected,
            "rejected_by": dict(self.rejected_by),
            "inflight": self.inflight_total,
            "inflight_by_worker": dict(self.inflight),
            "late": self.late,
            "capacity": self.capacity,
            "workers": [w.as_dict() for w in self.workers],
            "weights": self.weights.as_dict() if self.weights else None,
            "time": self.time,
        }


def _s(b: bytes | str) -> str:
    return b.decode() if isinstance(b, bytes) else b


def _check_worker(worker_id: str) -> str:
    if not isinstance(worker_id, str) or not worker_id or len(worker_id) > 200:
        raise ValueError(f"worker id {worker_id!r} must be a non-empty string of <= 200 characters")
    return worker_id


def _check_count(name: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name}: n={n!r} must be an int >= 0")
    return n


def _check_setting(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return value


async def list_runs(client: aioredis.Redis) -> list[str]:
    """Names of the runs in this Redis (those with a ``sluice:{run}:settings`` key), sorted.
    Uses SCAN, never KEYS, so a large Redis is not blocked."""
    runs: set[str] = set()
    async for k in client.scan_iter(match="sluice:{*}:settings", count=1000):
        name = _s(k)
        if name.startswith("sluice:{") and name.endswith("}:settings"):
            run = name[len("sluice:{") : -len("}:settings")]
            try:
                runs.add(check_run_name(run))
            except ValueError:
                continue
    return sorted(runs)


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
        owns_client: bool = False,
        default_worker_ttl: float = DEFAULT_WORKER_TTL,
    ) -> None:
        """Wrap a client; prefer ``open`` / ``from_client``, which check the run's settings."""
        check_run_name(run)
        if not default_worker_ttl > 0:
            raise ValueError(f"default_worker_ttl={default_worker_ttl} must be > 0 seconds")
        self.redis = client
        self.run = run
        self.default_worker_ttl = default_worker_ttl
        self._owns_client = owns_client
        self.k_settings = keys.settings(run)
        self.k_gate = keys.gate(run)
        self.k_rejected_by = keys.gate_rejected_by(run)
        self.k_inflight = keys.gate_inflight(run)
        self.k_expiry = keys.worker_expiry(run)
        self.k_seen = keys.workers_seen(run)
        self.k_weights = keys.weights(run)
        self.k_events = keys.weight_events(run)
        self.k_disk = keys.weights_disk(run)
        self.k_sync_servers = keys.sync_servers(run)
        self._open = client.register_script(_OPEN_LUA)
        self._admit = client.register_script(_ADMIT_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._drop = client.register_script(_DROP_LUA)
        self._reap = client.register_script(_REAP_LUA)
        self._heartbeat = client.register_script(_HEARTBEAT_LUA)
        self._publish = client.register_script(_PUBLISH_LUA)
        self._set_eta = client.register_script(_SET_ETA_LUA)
        self._announce = client.register_script(_ANNOUNCE_LUA)
        self._disk = client.register_script(_DISK_LUA)
        self.eta: int | None = None
        """The run's eta as of ``open`` (``set_eta`` may change it later; ``snapshot`` reads it)."""
        self.batch_groups: int | None = None

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
        client = await connect(url, socket_timeout=_MAX_BLOCK_MS / 1000 + 10)
        vm = cls(client, run, owns_client=True, default_worker_ttl=default_worker_ttl)
        try:
            await vm._attach(eta, batch_groups)
        except BaseException:
            await client.aclose()
            raise
        return vm

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
        vm = cls(client, run, default_worker_ttl=default_worker_ttl)
        await vm._attach(eta, batch_groups)
        return vm

    async def _attach(self, eta: int | None, batch_groups: int | None) -> None:
        if eta is not None:
            _check_setting("eta", eta, 0)
        if batch_groups is not None:
            _check_setting("batch_groups", batch_groups, 1)
        res = await self._call(
            self._open,
            [self.k_settings, self.k_gate],
            ["" if eta is None else eta, "" if batch_groups is None else batch_groups],
            what="open run",
        )
        if int(res[0]) == 0:
            raise RunNotFound(
                f"run {self.run!r} does not exist in this Redis; start it with eta and batch_groups "
                "(e.g. the trainer or `sluice rollout` with a config) or check --run"
            )
        have_eta, have_b = int(res[1]), int(res[2])
        if eta is not None and eta != have_eta:
            raise RunSettingsMismatch(
                f"run {self.run!r} has eta={have_eta} but this process was started with eta={eta}; "
                f"use the run's value, or change it on the live run with `sluice run set-eta {eta} "
                f"--run {self.run}`"
            )
        if batch_groups is not None and batch_groups != have_b:
            raise RunSettingsMismatch(
                f"run {self.run!r} has batch_groups={have_b} but this process was started with "
                f"batch_groups={batch_groups}; batch_groups is fixed for a run (start a new run to "
                "change it)"
            )
        self.eta, self.batch_groups = have_eta, have_b
        if int(res[0]) == 2:
            log.info("created run %s (eta=%d, batch_groups=%d)", self.run, have_eta, have_b)

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
        async def op() -> Any:
            try:
                return await script(keys=script_keys, args=args)
            except ResponseError as e:
                msg = str(e)
                if "SLUICE_NORUN" in msg:
                    raise RunNotFound(
                        f"run {self.run!r}: {what}: the run's settings are missing"
                    ) from None
                if "SLUICE_VERSION" in msg:
                    parts = msg.split("SLUICE_VERSION", 1)[1].split()
                    raise VersionError(
                        f"run {self.run!r}: cannot publish version {parts[0]}: the current version is "
                        f"{parts[1]} and versions only increase"
                    ) from None
                raise

        return await with_retries(op, what=f"run {self.run}: {what}")

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
        _check_setting("version", version, 1)
        if not location:
            raise ValueError("publish_weights: location must be non-empty")
        res = await self._call(
            self._publish,
            [self.k_settings, self.k_gate, self.k_weights, self.k_events, self._request_key()],
            [version, location, fmt, EVENTS_MAXLEN, REQUEST_TTL_S],
            what=f"publish version {version}",
        )
        return _s(res)

    async def latest_weights(self) -> WeightEvent | None:
        """The latest publication, or None before the first."""
        rec = await self._retry(lambda: self.redis.hgetall(self.k_weights), "read weights")
        return WeightEvent.from_fields(rec) if rec else None

    async def announce_weights(self, version: int, location: str, fmt: str) -> str:
        """Append an event for ``version`` (above the current one) WITHOUT making it current:
        the distributed path announces a broadcast this way, then ``publish_weights`` once the
        weights are there. ``events`` yields the announcement; the later publication of the same
        version is not yielded again to a subscriber that saw it. Returns the event id."""
        _check_setting("version", version, 1)
        if not location:
            raise ValueError("announce_weights: location must be non-empty")
        res = await self._call(
            self._announce,
            [self.k_gate, self.k_events],
            [version, location, fmt, EVENTS_MAXLEN],
            what=f"announce version {version}",
        )
        return _s(res)

    async def record_disk_weights(
        self, version: int, location: str, fmt: str = "safetensors"
    ) -> bool:
        """Record a disk copy of ``version`` (the catch-up source for servers that missed a
        broadcast). Keeps the newest: returns False if an equal or newer copy is recorded."""
        _check_setting("version", version, 0)
        if not location:
            raise ValueError("record_disk_weights: location must be non-empty")
        res = await self._call(
            self._disk, [self.k_disk], [version, location, fmt], what=f"record disk v{version}"
        )
        return bool(int(res))

    async def latest_disk_weights(self) -> WeightEvent | None:
        """The newest recorded disk copy, or None (then version 0 is ``model.path``)."""
        rec = await self._retry(lambda: self.redis.hgetall(self.k_disk), "read disk weights")
        return WeightEvent.from_fields(rec) if rec else None

    async def register_sync_servers(self, worker_id: str, urls: list[str]) -> None:
        """Offer ``urls`` (servers this worker drives) for distributed weight sync."""
        _check_worker(worker_id)
        if urls:
            mapping: dict[Any, Any] = {u: worker_id for u in urls}
            await self._retry(
                lambda: self.redis.hset(self.k_sync_servers, mapping=mapping),
                "register sync servers",
            )

    async def unregister_sync_servers(self, urls: list[str]) -> None:
        if urls:
            await self._retry(
                lambda: self.redis.hdel(self.k_sync_servers, *urls), "unregister sync servers"
            )

    async def sync_servers(self) -> dict[str, str]:
        """Registered servers: URL -> worker id."""
        raw = await self._retry(lambda: self.redis.hgetall(self.k_sync_servers), "sync servers")
        return {_s(k): _s(v) for k, v in raw.items()}

    async def _establish(self) -> tuple[WeightEvent | None, str]:
        """The latest record and the id of its event, read in one MULTI (consistent, since a
        publication writes both in one script)."""

        async def op() -> tuple[WeightEvent | None, str]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.k_weights)
                pipe.xrevrange(self.k_events, count=1)
                res: list[Any] = await pipe.execute()
            rec, last = res
            cursor = _s(last[0][0]) if last else "0-0"
            return (WeightEvent.from_fields(rec) if rec else None), cursor

        return await self._retry(op, "subscribe to weight events")

    async def events(
        self, after: int | None = None, *, block_ms: int = _MAX_BLOCK_MS
    ) -> AsyncIterator[WeightEvent]:
        """Weight publications with version > ``after``, in version order, forever.

        First yields the current publication if it is newer than ``after`` (``after=None``:
        whatever is current), then every later one. The delivery rule is "never miss the
        latest": on a dropped connection (or a Redis restart) the iterator reconnects, re-reads
        the current record and yields it if it is newer than the last version it yielded, then
        continues with later publications; versions in between that it missed while away are
        skipped, since weights supersede each other. Versions yielded are strictly increasing.

        Why a capped stream and not pub/sub: a blocking XREAD from the last-seen id loses
        nothing published while the consumer is busy between reads (pub/sub drops what arrives
        while nobody listens and can disconnect a slow subscriber); it needs no dedicated
        subscriber connection; the (record, last event id) pair is read in one MULTI, so there
        is no gap between "read current" and "listen". The stream is capped at EVENTS_MAXLEN.
        Raises ``RedisUnavailable`` if Redis stays unreachable through ``with_retries``.
        """
        last = -1 if after is None else after
        need_establish = True
        cursor = "0-0"
        while True:
            if need_establish:
                rec, cursor = await self._establish()
                need_establish = False
                if rec is not None and rec.version > last:
                    last = rec.version
                    yield rec
            try:
                resp: Any = await self.redis.xread(
                    {self.k_events: cursor}, count=100, block=block_ms
                )
            except (*TRANSIENT, RuntimeError) as e:
                if isinstance(e, RuntimeError) and not closed_transport(e):
                    raise
                log.warning(
                    "run %s: weight events: connection lost (%s); reconnecting", self.run, e
                )
                need_establish = True
                continue
            except ResponseError as e:
                if not str(e).startswith("LOADING"):
                    raise
                await asyncio.sleep(0.1)
                need_establish = True
                continue
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    cursor = _s(entry_id)
                    ev = WeightEvent.from_fields(fields)
                    if ev.version > last:
                        last = ev.version
                        yield ev

    # ------------------------------------------------------------------ admission gate
    async def try_admit(self, worker_id: str, n: int = 1) -> int:
        """Admit up to ``n`` new groups for ``worker_id`` within the staleness gate; returns how
        many (0..n). One atomic Lua step: ``min(n, capacity)`` with ``capacity`` as in
        ``staleness.gate.admission_capacity``; the slots are booked on the worker (which is
        registered as alive for ``default_worker_ttl`` if it never heart-beat). Every admitted
        slot must later be ``finish``-ed or ``reject``-ed, or ``reap`` returns it."""
        _check_worker(worker_id)
        _check_count("try_admit", n)
        if n == 0:
            return 0
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
            ],
            [worker_id, n, ttl_ms, REQUEST_TTL_S],
            what=f"admit {n} for {worker_id}",
        )
        return int(res)

    async def finish(self, worker_id: str, n: int = 1) -> int:
        """``n`` of the worker's groups were pushed: their slots become finished. Returns how many
        the worker still held (fewer if ``reap`` already returned them; the rest counts as
        ``late``: their groups are in the buffer but the trainer's staleness check guards it)."""
        _check_worker(worker_id)
        _check_count("finish", n)
        return int(
            await self._call(
                self._release,
                [self.k_gate, self.k_inflight, self.k_rejected_by, self._request_key()],
                [worker_id, n, "finish", "", REQUEST_TTL_S],
                what=f"finish {n} for {worker_id}",
            )
        )

    async def reject(self, worker_id: str, n: int = 1, reason: str = "rejected") -> int:
        """Hand ``n`` of the worker's slots back (reward filter, failure, ...): counted as rejected,
        by ``reason``. Returns how many the worker still held (see ``finish``)."""
        _check_worker(worker_id)
        _check_count("reject", n)
        if not reason or len(reason) > 100:
            raise ValueError(f"reject: reason {reason!r} must be 1-100 characters")
        return int(
            await self._call(
                self._release,
                [self.k_gate, self.k_inflight, self.k_rejected_by, self._request_key()],
                [worker_id, n, "reject", reason, REQUEST_TTL_S],
                what=f"reject {n} for {worker_id}",
            )
        )

    async def drop(self, n: int = 1, reason: str = "stale") -> int:
        """The trainer dropped ``n`` finished groups (over-stale, undecodable): their slots move
        from finished to rejected, so the capacity they held comes back. Without this, every
        dropped group would shrink the gate's capacity for good. Returns how many moved."""
        _check_count("drop", n)
        if not reason or len(reason) > 100:
            raise ValueError(f"drop: reason {reason!r} must be 1-100 characters")
        return int(
            await self._call(
                self._drop,
                [self.k_gate, self.k_rejected_by, self._request_key()],
                [n, reason, REQUEST_TTL_S],
                what=f"drop {n}",
            )
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

    async def set_eta(self, eta: int) -> int:
        """Change the run's staleness limit; the next admission uses it. Returns the old value."""
        _check_setting("eta", eta, 0)
        old = int(await self._call(self._set_eta, [self.k_settings], [eta], what="set eta"))
        self.eta = eta
        return old

    # ------------------------------------------------------------------ worker liveness
    async def heartbeat(self, worker_id: str, ttl: float = DEFAULT_WORKER_TTL) -> None:
        """``worker_id`` is alive for the next ``ttl`` seconds (Redis clock)."""
        _check_worker(worker_id)
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
            [self.k_gate, self.k_inflight, self.k_rejected_by, self.k_expiry, self.k_seen],
            [WORKER_DEAD],
            what="reap dead workers",
        )
        out = {_s(res[i]): int(res[i + 1]) for i in range(0, len(res), 2)}
        if out:
            log.warning("run %s: reaped dead workers %s", self.run, out)
        return out

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
                pipe.time()
                return list(await pipe.execute())

        settings, gate, rej, infl, expiry, seen, weights, now = await self._retry(op, "snapshot")
        if not settings:
            raise RunNotFound(f"run {self.run!r} does not exist in this Redis")
        now_s = float(now[0]) + float(now[1]) / 1e6

        def gi(name: str) -> int:
            return int(gate.get(name.encode(), b"0"))

        inflight = {_s(w): int(n) for w, n in infl.items()}
        seen_ms = {_s(w): int(t) for w, t in seen.items()}
        workers = []
        for w, exp_ms in expiry:
            wid = _s(w)
            last = seen_ms.get(wid, int(exp_ms))
            workers.append(
                WorkerInfo(
                    id=wid,
                    seconds_since_heartbeat=max(0.0, now_s - last / 1000),
                    expires_in=float(exp_ms) / 1000 - now_s,
                    inflight=inflight.get(wid, 0),
                )
            )
        eta, b = int(settings[b"eta"]), int(settings[b"batch_groups"])
        version, admitted, rejected = gi("version"), gi("admitted"), gi("rejected")
        return GateSnapshot(
            run=self.run,
            version=version,
            eta=eta,
            batch_groups=b,
            admitted=admitted,
            finished=gi("finished"),
            rejected=rejected,
            rejected_by={_s(r): int(n) for r, n in rej.items()},
            inflight=inflight,
            late=gi("late"),
            capacity=admission_capacity(version, eta, b, admitted, rejected),
            workers=sorted(workers, key=lambda wi: wi.id),
            weights=WeightEvent.from_fields(weights) if weights else None,
            time=now_s,
        )
