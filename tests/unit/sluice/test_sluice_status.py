"""sluice status, the workers' part: each worker's liveness from its heartbeat and its last
metrics write, and the rows it gives in the workers and worker-metrics tables. No Redis (the
same through the CLI on real Redis, with real workers: tests/integration/
test_worker_lifecycle.py::test_status_tells_a_stopped_worker_from_a_killed_one)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from sluice.commands.status import _worker_metrics_table, _workers_table, worker_liveness

NOW = 1_700_000_000.0


def text(renderable: Any) -> str:
    console = Console(record=True, width=240)
    console.print(renderable)
    return console.export_text()


def rows_of(renderable: Any) -> dict[str, str]:
    """A table's rows by their first cell."""
    out = {}
    for line in text(renderable).splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0]:
            out[cells[0]] = line
    return out


def beat(wid: str, since: float, expires_in: float, inflight: int = 0) -> dict[str, Any]:
    return {
        "id": wid,
        "seconds_since_heartbeat": since,
        "expires_in": expires_in,
        "alive": expires_in > 0,
        "inflight": inflight,
    }


def test_worker_liveness() -> None:
    running = {"status": "running", "updated_at": NOW - 400}
    stopped = {"status": "stopped", "updated_at": NOW - 30}
    assert worker_liveness(running, beat("w", 2.0, 13.0), NOW) == ("alive", NOW - 2.0)
    # expired, not reaped yet: its last heartbeat is known
    assert worker_liveness(running, beat("w", 20.0, -5.0), NOW) == ("lost", NOW - 20.0)
    # reaped (no heartbeat entry): the last metrics write stands in for it
    assert worker_liveness(running, None, NOW) == ("lost", NOW - 400)
    assert worker_liveness({"status": "running"}, None, NOW) == ("lost", None)
    # a clean stop deregisters: no heartbeat, the last metrics say stopped
    assert worker_liveness(stopped, None, NOW) == ("stopped", NOW - 30)
    assert worker_liveness(stopped, beat("w", 20.0, -5.0), NOW)[0] == "stopped"


def test_a_stopped_worker_and_a_killed_one_in_both_tables() -> None:
    clock = time.strftime("%H:%M:%S", time.localtime(NOW - 400))
    metrics = {
        "clean": {"status": "stopped", "groups_pushed": 9, "age_s": 30.0},
        "killed": {"status": "running", "groups_pushed": 4, "age_s": 400.0},
        "live": {"status": "running", "groups_pushed": 2, "age_s": 1.0},
    }
    metrics["clean"]["liveness"], metrics["clean"]["last_heartbeat"] = "stopped", NOW - 30
    metrics["killed"]["liveness"], metrics["killed"]["last_heartbeat"] = "lost", NOW - 400
    metrics["live"]["liveness"], metrics["live"]["last_heartbeat"] = "alive", NOW - 1
    d = {
        "time": NOW,
        "workers": [beat("live", 1.0, 14.0, inflight=2)],
        "inflight_by_worker": {"live": 2},
        "worker_metrics": metrics,
    }
    rows = rows_of(_workers_table(d))
    assert "alive" in rows["live"]
    assert "stopped" in rows["clean"] and "expired" not in rows["clean"]
    assert f"lost (no heartbeat since {clock})" in rows["killed"]
    assert "6.7m ago" in rows["killed"] and "30.0s ago" in rows["clean"]
    rows = rows_of(_worker_metrics_table(metrics))
    assert f"lost (no heartbeat since {clock})" in rows["killed"]
    assert "running" not in rows["killed"]
    assert "stopped" in rows["clean"] and "running" in rows["live"]


def test_gate_table_shows_eta_auto_trained_staleness_waste_and_eta_changes() -> None:
    from sluice.commands.status import _gate_table, trainer_line

    d = {
        "run": "r",
        "redis": "redis://x",
        "version": 40,
        "eta": 3,
        "eta_auto": {"eta_max": 8, "idle_target": 0.02, "waste_target": 0.01},
        "eta_admit": 2,
        "batch_groups": 4,
        "capacity": 0,
        "admitted": 170,
        "finished": 160,
        "rejected": 2,
        "rejected_by": {"cancelled_stale": 2},
        "inflight": 8,
        "late": 0,
        "weights": None,
        "time": NOW,
        "buffer": {"length": 3, "pending": 1, "dead_letter": 0, "bytes": 1000},
        "trainer": {"trainer-0": {"staleness_max_trained": 3, "eta": 3, "waste_share": 0.0012}},
        "waste": {
            "generated_tokens": 50_000,
            "wasted_tokens": 60,
            "share": 0.0012,
            "wasted_tokens_by": {"rejected:cancelled_stale": 60},
            "gate_refusals": 9,
        },
        "eta_changes": [
            {
                "from": 2,
                "to": 3,
                "trainer_step": 24,
                "rule": "up: waste over target",
                "idle_share": 0.01,
                "waste_share": 0.02,
            },
            {
                "admit": 2,
                "trainer_step": 40,
                "rule": "down: idle and waste under half their targets",
            },
        ],
    }
    rows = rows_of(_gate_table(d))
    assert "auto: 3 (eta_max 8" in rows["eta (staleness limit)"]
    assert "lowering: admission already at 2" in rows["eta (staleness limit)"]
    assert "max 3 (eta 3)" in rows["staleness trained (last step)"]
    assert "0.12% of 50,000 generated tokens (rejected:cancelled_stale=60)" in rows["waste"]
    out = text(_gate_table(d))
    assert "step 24: 2 -> 3, up: waste over target, idle_share 0.01, waste_share 0.02" in out
    assert "step 40: admission -> 2" in out
    line = trainer_line(d["trainer"]["trainer-0"])
    assert "stale trained max 3 (eta 3)" in line and "waste 0.12%" in line


def test_filtered_summary_counts_zero_variance_drops_and_reward_failures() -> None:
    from sluice.commands.status import filtered_summary

    by = {"zero_variance": 3, "reward_error": 2, "reward_timeout": 1, "shutdown": 4}
    assert filtered_summary(by) == {"zero_variance": 3, "reward_errors": 3}
    assert filtered_summary({}) == {"zero_variance": 0, "reward_errors": 0}
