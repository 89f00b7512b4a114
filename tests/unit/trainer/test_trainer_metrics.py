"""``trainer.metrics``: the staleness histogram, the trained staleness from the trained groups'
own token versions, and the metrics row."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from buffer import Delivered, Sample, TrajectoryGroup
from trainer.ledger import StepBatch
from trainer.metrics import (
    HIST,
    RedisClock,
    StepCounts,
    StepRecord,
    hist_bucket,
    hist_labels,
    step_row,
    trained_staleness_max,
    write_step,
)
from trainer.step import StepStats


def _group(gid: str, admission: int, *token_versions: list[int]) -> Delivered:
    samples = [
        Sample(
            output_ids=np.arange(len(v), dtype=np.int32) + 3,
            behaviour_logp=np.zeros(len(v), dtype=np.float32),
            token_versions=np.array(v, dtype=np.int32),
            reward=0.0,
            finish_reason="stop",
            index=i,
        )
        for i, v in enumerate(token_versions)
    ]
    g = TrajectoryGroup(
        run_id="r",
        prompt_id="p",
        prompt_ids=np.array([1, 2], dtype=np.int32),
        samples=samples,
        worker_id="w",
        admission_version=admission,
        group_id=gid,
    )
    return Delivered(f"1-{gid}", g)


def test_histogram_buckets_and_labels() -> None:
    assert [hist_bucket(s) for s in (-5, -1, 0, 1, 31, 32, 99)] == [0, 0, 1, 2, 32, 33, 33]
    counts = [0.0] * HIST
    for s in (-1, 0, 0, 2, 40):
        counts[hist_bucket(s)] += 1
    assert hist_labels(counts) == {"-1": 1, "0": 2, "2": 1, "32+": 1}


def test_trained_staleness_is_that_of_the_oldest_trained_token() -> None:
    # at version 7: group a's oldest token is v5 (7 - 5 = 2); group b's is v6 (1); group c
    # has no token and was admitted at v3 (7 - 3 = 4)
    a = _group("a", 4, [5, 6], [6, 7])
    b = _group("b", 5, [6])
    c = _group("c", 3, [])
    assert trained_staleness_max(7, [a, b]) == 2
    assert trained_staleness_max(7, [b]) == 1
    assert trained_staleness_max(7, [a, b, c]) == 4
    assert trained_staleness_max(7, []) is None


def _row(trained: int | None) -> dict[str, object]:
    kept = [_group("a", 0, [1])]
    batch = StepBatch([*kept, _group("z", 0, [0])], version=3, replay=True, idle_s=0.5)
    rec = StepRecord(
        step=4,
        version=5,
        dropped_total=7,
        batch=batch,
        kept=kept,
        dropped=["1-z"],
        step_s=2.0,
        wall_s=9.0,
    )
    hist = [0.0] * HIST
    hist[hist_bucket(2)] += 1
    hist[hist_bucket(3)] += 1
    counts = StepCounts(groups=2, dropped=1, idle_s=0.5, hist=hist, staleness_max_trained=trained)
    m = dict.fromkeys(
        (
            "reward_mean",
            "reward_std",
            "w_mean",
            "w_max",
            "w_frac_masked",
            "w_frac_truncated",
            "clip_frac",
            "approx_kl",
            "logp_abs_diff",
            "logp_k3_kl",
            "logp_gap_tokens",
        ),
        0.0,
    )
    m["logp_abs_diff"] = float("nan")
    stats = StepStats(loss=0.1, tokens=10, samples=2, grad_norm=1.0, lr=0.01, metrics=m)
    return step_row(rec, stats, counts, buffer_s=0.25)


def test_step_row_fields(tmp_path: Path) -> None:
    row = _row(2)
    assert (row["staleness_max"], row["staleness_max_trained"]) == (3, 2)
    assert row["staleness_hist"] == {"2": 1, "3": 1}
    assert row["group_ids"] == ["a"] and row["dropped_group_ids"] == ["z"]
    assert (row["step"], row["version"], row["replay"], row["dropped_total"]) == (4, 5, True, 7)
    assert row["tokens_per_s"] == 5.0 and row["buffer_s"] == 0.25
    path = tmp_path / "metrics.jsonl"
    write_step(path, row)
    write_step(path, _row(None))
    first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert first["logp_abs_diff"] is None  # NaN is written as null
    assert second["staleness_max_trained"] is None


def test_redis_clock_counts_awaited_calls() -> None:
    clock = RedisClock()

    async def call() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert asyncio.run(clock(call())) == 7
    first = clock.take()
    assert first >= 0.01 and clock.take() == 0.0


def test_perf_fields_mfu_and_trained_tokens_per_s_by_hand() -> None:
    from trainer.metrics import Phases, perf_fields

    ph = Phases(train_s=2.0, publish_s=0.5, checkpoint_s=1.0, seq_tokens=100)
    f = perf_fields(ph, out_tokens=40, params=10, peak_flops=6000.0)
    # 6 * 10 params * 100 positions / 2 s = 3000 FLOP/s, half of the 6000 peak
    assert f["mfu"] == 0.5
    assert f["train_tokens_per_s"] == 20.0
    assert (f["train_s"], f["publish_s"], f["checkpoint_s"], f["seq_tokens"]) == (
        2.0,
        0.5,
        1.0,
        100,
    )
    assert perf_fields(ph, out_tokens=40, params=10, peak_flops=None)["mfu"] is None


def test_device_peak_flops_cpu_none_and_override() -> None:
    import torch

    from trainer.metrics import device_peak_flops

    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops(torch.device("cpu"), 2.0) == 2e12


def test_publish_dtype_auto_is_bf16_on_cuda_only() -> None:
    import torch

    from trainer.parts import publish_dtype

    assert publish_dtype("auto", torch.device("cpu")) is None
    assert publish_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert publish_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert publish_dtype("float32", torch.device("cuda", 0)) is None
