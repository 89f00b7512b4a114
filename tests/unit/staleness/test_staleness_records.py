"""``staleness.records``: the version manager's snapshot built from the replies of its one
MULTI, by hand-made replies (no Redis). The real-Redis counterparts are in
tests/integration/test_version_manager.py."""

from __future__ import annotations

from typing import Any

import pytest

from staleness.records import GateSnapshot, RunNotFound, WeightEvent, gate_snapshot, worker_infos


def _replies(**over: Any) -> list[Any]:
    """The MULTI's replies in ``gate_snapshot``'s order, as redis-py returns them (bytes)."""
    base: dict[str, Any] = {
        "settings": {b"eta": b"1", b"batch_groups": b"3", b"created": b"1700000000"},
        "gate": {
            b"version": b"2",
            b"admitted": b"10",
            b"finished": b"4",
            b"rejected": b"3",
            b"late": b"1",
        },
        "rejected_by": {b"stale": b"2", b"worker_dead": b"1"},
        "inflight": {b"b": b"2", b"a": b"1"},
        "expiry": [(b"b", 1_000_020_000.0), (b"a", 999_999_000.0)],  # ZRANGE by score, ms
        "seen": {b"a": b"999990000", b"b": b"999995000"},  # last heartbeat, ms
        "weights": {
            b"version": b"2",
            b"location": b"/w/2",
            b"fmt": b"safetensors",
            b"time": b"7.5",
        },
        "now": (1_000_000, 500_000),  # TIME: seconds, microseconds -> 1_000_000.5 s
    }
    base.update(over)
    return list(base.values())


def test_snapshot_from_replies() -> None:
    s = gate_snapshot("r", _replies())
    assert isinstance(s, GateSnapshot)
    assert (s.run, s.version, s.eta, s.batch_groups) == ("r", 2, 1, 3)
    assert (s.admitted, s.finished, s.rejected, s.late) == (10, 4, 3, 1)
    assert s.rejected_by == {"stale": 2, "worker_dead": 1}
    assert s.inflight == {"b": 2, "a": 1} and s.inflight_total == 3
    # the conservation invariant on consistent counters: 10 == 4 + 3 + 3
    assert s.admitted == s.finished + s.rejected + s.inflight_total
    # capacity = max(0, (2 + 1 + 1) * 3 - (10 - 3)) = 5
    assert s.capacity == 5
    assert s.time == 1_000_000.5
    assert s.weights == WeightEvent(version=2, location="/w/2", fmt="safetensors", time=7.5)
    # workers sorted by id; a: seen at 999_990 s, expires at 999_999 s -> 10.5 s ago, -1.5 s
    a, b = s.workers
    assert (a.id, a.inflight, a.alive) == ("a", 1, False)
    assert a.seconds_since_heartbeat == pytest.approx(10.5)
    assert a.expires_in == pytest.approx(-1.5)
    # b: seen at 999_995 s, expires at 1_000_020 s -> 5.5 s ago, 19.5 s left
    assert (b.id, b.inflight, b.alive) == ("b", 2, True)
    assert b.seconds_since_heartbeat == pytest.approx(5.5)
    assert b.expires_in == pytest.approx(19.5)


def test_snapshot_of_a_new_run() -> None:
    # a created run: every counter 0, no weights, no workers; capacity (0 + 1 + 1) * 3 = 6
    s = gate_snapshot(
        "r",
        _replies(gate={}, rejected_by={}, inflight={}, expiry=[], seen={}, weights={}),
    )
    assert (s.version, s.admitted, s.finished, s.rejected, s.late) == (0, 0, 0, 0, 0)
    assert (s.capacity, s.workers, s.weights, s.inflight_total) == (6, [], None, 0)
    assert s.as_dict()["weights"] is None


def test_snapshot_capacity_never_negative() -> None:
    # eta lowered to 0 on a live run with B = 1: (2 + 0 + 1) * 1 - (10 - 3) = -4, clamped to 0
    s = gate_snapshot("r", _replies(settings={b"eta": b"0", b"batch_groups": b"1"}))
    assert s.capacity == 0


def test_snapshot_of_a_missing_run() -> None:
    with pytest.raises(RunNotFound, match="run 'gone' does not exist in this Redis"):
        gate_snapshot("gone", _replies(settings={}))


def test_worker_without_last_seen_counts_as_seen_at_its_expiry() -> None:
    (w,) = worker_infos([(b"x", 5_000.0)], {}, {}, now_s=4.0)
    assert (w.id, w.inflight, w.seconds_since_heartbeat, w.expires_in) == ("x", 0, 0.0, 1.0)


def test_snapshot_capacity_uses_the_narrowed_admission_eta() -> None:
    # eta 2 being lowered to 0: admission already at 0: (2 + 0 + 1) * 2 - (10 - 3) = -1 -> 0;
    # the bound stays 2 until the trainer sets it
    fields = {b"eta": b"2", b"batch_groups": b"2", b"eta_admit": b"0", b"eta_auto": b'{"a": 1}'}
    s = gate_snapshot("r", _replies(settings=fields))
    assert (s.eta, s.eta_admit, s.capacity, s.eta_auto) == (2, 0, 0, {"a": 1})


def test_as_dict_fields() -> None:
    d = gate_snapshot("r", _replies()).as_dict()
    assert list(d) == [
        "run",
        "version",
        "eta",
        "eta_auto",
        "eta_admit",
        "batch_groups",
        "admitted",
        "finished",
        "rejected",
        "rejected_by",
        "inflight",
        "inflight_by_worker",
        "late",
        "capacity",
        "workers",
        "weights",
        "time",
    ]
    assert d["inflight"] == 3 and d["inflight_by_worker"] == {"b": 2, "a": 1}
    assert d["workers"][0] == {
        "id": "a",
        "seconds_since_heartbeat": 10.5,
        "expires_in": -1.5,
        "alive": False,
        "inflight": 1,
    }
    assert d["weights"] == {"version": 2, "location": "/w/2", "fmt": "safetensors", "time": 7.5}


def test_weight_event_from_stream_fields() -> None:
    ev = WeightEvent.from_fields({b"version": b"3"})
    assert ev == WeightEvent(version=3, location="", fmt="", time=0.0)
    with pytest.raises(KeyError):
        WeightEvent.from_fields({b"location": b"/w"})
