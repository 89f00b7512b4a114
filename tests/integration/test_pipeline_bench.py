"""``sluice bench pipeline --quick`` end to end: real redis-servers, CPU servers, workers and
trainers pinned to disjoint cores; every key of the JSON, sane numbers, the staleness bound per
run, and no process left behind."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from buffer import keys
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


@pytest.mark.timeout(400)
def test_quick_pipeline_bench(tmp_path: Path) -> None:
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    argv = ["bench", "pipeline", "--quick", "--etas", "0", "2", "--steps", "4"]
    argv += ["--json", str(out), "--plot", str(png), "--workdir", str(tmp_path / "w")]
    # ipc weights (disk is every other test's path): the ceiling's worker follows the versions
    # of the training ceiling; and the server driven bare after the generation ceiling.
    argv += ["--weight-sync", "ipc", "--bare-decode", "--bare-seconds", "1"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["train"]["weights_via"] == ["ipc"]
    bare = doc["gen"]["bare"]
    assert bare["requests"] > 0 and bare["tokens"] > 0 and bare["length_mismatches"] == 0
    assert bare["concurrency"] == 2 * 8  # the quick reverse workload: 2 groups of 8 in flight
    assert math.isfinite(doc["gen"]["worker_vs_bare"]) and doc["gen"]["worker_vs_bare"] > 0
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


def _setup(tmp_path: Path, engine: str, workload: str = "long-tail-gpu") -> Any:
    from benchmarks.pipeline.placement import Placement, Procs
    from benchmarks.pipeline.workloads import WORKLOADS, Setup

    return Setup(
        workload=workload,
        spec=WORKLOADS[workload],
        steps=4,
        batch_groups=2,
        n_samples=2,
        workdir=tmp_path,
        model=tmp_path / "model",
        placement=Placement((0,), (0,)),
        timeout=10.0,
        procs=Procs(),
        engine=engine,
        checkpoint_every=3,
    )


def test_sglang_config_and_busy_from_worker_metrics(tmp_path: Path, redis_url: str) -> None:
    """With SGLang the trainer goes on CUDA with the workload's own trainer settings, and the
    server's busy time comes from the worker's metrics hash (SGLang has no busy counter)."""
    import redis
    import yaml

    from benchmarks.pipeline.services import sample_busy
    from benchmarks.pipeline.workloads import write_config

    s = _setup(tmp_path, "sglang")
    cfg = yaml.safe_load(
        write_config(s, url=redis_url, run="r1", run_dir=tmp_path / "r1", eta=2).read_text()
    )
    assert cfg["inference"]["engine"] == "sglang"
    assert cfg["trainer"]["device"] == "cuda" and cfg["trainer"]["lr"] == 1e-5
    assert cfg["trainer"]["checkpoint_every"] == 3
    cpu = yaml.safe_load(
        write_config(
            _setup(tmp_path, "cpu", "reverse"),
            url=redis_url,
            run="r2",
            run_dir=tmp_path / "r2",
            eta=2,
        ).read_text()
    )
    assert cpu["trainer"]["device"] == "cpu" and "lr" not in cpu["trainer"]

    def _samples(s: Any, r: Any) -> list[tuple[float, float, float]]:
        out: list[tuple[float, float, float]] = []
        sample_busy(s, r, "r1", "http://x", out)
        return out

    r = redis.Redis.from_url(redis_url)
    try:
        assert _samples(s, r) == []  # the worker has not written yet
        servers = json.dumps([{"url": "http://x", "utilisation": 0.25, "inflight": 3}])
        r.hset(
            keys.worker_metrics("r1", "w0"),
            mapping={"servers": servers, "uptime_s": 8.0, "updated_at": 123.5},
        )
        assert _samples(s, r) == [(123.5, 2.0, 8.0)]
    finally:
        r.close()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--checkpoint-every", "0", "--checkpoint-every"), ("--mem-fraction", "0", "--mem-fraction")],
)
def test_bad_pipeline_arguments(flag: str, value: str, message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "pipeline", flag, value, "--engine", "sglang"])
    assert message in str(e.value)


def test_sglang_engine_unavailable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SGLang (or CUDA) the bench stops before starting anything, saying what is
    missing, instead of a server that dies at start-up."""
    import inference.launch as launch

    monkeypatch.setattr(launch, "sglang_installed", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["bench", "pipeline", "--engine", "sglang", "--quick"])
    assert "needs SGLang" in str(e.value)
