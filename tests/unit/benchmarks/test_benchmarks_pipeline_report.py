"""benchmarks.pipeline: the auto row's comparison with the best fixed eta, and a run's waste
from its metrics rows."""

from __future__ import annotations

from benchmarks.pipeline.report import summarize
from benchmarks.pipeline.runner import _waste


def test_summarize_compares_auto_with_the_best_fixed_eta() -> None:
    runs = [
        {"eta": 0, "groups_per_s": 1.0},
        {"eta": 1, "groups_per_s": 2.0},
        {"eta": 2, "groups_per_s": 2.5},
        {"eta": "auto", "groups_per_s": 2.4, "eta_max_used": 3},
    ]
    s = summarize(3.0, 4.0, runs)
    assert s["best_eta"] == 2 and s["efficiency"] == 2.5 / 3.0
    assert s["speedup_vs_sync"] == 2.5
    assert s["auto_vs_best"] == 2.4 / 2.5 and s["auto_eta_max_used"] == 3


def test_waste_counts_dropped_and_cancelled_over_generated() -> None:
    rows = [
        {"groups": 4, "dropped_total": 0, "eta": 1, "staleness_max_trained": 1, "hold_s": 0.5},
        {
            "groups": 6,
            "dropped_total": 2,
            "eta": 2,
            "staleness_max_trained": 2,
            "hold_s": 0.25,
            "cancelled_total": 2,
            "waste_share": 0.05,
            "wasted_tokens": 10,
            "generated_tokens": 200,
        },
    ]
    w = _waste(rows, rows[1:])
    assert (w["groups_received"], w["cancelled"]) == (10, 2)
    assert w["dropped_or_cancelled_share"] == 4 / 12
    assert (w["waste_share"], w["max_staleness_trained"], w["hold_s"]) == (0.05, 2, 0.25)
    assert (w["eta_mean"], w["eta_max_used"], w["eta_last"]) == (2, 2, 2)
