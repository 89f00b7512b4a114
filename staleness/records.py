"""What the version manager hands out: its errors, a weight publication (``WeightEvent``), the
run's end (``RunFinished``), a worker's liveness (``WorkerInfo``) and a consistent read of the
gate (``GateSnapshot``), plus the pure functions that build them from Redis replies.

``gate_snapshot`` builds a ``GateSnapshot`` from the replies of the one MULTI that
``VersionManager.snapshot`` sends; its capacity is ``staleness.gate.admission_capacity`` of the
counters read, the formula the admission script runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from staleness.gate import admission_capacity


class RunNotFound(LookupError):
    """The run has no settings in this Redis and none were given to create it."""


class RunSettingsMismatch(ValueError):
    """A process started with ``eta`` or ``batch_groups`` different from the run's."""


class VersionError(ValueError):
    """A weight publication whose version is not above the current one."""


def decode(b: bytes | str) -> str:
    """A Redis reply's bytes as text (a str passes through)."""
    return b.decode() if isinstance(b, bytes) else b


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
class RunFinished:
    """The trainer's mark that the run ended cleanly (``VersionManager.mark_finished``)."""

    step: int
    """The last step trained."""
    version: int
    """The run's policy version when it ended."""
    time: float
    """Redis server time of the mark (unix seconds): two marks of one run differ in it."""

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> RunFinished:
        return cls(
            step=int(fields[b"step"]),
            version=int(fields.get(b"version", b"0")),
            time=float(fields.get(b"time", b"0")),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "version": self.version, "time": self.time}


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
    eta_auto: dict[str, Any] | None = None
    """``staleness.eta: auto``'s settings (``eta_max``, targets) while it runs eta; None: fixed."""
    eta_admit: int | None = None
    """While eta is being lowered: the eta admission already uses (``narrow_admission``)."""
    inflight_total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inflight_total", sum(self.inflight.values()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "version": self.version,
            "eta": self.eta,
            "eta_auto": self.eta_auto,
            "eta_admit": self.eta_admit,
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


def worker_infos(
    expiry: Sequence[tuple[Any, Any]],
    seen: Mapping[Any, Any],
    inflight: Mapping[str, int],
    now_s: float,
) -> list[WorkerInfo]:
    """Every worker with a heartbeat expiry, sorted by id, as of ``now_s`` (Redis time).

    ``expiry`` is the (worker, expiry ms) pairs of the expiry zset, ``seen`` its last heartbeat
    (ms; a worker without one counts as seen at its expiry), ``inflight`` the slots it holds."""
    seen_ms = {decode(w): int(t) for w, t in seen.items()}
    workers = []
    for w, exp_ms in expiry:
        wid = decode(w)
        last = seen_ms.get(wid, int(exp_ms))
        workers.append(
            WorkerInfo(
                id=wid,
                seconds_since_heartbeat=max(0.0, now_s - last / 1000),
                expires_in=float(exp_ms) / 1000 - now_s,
                inflight=inflight.get(wid, 0),
            )
        )
    return sorted(workers, key=lambda wi: wi.id)


def gate_snapshot(run: str, replies: Sequence[Any]) -> GateSnapshot:
    """The ``GateSnapshot`` of one MULTI's replies, in this order: HGETALL of settings, gate,
    gate:rejected_by and gate:inflight, ZRANGE WITHSCORES of workers:expiry, HGETALL of
    workers:seen and weights, TIME. Raises ``RunNotFound`` when the run has no settings."""
    settings, gate, rej, infl, expiry, seen, weights, now = replies
    if not settings:
        raise RunNotFound(f"run {run!r} does not exist in this Redis")
    now_s = float(now[0]) + float(now[1]) / 1e6

    def gi(name: str) -> int:
        return int(gate.get(name.encode(), b"0"))

    inflight = {decode(w): int(n) for w, n in infl.items()}
    workers = worker_infos(expiry, seen, inflight, now_s)
    eta, b = int(settings[b"eta"]), int(settings[b"batch_groups"])
    eta_admit = int(settings[b"eta_admit"]) if settings.get(b"eta_admit") else None
    gate_eta = eta if eta_admit is None else min(eta, eta_admit)
    version, admitted, rejected = gi("version"), gi("admitted"), gi("rejected")
    return GateSnapshot(
        run=run,
        version=version,
        eta=eta,
        batch_groups=b,
        admitted=admitted,
        finished=gi("finished"),
        rejected=rejected,
        rejected_by={decode(r): int(n) for r, n in rej.items()},
        inflight=inflight,
        late=gi("late"),
        capacity=admission_capacity(version, gate_eta, b, admitted, rejected),
        workers=workers,
        weights=WeightEvent.from_fields(weights) if weights else None,
        time=now_s,
        eta_auto=_json_or_none(settings.get(b"eta_auto")),
        eta_admit=eta_admit,
    )


def _json_or_none(raw: Any) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        out = json.loads(decode(raw))
    except ValueError:
        return None
    return out if isinstance(out, dict) else None
