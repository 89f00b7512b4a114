"""``sluice bench engine`` end to end on a very small setting: it runs and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluice.cli import main


@pytest.mark.timeout(120)
def test_engine_bench_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    argv = ["bench", "engine", "--json", str(out), "--concurrency", "1", "4", "--new-tokens", "8"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert [r["concurrency"] for r in doc["results"]] == [1, 4]
    for r in doc["results"]:
        assert r["tokens"] == 8 * r["concurrency"]
        assert r["server_tok_per_s"] > 0 and r["baseline_tok_per_s"] > 0
