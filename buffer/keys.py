"""Every Redis key of a run, in one place.

All keys live under ``sluice:{RUN}:`` (``buffer.connection.key``): the braces are a Redis
Cluster hash tag, so every key of a run hashes to one slot and the Lua scripts that touch
several of them stay valid on a cluster. A component names a key only through a function here.
"""

from __future__ import annotations

from buffer.connection import key


def namespace(run: str) -> str:
    """A glob matching every key of the run (``sluice:{RUN}:*``)."""
    return key(run, "*")


# --- trajectories (buffer.redis_buffer)
def stream(run: str) -> str:
    """The trajectory stream (XADD by workers, read by the trainers' consumer group)."""
    return key(run, "stream")


def dead_letters(run: str) -> str:
    """Entries that failed to decode, with the reason."""
    return key(run, "deadletter")


def seen(run: str, bucket: str) -> str:
    """Group ids already put, bucketed by time (a put retried after a lost reply is stored once)."""
    return key(run, "seen", bucket)


# --- the version manager (staleness.version_manager)
def settings(run: str) -> str:
    """The run's fixed settings (eta, batch groups, ...): a hash."""
    return key(run, "settings")


SETTINGS_GLOB = "sluice:{*}:settings"
"""Matches every run's settings hash: how ``list_runs`` finds the runs of a Redis."""


def run_of_settings_key(name: str) -> str | None:
    """The run whose settings hash ``name`` is (``sluice:{RUN}:settings``), else None."""
    prefix, suffix = "sluice:{", "}:settings"
    if name.startswith(prefix) and name.endswith(suffix):
        return name[len(prefix) : -len(suffix)]
    return None


def gate(run: str) -> str:
    """Admission counters and the current version: a hash."""
    return key(run, "gate")


def gate_rejected_by(run: str) -> str:
    """Rejected admissions counted by reason: a hash."""
    return key(run, "gate", "rejected_by")


def gate_inflight(run: str) -> str:
    """Admitted, unfinished slots per worker: a hash."""
    return key(run, "gate", "inflight")


def gate_inflight_at(run: str) -> str:
    """Admitted, unfinished slots per worker and admission version (``worker|version``): a hash."""
    return key(run, "gate", "inflight_at")


def gate_tokens(run: str) -> str:
    """Generated tokens: ``pushed`` (in groups that reached the buffer) and, per reason, in
    groups that were thrown away (``cancelled_stale``, ``stale``, ...): a hash."""
    return key(run, "gate", "tokens")


def eta_changes(run: str) -> str:
    """``staleness.eta: auto``: every change of eta with the measurements behind it: a stream."""
    return key(run, "eta", "changes")


def worker_expiry(run: str) -> str:
    """Heartbeat deadlines per worker: a sorted set."""
    return key(run, "workers", "expiry")


def workers_seen(run: str) -> str:
    """Every worker that ever heartbeat, with its last info: a hash."""
    return key(run, "workers", "seen")


def run_finished(run: str) -> str:
    """Set by the trainer when the run ended cleanly (``max_steps`` or ``reward_target``):
    ``step``, ``version``, ``time``; deleted when a trainer starts the run again. A hash."""
    return key(run, "finished")


def weights(run: str) -> str:
    """The latest published weights (version, path, plan): a hash."""
    return key(run, "weights")


def weight_events(run: str) -> str:
    """Weight publications and announcements: a capped stream."""
    return key(run, "weights", "events")


def weights_disk(run: str) -> str:
    """The latest disk copy of the weights (for servers that missed a broadcast): a hash."""
    return key(run, "weights", "disk")


def sync_servers(run: str) -> str:
    """Servers registered for the distributed weight broadcast: a hash."""
    return key(run, "weights", "sync_servers")


def sync_acks(run: str, version: int) -> str:
    """Servers whose worker holds their new requests for the ipc transfer of ``version``
    (``VersionManager.ack_sync``): a list that expires."""
    return key(run, "weights", "acks", str(version))


def request(run: str, request_id: str) -> str:
    """The stored reply of one idempotent version-manager call."""
    return key(run, "req", request_id)


# --- prompts (rollout_workers.prompts)
def prompts(run: str, source: str, part: str) -> str:
    """A prompt source's shared state: ``cursor``, ``leases``, ``holders`` or ``requeue``."""
    return key(run, "prompts", source, part)


# --- rollout workers
def worker_metrics(run: str, worker_id: str) -> str:
    """A worker's latest metrics: a hash (read by ``sluice status``, the demo, the benches)."""
    return key(run, "worker", worker_id, "metrics")


def worker_metrics_glob(run: str) -> str:
    """Matches every worker's metrics hash."""
    return key(run, "worker", "*", "metrics")


def worker_prefix(run: str) -> str:
    """The prefix of every per-worker key (``...:worker:``)."""
    return key(run, "worker", "")


def worker_config(run: str, worker_id: str) -> str:
    """The resolved run config a worker started with (YAML text, secrets redacted; written by
    ``sluice rollout``)."""
    return key(run, "worker", worker_id, "config")


def worker_updates(run: str, worker_id: str) -> str:
    """A worker's recent weight-update records: a capped list."""
    return key(run, "worker", worker_id, "updates")


def filtered(run: str) -> str:
    """Groups the workers dropped for zero reward variance (dynamic sampling): a hash of
    running totals ``groups``, ``samples``, ``reward_sum`` (the trainer reads deltas)."""
    return key(run, "filtered")


def eval_results(run: str) -> str:
    """Eval results by version: a hash."""
    return key(run, "eval")


def eval_lock(run: str, version: int) -> str:
    """Held by the one worker that evaluates ``version`` (SET NX)."""
    return key(run, "eval", "lock", str(version))


# --- the trainer
def trainer_checkpoint(run: str, consumer: str) -> str:
    """A trainer's checkpoint pointer (committed with its acks in one transaction)."""
    return key(run, "trainer", consumer, "ckpt")


def trainer_progress(run: str, consumer: str) -> str:
    """A trainer's latest step summary (JSON: state, step, max_steps, reward, loss, ...),
    written by rank 0 and read by ``sluice status``."""
    return key(run, "trainer", consumer, "progress")


def trainer_progress_glob(run: str) -> str:
    """Matches every trainer's progress record."""
    return key(run, "trainer", "*", "progress")


def trainer_steps(run: str, consumer: str, rank: int) -> str:
    """One rank's step records (which groups went into which step), for exactly-once replay."""
    return key(run, "trainer", consumer, "steps", f"r{rank}")
