"""Fault injection on a real run: Redis (AOF), a CPU server, 2 workers and a trainer as OS
processes; a driver SIGKILLs one of them at a random point (seeded per scenario) and restarts
it, then the run must reach its step target and its books must balance (``FaultRun.audit``):
every step trained once, no group in two optimizer steps, every pushed group acked or still
in the stream, the admission counters balanced with nothing in flight, every process gone.
See docs/reliability.md.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from faults.harness import FaultRun

pytestmark = [pytest.mark.faults]

STEPS = 8


def _pause(rng: random.Random, lo: float = 0.0, hi: float = 1.0) -> None:
    time.sleep(rng.uniform(lo, hi))


def _kill_point(run: FaultRun, rng: random.Random, lo: int = 1, hi: int = STEPS - 3) -> None:
    """Wait for a random step in [lo, hi], then a random fraction of a second more."""
    run.wait_steps(rng.randint(lo, hi), timeout=90)
    _pause(rng, 0.0, 0.6)


@pytest.mark.timeout(180)
def test_no_faults_baseline(tmp_path: Path) -> None:
    """The same run without faults: the audit's checks hold and nothing is rejected."""
    with FaultRun(tmp_path, steps=STEPS) as run:
        audit = run.finish()
    assert len(audit.trained) >= STEPS * 4 - len(audit.dropped)
    assert set(audit.snapshot["rejected_by"]) <= {"shutdown", "stale", "cancelled_stale"}


@pytest.mark.timeout(180)
def test_worker_sigkill_restart(tmp_path: Path) -> None:
    rng = random.Random("worker")
    with FaultRun(tmp_path, steps=STEPS) as run:
        _kill_point(run, rng)
        victim = rng.randrange(2)
        run.kill_worker(victim)
        _pause(rng)
        run.restart_worker(victim)
        audit = run.finish()
    # The killed worker held slots or leases: they came back (reap), and the run went on.
    assert audit.snapshot["inflight"] == 0


@pytest.mark.timeout(180)
def test_trainer_sigkill_resume(tmp_path: Path) -> None:
    rng = random.Random("trainer")
    # Killed at step <= STEPS - 3, the trainer must still be running: with a backlog in the
    # buffer it can do three steps in the time the driver takes to notice a step and pause,
    # so this run is longer than the others.
    steps = STEPS + 6
    with FaultRun(tmp_path, steps=steps) as run:
        _kill_point(run, rng)
        run.kill_trainer()
        _pause(rng)
        run.restart_trainer()
        audit = run.finish()
    assert audit.steps == steps


@pytest.mark.timeout(180)
def test_server_sigkill_restart_same_port(tmp_path: Path) -> None:
    rng = random.Random("server")
    with FaultRun(tmp_path, steps=STEPS) as run:
        _kill_point(run, rng)
        run.kill_server()
        _pause(rng)
        run.restart_server()
        audit = run.finish()
    assert audit.steps == STEPS


@pytest.mark.timeout(180)
def test_redis_sigkill_restart_from_aof(tmp_path: Path) -> None:
    rng = random.Random("redis")
    with FaultRun(tmp_path, steps=STEPS) as run:
        _kill_point(run, rng)
        run.kill_redis()
        _pause(rng, 0.0, 0.5)
        run.restart_redis()
        audit = run.finish()
    assert audit.steps == STEPS


@pytest.mark.timeout(300)
def test_all_in_turn(tmp_path: Path) -> None:
    rng = random.Random("all")
    steps = 14
    with FaultRun(tmp_path, steps=steps) as run:
        order = ["worker", "trainer", "server", "redis"]
        rng.shuffle(order)
        at = sorted(rng.sample(range(1, steps - 2), len(order)))
        for what, step in zip(order, at, strict=True):
            run.wait_steps(step, timeout=120)
            _pause(rng, 0.0, 0.6)
            if what == "worker":
                i = rng.randrange(2)
                run.kill_worker(i)
                _pause(rng)
                run.restart_worker(i)
            elif what == "trainer":
                run.kill_trainer()
                _pause(rng)
                run.restart_trainer()
            elif what == "server":
                run.kill_server()
                _pause(rng)
                run.restart_server()
            else:
                run.kill_redis()
                _pause(rng, 0.0, 0.5)
                run.restart_redis()
        audit = run.finish(timeout=180)
    assert audit.steps == steps
