"""A hypothesis state machine for the staleness gate, shared by the pure-model test
(tests/unit/staleness/test_staleness_math.py) and the real-Redis test (tests/integration/test_version_manager.py).

Simulated workers admit, finish (in any order, so stragglers happen), reject and die; a trainer
drops over-stale groups (handing their slots back), consumes ``batch_groups`` fresh groups per
step in push order and bumps the version. Checked after every step:

* the gate admits exactly ``min(n, admission_capacity(...))``;
* slots are conserved: ``admitted == finished + rejected + in flight`` and the backend's counters
  equal the model's;
* capacity is never negative, and the run can always progress (no slots in flight and fewer
  than B groups buffered => capacity > 0);
* every trained group has staleness <= eta, and a group is only ever dropped as over-stale if a
  group admitted after it was trained before it (the gate's bound is exact for groups that
  were not overtaken; see ``staleness.gate.admission_capacity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hypothesis import strategies as st
from hypothesis import target
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from staleness import admission_capacity, staleness

WORKERS = ("w0", "w1", "w2")


@dataclass
class Counters:
    version: int
    admitted: int
    finished: int
    rejected: int
    inflight: dict[str, int]
    capacity: int


class GateBackend(Protocol):
    def admit(self, worker: str, n: int) -> int: ...
    def finish(self, worker: str) -> int: ...
    def reject(self, worker: str, reason: str) -> int: ...
    def die(self, worker: str) -> int: ...
    def drop(self) -> int: ...
    def publish(self, version: int) -> None: ...
    def counters(self) -> Counters: ...
    def close(self) -> None: ...


class PureGate:
    """The gate as plain counters around the pure ``admission_capacity``."""

    def __init__(self, eta: int, batch_groups: int) -> None:
        self.eta, self.b = eta, batch_groups
        self.version = self.admitted = self.finished = self.rejected = 0
        self.inflight: dict[str, int] = {}

    def _cap(self) -> int:
        return admission_capacity(self.version, self.eta, self.b, self.admitted, self.rejected)

    def admit(self, worker: str, n: int) -> int:
        k = min(n, self._cap())
        self.admitted += k
        if k:
            self.inflight[worker] = self.inflight.get(worker, 0) + k
        return k

    def _take(self, worker: str) -> int:
        if self.inflight.get(worker, 0) == 0:
            return 0
        self.inflight[worker] -= 1
        if self.inflight[worker] == 0:
            del self.inflight[worker]
        return 1

    def finish(self, worker: str) -> int:
        k = self._take(worker)
        self.finished += k
        return k

    def reject(self, worker: str, reason: str) -> int:
        k = self._take(worker)
        self.rejected += k
        return k

    def die(self, worker: str) -> int:
        k = self.inflight.pop(worker, 0)
        self.rejected += k
        return k

    def drop(self) -> int:
        k = min(1, self.finished)
        self.finished -= k
        self.rejected += k
        return k

    def publish(self, version: int) -> None:
        assert version > self.version
        self.version = version

    def counters(self) -> Counters:
        return Counters(
            self.version,
            self.admitted,
            self.finished,
            self.rejected,
            dict(self.inflight),
            self._cap(),
        )

    def close(self) -> None:
        pass


@dataclass
class Group:
    seq: int
    """Admission order."""
    worker: str
    start_version: int
    trained_step: int | None = None


class GateMachine(RuleBasedStateMachine):
    """Subclasses set ``make_backend(eta, batch_groups) -> GateBackend``."""

    def make_backend(self, eta: int, batch_groups: int) -> GateBackend:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.backend: GateBackend | None = None
        self.held: dict[str, list[Group]] = {w: [] for w in WORKERS}
        self.buffer: list[Group] = []
        self.trained: list[Group] = []
        self.seq = 0
        self.version = 0
        self.dropped = 0
        self.max_age = 0

    @initialize(eta=st.integers(0, 2), batch_groups=st.integers(1, 3))
    def start(self, eta: int, batch_groups: int) -> None:
        self.eta, self.b = eta, batch_groups
        self.backend = self.make_backend(eta, batch_groups)

    def teardown(self) -> None:
        # Steer generation towards stragglers (random programs rarely make one old enough).
        target(float(self.max_age), label="oldest group the trainer read")
        target(float(self.dropped), label="over-stale groups dropped")
        if self.backend is not None:
            self.backend.close()

    @property
    def gate(self) -> GateBackend:
        assert self.backend is not None
        return self.backend

    def _model_counts(self) -> tuple[int, int]:
        """(admitted - rejected, in flight) as the model sees them."""
        inflight = sum(len(g) for g in self.held.values())
        return len(self.buffer) + len(self.trained) + inflight, inflight

    @rule(worker=st.sampled_from(WORKERS), n=st.integers(1, 4))
    def admit(self, worker: str, n: int) -> None:
        live, _ = self._model_counts()
        expected = min(n, max(0, (self.version + self.eta + 1) * self.b - live))
        k = self.gate.admit(worker, n)
        assert k == expected, (k, expected)
        for _ in range(k):
            self.held[worker].append(Group(self.seq, worker, self.version))
            self.seq += 1

    def _pick(self, pick: int) -> Group | None:
        """Any in-flight group, newest first (pick=0), so older groups straggle and get
        overtaken."""
        flying = sorted((g for w in WORKERS for g in self.held[w]), key=lambda g: -g.seq)
        if not flying:
            return None
        g = flying[pick % len(flying)]
        self.held[g.worker].remove(g)
        return g

    def _flying(self) -> bool:
        return any(self.held.values())

    @precondition(lambda self: self._flying())
    @rule(pick=st.integers(0, 15))
    def finish(self, pick: int) -> None:
        g = self._pick(pick)
        if g is not None:
            assert self.gate.finish(g.worker) == 1
            self.buffer.append(g)

    # Rejections and deaths act on one draw in four: rarer than finishes, as in a real run, so
    # that stragglers live long enough to be overtaken.
    @precondition(lambda self: self._flying())
    @rule(pick=st.integers(0, 15), roll=st.integers(0, 3))
    def reject(self, pick: int, roll: int) -> None:
        if roll:
            return
        g = self._pick(pick)
        if g is not None:
            assert self.gate.reject(g.worker, "filtered") == 1

    @precondition(lambda self: self._flying())
    @rule(worker=st.sampled_from(WORKERS), roll=st.integers(0, 3))
    def die(self, worker: str, roll: int) -> None:
        if roll:
            return
        n = len(self.held[worker])
        assert self.gate.die(worker) == n
        self.held[worker] = []

    @precondition(lambda self: len(self.buffer) > 0)
    @rule()
    def train(self) -> None:
        # The trainer checks every group it reads; over-stale ones are dropped and their slots
        # handed back.
        fresh: list[Group] = []
        for g in self.buffer:
            self.max_age = max(self.max_age, self.version - g.start_version)
            if staleness(self.version, [g.start_version] * 3) > self.eta:
                overtaken = any(t.seq > g.seq for t in self.trained)
                assert overtaken, f"group {g} went stale without being overtaken"
                assert self.gate.drop() == 1
                self.dropped += 1
            else:
                fresh.append(g)
        self.buffer = fresh
        if len(self.buffer) < self.b:
            return
        batch, self.buffer = self.buffer[: self.b], self.buffer[self.b :]
        for g in batch:
            assert staleness(self.version, [g.start_version]) <= self.eta
            g.trained_step = self.version
        self.trained.extend(batch)
        self.version += 1
        self.gate.publish(self.version)

    @invariant()
    def conserved(self) -> None:
        if self.backend is None:
            return
        c = self.gate.counters()
        live, inflight = self._model_counts()
        assert c.version == self.version
        assert c.admitted == c.finished + c.rejected + sum(c.inflight.values())
        assert c.admitted - c.rejected == live
        assert c.finished == len(self.buffer) + len(self.trained)
        assert c.inflight == {w: len(g) for w, g in self.held.items() if g}
        assert c.capacity >= 0
        assert c.capacity == max(0, (self.version + self.eta + 1) * self.b - live)
        if inflight == 0 and len(self.buffer) < self.b:
            assert c.capacity > 0, "the run can no longer make progress"
