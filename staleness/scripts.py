"""The version manager's Lua scripts, and what their error replies mean.

Each script runs atomically on the Redis server: no other client's command runs between two
of its commands, so concurrent workers and trainers never see or make a half-done mutation.
Every timestamp is Redis's own clock (``TIME``), so machines with skewed clocks agree on which
heartbeat has expired. The keys (``KEYS``) are those of ``buffer.keys``, all in the run's
slot; ``staleness.version_manager.VersionManager`` registers each script once and passes them.

Scripts that carry a request key (admit, release, drop, publish) are exactly-once: the first
run stores its result there for ``REQUEST_TTL_S`` seconds and a retry with the same key (a lost
reply) returns it without mutating again (tests/integration/test_version_manager.py::
test_retried_mutation_is_applied_once).

Two error replies are the callers' business, not Redis's: ``SLUICE_NORUN`` (the run's settings
are missing) and ``SLUICE_VERSION <asked> <current>`` (a version that is not above the current
one); ``script_error`` turns them into ``RunNotFound`` and ``VersionError``, and
``call_script`` runs a script with retries and raises them.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from buffer.connection import with_retries
from staleness.records import RunNotFound, VersionError

NORUN = "SLUICE_NORUN"
"""Marks the error reply of a script that found no run settings."""
BAD_VERSION = "SLUICE_VERSION"
"""Marks the error reply of a publication or announcement whose version is not above the
current one; the reply goes on with the asked and the current version."""

# Creates the run or reads its settings, in one step: two processes that start a new run at
# once create it once, and the second sees the first's values.
# KEYS: settings, gate. ARGV: eta or '', batch_groups or ''.
# Returns {0} if the run does not exist and no values were given, {2, eta, B} if it created the
# run (settings plus every gate counter at 0), {1, eta, B} if it existed.
OPEN_LUA = """
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

# The staleness gate: admits k = min(n, capacity) with
#   capacity = max(0, (version + eta + 1) * batch_groups - (admitted - rejected))
# where eta is the smaller of the settings' eta and eta_admit (present while eta is being
# lowered: admission narrows first, the bound follows once the older groups are trained)
# (the same formula as staleness.gate.admission_capacity) and books the k slots on the worker
# in the same step, registering it as alive for the default ttl if it never heart-beat or its
# heartbeat expired (a worker asking for room is alive: its new slots are not reaped at once).
# Keeps, however many workers call at once: after any admission
# admitted - rejected <= (version + eta + 1) * batch_groups, and
# admitted == finished + rejected + sum(inflight).
# A call granted less than it asked for counts in 'refused' (the gate held a worker back:
# ``staleness.eta: auto`` reads it). The k slots are also booked under the version they were
# admitted at (``inflight_at``, field
# ``worker|version``), so the trainer knows how many groups of each admission version are still
# being generated (it waits for the ones that would otherwise expire: trainer.data).
# KEYS: settings, gate, inflight, expiry, seen, request, inflight_at. ARGV: worker, n, default
# ttl ms, request ttl s. Returns {k, version}.
ADMIT_LUA = """
local done = redis.call('GET', KEYS[6])
if done then return cjson.decode(done) end
local s = redis.call('HMGET', KEYS[1], 'eta', 'batch_groups', 'eta_admit')
if not s[1] then return redis.error_reply('SLUICE_NORUN run settings are missing') end
local e = tonumber(s[1])
if s[3] then e = math.min(e, tonumber(s[3])) end
local g = redis.call('HMGET', KEYS[2], 'version', 'admitted', 'rejected')
local v = tonumber(g[1] or '0')
local a = tonumber(g[2] or '0')
local r = tonumber(g[3] or '0')
local cap = (v + e + 1) * tonumber(s[2]) - (a - r)
if cap < 0 then cap = 0 end
local k = math.min(tonumber(ARGV[2]), cap)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exp = redis.call('ZSCORE', KEYS[4], ARGV[1])
if not exp or tonumber(exp) < now then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('HSET', KEYS[5], ARGV[1], now)
end
if k > 0 then
  redis.call('HINCRBY', KEYS[2], 'admitted', k)
  redis.call('HINCRBY', KEYS[3], ARGV[1], k)
  redis.call('HINCRBY', KEYS[7], ARGV[1] .. '|' .. v, k)
end
if k < tonumber(ARGV[2]) then redis.call('HINCRBY', KEYS[2], 'refused', 1) end
local out = {k, v}
redis.call('SET', KEYS[6], cjson.encode(out), 'EX', ARGV[4])
return out
"""

TAKE_AT = """
-- Removes k of worker w's slots from the per-version book: version v first ('' = unknown),
-- then the worker's oldest versions.
local function take_at(key, w, v, k)
  if k <= 0 then return end
  local pre = w .. '|'
  if v ~= '' then
    local f = pre .. v
    local have = tonumber(redis.call('HGET', key, f) or '0')
    local d = math.min(have, k)
    if d > 0 then
      if have == d then redis.call('HDEL', key, f) else redis.call('HINCRBY', key, f, -d) end
      k = k - d
    end
  end
  if k <= 0 then return end
  local vs = {}
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, #pre) == pre then
      local x = tonumber(string.sub(f, #pre + 1))
      if x then table.insert(vs, x) end
    end
  end
  table.sort(vs)
  for _, x in ipairs(vs) do
    if k <= 0 then break end
    local f = pre .. x
    local have = tonumber(redis.call('HGET', key, f) or '0')
    local d = math.min(have, k)
    if have == d then redis.call('HDEL', key, f) else redis.call('HINCRBY', key, f, -d) end
    k = k - d
  end
end
"""

# Moves up to n of the worker's held slots to finished or rejected (by reason); the excess
# (slots reap already returned) is counted in 'late', never in finished or rejected, so a slot
# is released once. Keeps admitted == finished + rejected + sum(inflight).
# The slots leave the per-version book too (their admission version ARGV[6], '' when the
# caller does not say: then the worker's oldest). ARGV[7] generated tokens: counted in the
# tokens hash, as 'pushed' (finish) or 'rejected:<reason>' (reject: generated, never pushed).
# KEYS: gate, inflight, rejected_by, request, inflight_at, tokens. ARGV: worker, n,
# 'finish' | 'reject', reason, request ttl s, admission version or '', tokens.
# Returns how many were moved.
RELEASE_LUA = (
    """
local done = redis.call('GET', KEYS[4])
if done then return tonumber(done) end
"""
    + TAKE_AT
    + """
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local n = tonumber(ARGV[2])
local k = math.min(n, held)
if k > 0 then
  if held == k then redis.call('HDEL', KEYS[2], ARGV[1])
  else redis.call('HINCRBY', KEYS[2], ARGV[1], -k) end
  take_at(KEYS[5], ARGV[1], ARGV[6], k)
  if ARGV[3] == 'finish' then
    redis.call('HINCRBY', KEYS[1], 'finished', k)
  else
    redis.call('HINCRBY', KEYS[1], 'rejected', k)
    redis.call('HINCRBY', KEYS[3], ARGV[4], k)
  end
end
local tok = tonumber(ARGV[7] or '0') or 0
if tok > 0 then
  redis.call('HINCRBY', KEYS[6], ARGV[3] == 'finish' and 'pushed' or ('rejected:' .. ARGV[4]), tok)
end
if n > k then redis.call('HINCRBY', KEYS[1], 'late', n - k) end
redis.call('SET', KEYS[4], k, 'EX', ARGV[5])
return k
"""
)

# Finished groups the trainer dropped (over-stale) hand their slots back: finished -= k,
# rejected += k, so the gate's capacity they held comes back. Never more than were finished,
# so finished stays >= 0 and admitted == finished + rejected + sum(inflight) holds.
# ARGV[4]: the dropped groups' tokens, counted as 'dropped:<reason>' in the tokens hash (they
# were pushed: already in 'pushed').
# KEYS: gate, rejected_by, request, tokens. ARGV: n, reason, request ttl s, tokens.
# Returns k = min(n, finished).
DROP_LUA = """
local done = redis.call('GET', KEYS[3])
if done then return tonumber(done) end
local f = tonumber(redis.call('HGET', KEYS[1], 'finished') or '0')
local k = math.min(tonumber(ARGV[1]), f)
if k > 0 then
  redis.call('HINCRBY', KEYS[1], 'finished', -k)
  redis.call('HINCRBY', KEYS[1], 'rejected', k)
  redis.call('HINCRBY', KEYS[2], ARGV[2], k)
end
local tok = tonumber(ARGV[4] or '0') or 0
if tok > 0 then redis.call('HINCRBY', KEYS[4], 'dropped:' .. ARGV[2], tok) end
redis.call('SET', KEYS[3], k, 'EX', ARGV[3])
return k
"""

# Workers whose heartbeat expired, and holders of slots with no heartbeat at all, are removed;
# their slots are rejected with the given reason. Atomic, so any number of processes may reap
# at once and each slot is returned once; admitted == finished + rejected + sum(inflight) holds.
# The dead workers' entries of the per-version book go with them.
# KEYS: gate, inflight, rejected_by, expiry, seen, inflight_at. ARGV: reason.
# Returns {worker, slots, worker, slots, ...}.
REAP_LUA = (
    TAKE_AT
    + """
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
  take_at(KEYS[6], w, '', 1e15)
  redis.call('ZREM', KEYS[4], w)
  redis.call('HDEL', KEYS[5], w)
  table.insert(out, w)
  table.insert(out, n)
end
return out
"""
)

# The worker is alive until now + ttl (Redis clock): sets its expiry and its last-seen time
# together. KEYS: expiry, seen. ARGV: worker, ttl ms. Returns now (ms).
HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], now)
return now
"""

# A worker that stopped cleanly leaves the liveness books: its heartbeat expiry and last-seen
# time are removed, so it is not shown (or reaped) as a dead worker. Only when it holds no slot:
# a holder stays for reap, which hands its slots back (admitted == finished + rejected +
# sum(inflight) holds either way).
# KEYS: inflight, expiry, seen. ARGV: worker. Returns the slots it still holds (0: removed).
DEREGISTER_LUA = """
local held = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if held > 0 then return held end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 0
"""

# The trainer ended the run cleanly: records its last step, the current version and the time
# (Redis clock, to the microsecond, so a later mark of the same run differs from this one).
# KEYS: finished, gate. ARGV: step. Returns {version, time}.
MARK_FINISHED_LUA = """
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local v = redis.call('HGET', KEYS[2], 'version') or '0'
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'version', v, 'time', now)
return {v, now}
"""

# Makes a version current: sets the version, the latest record and appends the event in one
# step, so a subscriber that reads (record, last event id) in one MULTI misses nothing.
# Keeps: versions only grow (a version not above the current one is a SLUICE_VERSION error).
# KEYS: settings, gate, weights, events, request. ARGV: version, location, fmt, maxlen,
# request ttl s. Returns the event id.
PUBLISH_LUA = """
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

# An announcement: appends an event for a version above the current one without making it
# current (the weights are not there yet); the version and the latest record are untouched.
# KEYS: gate, events. ARGV: version, location, fmt, maxlen. Returns the event id.
ANNOUNCE_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if tonumber(ARGV[1]) <= cur then
  return redis.error_reply('SLUICE_VERSION ' .. ARGV[1] .. ' ' .. tostring(cur))
end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
return redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*',
                  'version', ARGV[1], 'location', ARGV[2], 'fmt', ARGV[3], 'time', now)
"""

# Records a disk copy if newer than the recorded one: the record only moves forward.
# KEYS: disk. ARGV: version, location, fmt.
# Returns 1 if recorded, 0 if an equal or newer copy was already there.
DISK_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if tonumber(ARGV[1]) <= cur then return 0 end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'location', ARGV[2], 'fmt', ARGV[3], 'time', now)
return 1
"""

# Redis's clock, read inside a transaction of the run's keys (a snapshot). KEYS: any key of the
# run (it only routes the call to the run's node on a cluster). Returns {seconds, microseconds}.
TIME_LUA = "return redis.call('TIME')"

# Changes the run's eta (the only setting that may change), only on a run that exists; ends
# a lowering in progress (eta_admit).
# KEYS: settings. ARGV: eta. Returns the previous eta.
SET_ETA_LUA = """
local old = redis.call('HGET', KEYS[1], 'eta')
if not old then return redis.error_reply('SLUICE_NORUN run settings are missing') end
redis.call('HSET', KEYS[1], 'eta', ARGV[1])
redis.call('HDEL', KEYS[1], 'eta_admit')
return old
"""


def script_error(run: str, what: str, message: str) -> RunNotFound | VersionError | None:
    """The error a script's error reply ``message`` stands for, or None when it is not one of
    the scripts' own (the caller re-raises Redis's error as it came). ``what`` names the call."""
    if NORUN in message:
        return RunNotFound(f"run {run!r}: {what}: the run's settings are missing")
    if BAD_VERSION in message:
        parts = message.split(BAD_VERSION, 1)[1].split()
        return VersionError(
            f"run {run!r}: cannot publish version {parts[0]}: the current version is "
            f"{parts[1]} and versions only increase"
        )
    return None


async def call_script(
    run: str, script: Any, script_keys: list[str], args: list[Any], *, what: str
) -> Any:
    """Run a registered ``script`` on ``run``'s keys, retrying transient Redis errors
    (``with_retries``); the scripts' own error replies raise ``script_error``'s error."""

    async def op() -> Any:
        try:
            return await script(keys=script_keys, args=args)
        except ResponseError as e:
            err = script_error(run, what, str(e))
            if err is None:
                raise
            raise err from None

    return await with_retries(op, what=f"run {run}: {what}")
