"""The control-plane bench's summaries: percentiles, the first N past the threshold, whether a
step kept up with its offered rate and the per-core estimate, against hand-computed values."""

from __future__ import annotations

from benchmarks.control_plane_bench import first_past, kept_up, percentile, workers_per_redis_core


def _row(n: int, p99: float | None, rate: float, cpu: float) -> dict:
    return {
        "workers": n,
        "admit_ms": {"p50": None, "p99": p99, "n": 0},
        "admit_plus_put_per_s": rate,
        "redis_cpu_pct": cpu,
    }


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 99) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    # 101 values 0..100: the q-th percentile is q.
    assert percentile([float(v) for v in range(100, -1, -1)], 99) == 99.0


def test_first_past_takes_the_smallest_n_over_the_limit() -> None:
    rows = [_row(400, 9.0, 0, 0), _row(100, 1.0, 0, 0), _row(200, 5.5, 0, 0)]
    assert first_past(rows, 5.0) == 200
    assert first_past(rows, 10.0) is None
    assert first_past([_row(50, None, 0, 0)], 5.0) is None


def test_kept_up_and_workers_per_core() -> None:
    # 100 workers at 5 groups/s offer 1000 admissions + puts a second.
    assert kept_up(_row(100, 1.0, 900.0, 10.0), 5.0)
    assert not kept_up(_row(100, 1.0, 899.0, 10.0), 5.0)
    rows = [_row(100, 1.0, 1000.0, 10.0), _row(200, 1.0, 2000.0, 25.0), _row(400, 1.0, 100.0, 30)]
    # The largest step that kept up is N=200 at 25 % of a core: 800 workers per core.
    assert workers_per_redis_core(rows, 5.0) == 800.0
    assert workers_per_redis_core([_row(400, 1.0, 100.0, 30)], 5.0) is None


def test_groups_per_redis_core_uses_the_busiest_step() -> None:
    from benchmarks.control_plane_bench import groups_per_redis_core

    rows = [
        {"ops_per_s": {"put": 100.0}, "redis_cpu_us_per_group": 500.0},
        {"ops_per_s": {"put": 300.0}, "redis_cpu_us_per_group": 250.0},
    ]
    assert groups_per_redis_core(rows) == 4000.0
    assert groups_per_redis_core([{"ops_per_s": {"put": 0.0}, "redis_cpu_us_per_group": 0}]) is None
