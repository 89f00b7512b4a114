"""``sluice bench pipeline --quick`` end to end: real redis-servers, CPU servers, workers and
trainers pinned to disjoint cores; every key of the JSON, sane numbers, the staleness bound per
run, and no process left behind."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from sluice.cli import main

RUN_KEYS = (
    "eta",
    "groups_per_s",
    "tokens_per_s",
    "trainer_idle",
    "server_idle",
    "mean_staleness",
    "max_staleness",
    "dropped",
    "final_reward",
    "redis_peak_bytes",
    "redis_bound_bytes",
)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Still a pid: only a zombie of someone else's would do; ours were all reaped.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.timeout(180)
def test_quick_pipeline_bench(tmp_path: Path) -> None:
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    argv = ["bench", "pipeline", "--quick", "--etas", "0", "2", "--steps", "4"]
    argv += ["--json", str(out), "--plot", str(png), "--workdir", str(tmp_path / "w")]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    for k in ("gen_ceiling", "train_ceiling", "runs", "efficiency", "speedup_vs_sync"):
        assert k in doc, k
    assert doc["gen_ceiling"] > 0 and doc["train_ceiling"] > 0
    assert math.isfinite(doc["efficiency"]) and doc["efficiency"] > 0
    assert math.isfinite(doc["speedup_vs_sync"]) and doc["speedup_vs_sync"] > 0
    assert doc["placement"]["disjoint"] == (len(os.sched_getaffinity(0)) >= 2)
    assert 0 <= doc["buffer_gate_share"] < 1
    assert [r["eta"] for r in doc["runs"]] == [0, 2]
    for r in doc["runs"]:
        for k in RUN_KEYS:
            assert k in r, k
            assert r[k] is not None and math.isfinite(r[k]), (k, r[k])
        assert r["groups_per_s"] > 0 and r["tokens_per_s"] > 0
        assert 0 <= r["trainer_idle"] <= 1 and 0 <= r["server_idle"] <= 1
        assert 0 <= r["mean_staleness"] <= r["max_staleness"] <= r["eta"]
        assert r["dropped"] == 0  # the gate keeps every group within eta
        assert 0 <= r["final_reward"] <= 1
        assert r["redis_peak_bytes"] > 0 and r["redis_bound_bytes"] > 0
        assert r["steps"] == 4
    # Synchronous RL never trains on an older policy.
    assert doc["runs"][0]["max_staleness"] == 0
    assert png.stat().st_size > 1000
    # Every process the bench started (redis-servers, CPU servers, workers, trainers) is gone.
    assert len(doc["pids"]) == 4 + 2 * 4  # redis, server, worker, trainer: ceilings + 2 runs
    assert all(_gone(p) for p in doc["pids"]), [p for p in doc["pids"] if not _gone(p)]
