"""``sluice bench control-plane`` end to end on a tiny setting: simulated workers make every
kind of call, the trainer consumes, and the gate's books balance after the workers stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluice.cli import main


@pytest.mark.timeout(120)
def test_control_plane_bench_measures_every_kind(tmp_path: Path) -> None:
    out = tmp_path / "cp.json"
    png = tmp_path / "cp.png"
    argv = [
        "bench", "control-plane", "--json", str(out), "--plot", str(png),
        "--workers", "3", "6", "--step-s", "4", "--warmup-s", "1", "--procs", "1",
        "--groups-per-s", "4", "--inflight", "2", "--publish-every-s", "1",
        "--keep-going", "--abort-ms", "1e9",
    ]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert [r["workers"] for r in doc["results"]] == [3, 6]
    assert doc["books"]["balanced"] and doc["books"]["finished"] > 0
    last = doc["results"][-1]
    assert last["workers_started"] == 6 and last["errors"] == 0
    ops = last["ops_per_s"]
    for kind in ("admit", "version", "lease", "put", "finish", "release", "trainer_read_groups"):
        assert ops[kind] > 0, kind
    # Housekeeping and the watch over both steps (a 3 s window may miss a 5 s heartbeat).
    seen = {k for r in doc["results"] for k, v in r["ops_per_s"].items() if v > 0}
    assert {"heartbeat", "reap", "run_finished", "metrics", "event"} <= seen
    assert last["admit_ms"]["n"] > 0 and last["put_ms"]["p99"] > 0
    assert last["redis_used_memory"] > 0 and last["server_calls"]["evalsha"]["per_s"] > 0
