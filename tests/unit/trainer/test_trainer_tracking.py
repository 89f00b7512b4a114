"""trainer.tracking: a TensorBoard event file and a W&B offline run directory hold the run's
scalars (trainer step rows, the workers' summed counters, evals) under the run's name; the
dynamic-sampling reward is derived by hand."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trainer.metrics import filtered_fields
from trainer.tracking import Trackers, scalars, worker_totals

pytestmark = pytest.mark.timeout(120)

ROWS = [
    {
        "step": 1,
        "version": 1,
        "reward_mean": 0.25,
        "loss": 0.5,
        "replay": False,
        "staleness_hist": {"0": 30, "1": 2},
        "group_ids": ["a"],
        "logp_abs_diff": None,
    },
    {
        "step": 2,
        "version": 2,
        "reward_mean": 0.5,
        "loss": 0.25,
        "replay": False,
        "staleness_hist": {"0": 32},
        "group_ids": ["b"],
        "logp_abs_diff": 0.0,
    },
]
WORKERS = [
    {
        "worker": "w1",
        "groups_pushed": 10,
        "filtered_groups": 3,
        "rejected_by": {"zero_variance": 3, "reward_error": 1},
        "status": "running",
    },
    {"worker": "w2", "groups_pushed": 5, "filtered_groups": 1, "rejected_by": {"zero_variance": 1}},
]


def test_scalars_and_worker_totals() -> None:
    s = scalars(ROWS[0], "trainer")
    assert s["trainer/reward_mean"] == 0.25 and s["trainer/staleness_hist/1"] == 2.0
    assert "trainer/replay" not in s and "trainer/group_ids" not in s
    assert "trainer/logp_abs_diff" not in s  # None is left out
    t = worker_totals(WORKERS)
    assert t["groups_pushed"] == 15 and t["filtered_groups"] == 4 and t["workers"] == 2
    assert t["rejected_by/zero_variance"] == 4 and t["rejected_by/reward_error"] == 1


def test_filtered_fields_by_hand() -> None:
    # 32 trained samples of mean 0.5 (sum 16), 16 filtered samples summing to 16 (all 1.0):
    # (16 + 16) / 48 = 2/3.
    f = filtered_fields((2.0, 16.0, 16.0), 0.5, 32)
    assert f == {"filtered_groups": 2, "reward_mean_all": pytest.approx(2 / 3, abs=1e-15)}
    assert filtered_fields((0.0, 0.0, 0.0), 0.3, 32)["reward_mean_all"] == 0.3


def test_tensorboard_event_file_holds_the_run_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = Trackers.open(["jsonl", "tensorboard"], tmp_path, "my-run")
    for row in ROWS:
        tr.log_step(row, WORKERS)
    tr.log_eval({"event": "eval", "version": 2, "greedy_reward": 0.75, "trainer_step": 2})
    tr.close()
    run_dir = tmp_path / "tensorboard" / "my-run"
    assert list(run_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("trainer/reward_mean")]
    assert got == [(1, 0.25), (2, 0.5)]
    assert [e.value for e in acc.Scalars("rollout/rejected_by/zero_variance")] == [4.0, 4.0]
    assert [(e.step, e.value) for e in acc.Scalars("eval/greedy_reward")] == [(2, 0.75)]


def test_wandb_offline_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    tr = Trackers.open(["wandb"], tmp_path, "my-run", config={"lr": 0.001})
    for row in ROWS:
        tr.log_step(row, WORKERS)
    tr.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (data,) = runs[0].glob("run-*.wandb")
    # The records are protobuf: the run's name, its project and each scalar's key are in them.
    # W&B's own service process writes the file: it may finish a moment after finish().
    needles = (b"my-run", b"sluice", b"trainer/reward_mean", b"rollout/filtered_groups")
    deadline = time.monotonic() + 60
    while not all(n in data.read_bytes() for n in needles) and time.monotonic() < deadline:
        time.sleep(0.2)
    raw = data.read_bytes()
    assert [n for n in needles if n not in raw] == []
