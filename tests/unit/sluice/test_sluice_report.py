"""sluice report: the summary rebuilt from a saved metrics.jsonl, values checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluice import cli
from sluice.report import ReportError, build_report, summarize

T0 = 1_800_000_000.0


def _row(step: int, reward: float, **kw: object) -> dict[str, object]:
    return {"step": step, "reward_mean": reward, **kw}


def _write_run(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        # trainer started at T0 (time - wall_s); 4 groups of 8 samples per step
        _row(
            1,
            0.10,
            reward_std=0.05,
            staleness_hist={"0": 4},
            staleness_max=0,
            dropped=0,
            dropped_total=0,
            groups=4,
            samples=32,
            tokens=160,
            idle_s=1.0,
            step_s=0.5,
            wall_s=2.0,
            time=T0 + 2.0,
        ),
        _row(
            2,
            0.30,
            reward_std=0.05,
            staleness_hist={"0": 1, "1": 3},
            staleness_max=1,
            dropped=0,
            dropped_total=0,
            groups=4,
            samples=32,
            tokens=160,
            idle_s=0.5,
            step_s=0.5,
            wall_s=4.0,
            time=T0 + 4.0,
        ),
        # step 3 as first logged, then lost in a crash: superseded by its replay below
        _row(
            3,
            0.99,
            staleness_hist={"5": 4},
            staleness_max=5,
            dropped=4,
            dropped_total=4,
            groups=4,
            samples=32,
            tokens=160,
            idle_s=9.0,
            wall_s=6.0,
            time=T0 + 6.0,
        ),
    ]
    lines = [json.dumps(r) for r in rows]
    lines.append("{not json")  # a torn line: skipped and counted
    lines.append("[1, 2]")  # not an object: skipped and counted
    # The resumed trainer (started at T0 + 8) replays step 3, then takes step 4. Step 4 lacks
    # most keys: the report must cope.
    lines.append(
        json.dumps(
            _row(
                3,
                0.50,
                reward_std=0.1,
                staleness_hist={"1": 2, "2": 1, "3": 1},
                staleness_max=3,
                dropped=1,
                dropped_total=1,
                groups=4,
                samples=24,
                tokens=120,
                idle_s=0.0,
                step_s=0.5,
                wall_s=1.0,
                time=T0 + 9.0,
                replay=True,
            )
        )
    )
    lines.append(
        json.dumps({"step": 4, "reward_mean": 0.70, "groups": 4, "time": T0 + 12.0, "wall_s": 4.0})
    )
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "config.yaml").write_text(
        "staleness: {eta: 2, batch_groups: 4}\ntrainer: {reward_target: 0.9}\ntask: {name: reverse}\n"
    )
    (d / "workers.json").write_text(
        json.dumps(
            {
                "workers": [
                    {
                        "worker": "w1",
                        "updates": [
                            {"version": 1, "latency_s": 0.010},
                            {"version": 2, "latency_s": 0.030},
                            {"version": 3, "latency_s": 0.020},
                            {"version": 4, "latency_s": None},
                        ],
                    }
                ]
            }
        )
    )
    (d / "events.jsonl").write_text(
        json.dumps({"kind": "started", "name": "trainer", "pid": 1})
        + "\n"
        + json.dumps({"kind": "restarted", "name": "trainer", "pid": 1, "new_pid": 2})
        + "\n"
    )
    (d / "progress.jsonl").write_text(
        "".join(json.dumps({"time": T0 + t, "finished": 4 * t, "rejected": 0}) + "\n"
                for t in range(0, 13))
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_summary_by_hand(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run)
    s = summarize(run)
    assert s["steps"] == 4 and s["last_step"] == 4
    assert s["malformed_lines"] == 2
    assert s["replayed_steps"] == 1
    assert s["initial_reward"] == 0.10
    assert s["final_reward"] == 0.70  # the last step's reward
    assert s["best_reward"] == 0.70  # the lost 0.99 of step 3 was superseded by its replay
    assert s["reward_target"] == 0.9 and s["reached_target"] is False
    assert s["eta"] == 2 and s["batch_groups"] == 4 and s["task"] == "reverse"
    # First trainer start T0 (= time - wall_s of step 1) to the last row's time T0 + 12.
    assert s["wall_s"] == pytest.approx(12.0)
    # Histogram over the kept rows: step 1 {0: 4}, step 2 {0: 1, 1: 3}, step 3' {1: 2, 2: 1, 3: 1}
    assert s["staleness_hist"] == {"0": 5, "1": 5, "2": 1, "3": 1}
    assert s["max_staleness"] == 3
    assert s["max_staleness_arrived"] == 3
    assert s["max_staleness_trained"] is None  # no row carries staleness_max_trained
    assert s["mean_staleness"] == pytest.approx((0 * 5 + 1 * 5 + 2 * 1 + 3 * 1) / 12)
    assert s["dropped_groups"] == 1  # the largest dropped_total among kept rows
    assert s["groups_trained"] == 16  # 4 steps x 4 groups
    assert s["groups_per_s"] == pytest.approx(16 / 12)
    assert s["samples_per_s"] == pytest.approx((32 + 32 + 24) / 12)
    assert s["tokens_per_s"] == pytest.approx((160 + 160 + 120) / 12)
    assert s["trainer_idle_s"] == pytest.approx(1.5)
    assert s["trainer_idle_frac"] == pytest.approx(1.5 / 12)
    wu = s["weight_updates"]
    assert wu["count"] == 3  # the record without a latency is left out
    assert wu["p50_s"] == pytest.approx(0.020) and wu["max_s"] == pytest.approx(0.030)
    assert wu["mean_s"] == pytest.approx(0.020)
    assert s["restarts"] == {"trainer": 1}
    assert summarize(run, eta=7)["eta"] == 7


@pytest.mark.timeout(120)
def test_sluice_report_rebuilds_the_same_summary(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run)
    assert cli.main(["report", str(run)]) == 0
    out = run / "report"
    first = json.loads((out / "summary.json").read_text())
    for name in ("reward.png", "staleness.png", "throughput.png", "weight_update.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    md = (out / "report.md").read_text()
    assert "0.100 → 0.700" in md and "![reward](reward.png)" in md and "trainer x1" in md
    # Rebuilt from the same files: the same summary.
    other = tmp_path / "again"
    assert cli.main(["report", str(run), "--out", str(other)]) == 0
    assert json.loads((other / "summary.json").read_text()) == first
    assert first == json.loads(json.dumps(build_report(run)))


@pytest.mark.timeout(60)
def test_minimal_metrics_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "bare"
    run.mkdir()
    assert cli.main(["report", str(run)]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("garbage\n")
    with pytest.raises(ReportError, match="no step"):
        summarize(run)
    # Only rewards, no step numbers, no times: still a report (steps numbered in order).
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"reward_mean": r}) + "\n" for r in (0.2, 0.4, 0.6))
    )
    s = build_report(run)
    assert s["steps"] == 3 and s["initial_reward"] == 0.2 and s["final_reward"] == 0.6
    assert s["wall_s"] is None and s["groups_per_s"] is None and s["eta"] is None
    assert s["max_staleness"] is None and s["weight_updates"] is None
    assert s["plots"] == ["reward.png"]
    assert (run / "report" / "reward.png").is_file()


def test_report_from_metrics_alone(tmp_path: Path) -> None:
    """A run directory copied off another machine with only metrics.jsonl (no progress.jsonl,
    no config, no worker records) still gets its summary and plots."""
    run = tmp_path / "run"
    _write_run(run)
    for extra in run.iterdir():
        if extra.name != "metrics.jsonl":
            extra.unlink()
    assert cli.main(["report", str(run), "--eta", "2"]) == 0
    s = json.loads((run / "report" / "summary.json").read_text())
    assert s["eta"] == 2 and s["steps"] >= 2
    assert (run / "report" / "throughput.png").is_file()


def _staleness_run(d: Path, trained: list[int | None], hists: list[dict[str, int]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        {"step": i + 1, "reward_mean": 0.5, "staleness_max_trained": t, "staleness_hist": h}
        for i, (t, h) in enumerate(zip(trained, hists, strict=True))
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "config.yaml").write_text("staleness: {eta: 2, batch_groups: 4}\n")


@pytest.mark.timeout(60)
def test_trained_and_arrived_staleness_apart(tmp_path: Path) -> None:
    """Trained staleness is the max of the steps' staleness_max_trained (1, 2, 1 -> 2); arrived
    staleness is the max of the arrival histogram, which holds a group 3 versions old that the
    trainer dropped (-> 3). report.md shows both."""
    run = tmp_path / "run"
    _staleness_run(run, [1, 2, 1], [{"0": 2, "1": 2}, {"2": 3, "3": 1}, {"1": 4}])
    s = build_report(run)
    assert s["max_staleness_trained"] == 2
    assert s["max_staleness_arrived"] == 3
    assert s["eta"] == 2
    md = (run / "report" / "report.md").read_text()
    assert "trained max 2 · arrived max 3 (eta 2)" in md
    assert json.loads((run / "report" / "summary.json").read_text())["max_staleness_trained"] == 2


@pytest.mark.timeout(60)
def test_trained_staleness_over_eta_is_reported_as_is(tmp_path: Path) -> None:
    """A step that trained a group 4 versions old under eta 2 shows trained max 4: the report
    reads the trainer's own number and never clips it to eta. A step with nothing trained (null)
    counts for nothing."""
    run = tmp_path / "run"
    _staleness_run(run, [1, None, 4], [{"1": 4}, {"3": 2}, {"4": 1}])
    s = summarize(run)
    assert s["eta"] == 2
    assert s["max_staleness_trained"] == 4 and s["max_staleness_trained"] > s["eta"]
    assert s["max_staleness_arrived"] == 4
    build_report(run)
    assert "trained max 4 · arrived max 4 (eta 2)" in (run / "report" / "report.md").read_text()


def test_turns_mean_is_weighted_by_the_steps_samples(tmp_path: Path) -> None:
    # 8 episodes of 1 turn and 24 of 3 turns: (8 * 1 + 24 * 3) / 32 = 2.5; a row without
    # turns_mean (a single-turn run before the field existed) counts for nothing.
    rows = [
        {"step": 1, "reward_mean": 0.1, "samples": 8, "turns_mean": 1.0},
        {"step": 2, "reward_mean": 0.2, "samples": 24, "turns_mean": 3.0},
        {"step": 3, "reward_mean": 0.3, "samples": 8},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert summarize(tmp_path)["turns_mean"] == 2.5
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[2]) + "\n")
    assert summarize(tmp_path)["turns_mean"] is None
