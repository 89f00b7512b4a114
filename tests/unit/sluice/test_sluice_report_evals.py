"""sluice report and the eval events of metrics.jsonl: never counted as steps, one per version
(the last line wins), shown as a table in report.md and a curve in eval.png."""

from __future__ import annotations

import json
from pathlib import Path

from sluice.report import EVAL_ROWS, build_report, eval_rows, summarize, unique_steps

T0 = 1_800_000_000.0


def _step(n: int, reward: float) -> dict[str, object]:
    return {"step": n, "version": n, "reward_mean": reward, "groups": 2, "time": T0 + n}


def _eval(version: int, greedy: float, sampled: float, step: int) -> dict[str, object]:
    return {
        "event": "eval",
        "version": version,
        "greedy_reward": greedy,
        "sampled_reward": sampled,
        "prompts": 8,
        "worker": "w1",
        "time": T0 + version + 0.5,
        "trainer_step": step,
    }


def _write(d: Path, rows: list[dict[str, object]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_events_are_not_steps_and_count_once_per_version(tmp_path: Path) -> None:
    rows = [
        _step(1, 0.1),
        _step(2, 0.2),
        _eval(2, 0.30, 0.25, 2),
        _step(3, 0.4),
        _eval(2, 0.35, 0.20, 3),  # logged again (a resumed trainer): the last wins
        {"event": "eval", "greedy_reward": 1.0},  # no version: skipped
        {"event": "something-else", "version": 9},
        _step(4, 0.5),
        _eval(4, 0.60, 0.55, 4),
    ]
    _write(tmp_path, rows)
    assert [r["step"] for r in unique_steps(rows)] == [1, 2, 3, 4]
    s = summarize(tmp_path)
    assert (s["steps"], s["last_step"], s["final_reward"]) == (4, 4, 0.5)
    assert s["groups_trained"] == 8
    assert [(e["version"], e["greedy_reward"], e["trainer_step"]) for e in s["evals"]] == [
        (2, 0.35, 3),
        (4, 0.60, 4),
    ]
    assert s["final_eval"]["version"] == 4 and s["best_eval_greedy"] == 0.60

    out = build_report(tmp_path)
    assert "eval.png" in out["plots"] and (tmp_path / "report" / "eval.png").stat().st_size > 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Held-out eval" in md
    assert "| 2 | 0.350 | 0.200 | 8 | 3 |" in md and "| 4 | 0.600 | 0.550 | 8 | 4 |" in md
    assert "![eval](eval.png)" in md
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["evals"] == s["evals"]


def test_a_run_without_evals_has_no_eval_section(tmp_path: Path) -> None:
    _write(tmp_path, [_step(1, 0.1), _step(2, 0.2)])
    s = build_report(tmp_path)
    assert s["evals"] == [] and s["final_eval"] is None and s["best_eval_greedy"] is None
    assert "eval.png" not in s["plots"] and not (tmp_path / "report" / "eval.png").exists()
    assert "Held-out eval" not in (tmp_path / "report" / "report.md").read_text()


def test_many_evals_show_first_last_and_spread(tmp_path: Path) -> None:
    n = 3 * EVAL_ROWS
    rows: list[dict[str, object]] = []
    for v in range(1, n + 1):
        rows += [_step(v, v / n), _eval(v, v / n, v / n, v)]
    _write(tmp_path, rows)
    assert len(eval_rows(rows)) == n
    md = build_report(tmp_path) and (tmp_path / "report" / "report.md").read_text()
    table = [x for x in md.splitlines() if x.startswith("| ") and x.split()[1].isdigit()]
    versions = [int(x.split()[1]) for x in table if x.count("|") == 6]
    assert len(versions) == EVAL_ROWS and versions[0] == 1 and versions[-1] == n
    assert versions == sorted(set(versions))
    assert f"{EVAL_ROWS} of {n} evaluations shown" in md
