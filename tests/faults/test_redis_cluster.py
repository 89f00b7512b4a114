"""A run on a Redis Cluster (``redis+cluster://``): a local cluster of 3 masters with a replica
each, every node started and stopped by its pid. The CPU server, a rollout worker and the
trainer reach it through redis-py's cluster client; the run's keys share one slot (the run's
hash tag), so its Lua scripts and transactions run on that slot's master.

Mid-run the master that serves the run's slot is SIGKILLed; its replica takes over, and the
run goes on to its step target with the books balanced (``FaultRun.audit``: every pushed group
is acked, in the stream or dead-lettered, counted once against the gate's finished slots, so a
put that returned and was then lost in the failover would fail it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from buffer import keys
from faults.harness import FaultRun
from procs import RedisCluster

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_a_run_on_a_cluster_survives_the_failover_of_its_master(tmp_path: Path) -> None:
    cluster = RedisCluster(directory=tmp_path / "cluster", node_timeout_ms=1000)
    run = FaultRun(tmp_path, steps=4, workers=1, redis=cluster, run_name="clustered")
    with run:
        assert run.config.read_text().count("redis+cluster://") == 1
        run.wait_steps(2, 120)
        slot = cluster.keyslot(keys.stream(run.run_name))
        assert slot == cluster.keyslot(keys.gate(run.run_name))  # one slot per run
        master = cluster.master_of_slot(slot)
        assert master is not None
        cluster.kill(master)
        run.note(f"SIGKILL master {master} of slot {slot}")
        cluster.wait_ok(30)
        promoted = cluster.master_of_slot(slot)
        assert promoted is not None and promoted != master
        run.note(f"replica {promoted} serves slot {slot}")
        audit = run.finish(timeout=180)
    assert audit.steps == 4 and len(audit.trained) >= 4
