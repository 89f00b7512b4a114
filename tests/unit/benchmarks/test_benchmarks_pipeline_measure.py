"""benchmarks.pipeline.measure: the metrics rows the bench measures are step rows only."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.pipeline.measure import read_metrics


def test_read_metrics_skips_event_lines(tmp_path: Path) -> None:
    rows = [{"step": 1, "time": 1.0}, {"event": "eval", "version": 1}, {"step": 2, "time": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(tmp_path) == [rows[0], rows[2]]
    assert read_metrics(tmp_path / "absent") == []
