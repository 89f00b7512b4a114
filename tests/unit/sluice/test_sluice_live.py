"""sluice.live: the demo's progress, read from a metrics file written here, and its two screens
(plain lines, the rich view) showing trained and arrived staleness apart. No Redis, no process."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sluice.config import SluiceConfig
from sluice.live import Progress, View, plain_line, render


def _cfg() -> SluiceConfig:
    return SluiceConfig.model_validate(
        {"staleness": {"eta": 2, "batch_groups": 4}, "trainer": {"max_steps": 10}}
    )


def _rows() -> list[dict[str, Any]]:
    # Arrived max 3 (step 2 received a group 3 versions old and dropped it); trained max 2.
    return [
        {"step": 1, "reward_mean": 0.1, "staleness_max": 1, "staleness_max_trained": 1},
        {"step": 2, "reward_mean": 0.3, "staleness_max": 3, "staleness_max_trained": 2},
        {"step": 3, "reward_mean": 0.5, "staleness_max": 1, "staleness_max_trained": 1},
    ]


def test_read_metrics_waits_for_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = _rows()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    cut = text.index("\n") + 5  # the first row and the start of the second
    path.write_text(text[:cut])
    p = Progress()
    assert p.read_metrics(path) == rows[:1]
    with path.open("a") as f:
        f.write(text[cut:])
    assert p.read_metrics(path) == rows[1:]
    assert p.rows == rows


def test_trained_and_arrived_staleness_apart() -> None:
    p = Progress(rows=_rows())
    assert p.max_staleness_trained() == 2
    assert p.max_staleness() == 3
    assert Progress().max_staleness_trained() is None
    # A step with nothing trained logs null: it counts for nothing.
    assert Progress(rows=[{"staleness_max_trained": None}]).max_staleness_trained() is None


def test_plain_line_shows_both() -> None:
    line = plain_line(Progress(rows=_rows()), _cfg())
    assert "step 3/10" in line
    assert "staleness trained max 2 · arrived max 3 (eta 2)" in line
    # Before any step: dashes, not a made-up zero.
    assert "staleness trained max - · arrived max - (eta 2)" in plain_line(Progress(), _cfg())


def test_rich_view_shows_both() -> None:
    from rich.console import Console

    child = SimpleNamespace(pid=42, state="running", restarts=0, log_path="logs/trainer.log")
    sup: Any = SimpleNamespace(children={"trainer": child})
    p = Progress(rows=_rows())
    p.events.append("12:00:00 worker (pid 7) killed: restarted")
    console = Console(width=200, record=True)
    console.print(render(p, _cfg(), sup, "cpu"))
    text = console.export_text()
    assert "trained max 2 · arrived max 3 (eta 2)" in text
    assert "last step arrived max 1" in text
    assert "logs/trainer.log" in text and "restarted" in text


def test_plain_view_prints_a_line_per_update(capsys: pytest.CaptureFixture[str]) -> None:
    sup: Any = SimpleNamespace(children={})
    p = Progress(rows=_rows())
    with View(p, _cfg(), sup, "cpu", live=False) as view:
        view.update()  # the first update always prints
        view.update()  # same step, within 2 s: nothing
        view.say("a line")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert "trained max 2 · arrived max 3" in out[0] and out[1] == "a line"
