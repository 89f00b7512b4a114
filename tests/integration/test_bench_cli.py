"""The buffer and weight-sync benchmarks end to end on small settings: they run, measure both
sides and write their JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluice.cli import main


@pytest.mark.timeout(120)
def test_buffer_bench_writes_paired_results(tmp_path: Path) -> None:
    out = tmp_path / "buffer.json"
    argv = [
        "bench",
        "buffer",
        "--json",
        str(out),
        "--tokens",
        "64",
        "512",
        "--mb-per-round",
        "1",
        "--rounds",
        "2",
    ]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert [r["tokens"] for r in doc["results"]] == [64, 512]
    for r in doc["results"]:
        for k in ("put_per_s", "get_per_s", "raw_put_per_s", "raw_get_per_s"):
            assert r[k] > 0, k
        assert 0 < r["put_ratio"] < 10 and 0 < r["get_ratio"] < 10
        assert r["samples"] == 8 * r["groups"]


@pytest.mark.timeout(180)
def test_weight_sync_bench_every_path_reaches_the_new_version(tmp_path: Path) -> None:
    out = tmp_path / "ws.json"
    png = tmp_path / "ws.png"
    argv = [
        "bench",
        "weight-sync",
        "--json",
        str(out),
        "--plot",
        str(png),
        "--sizes",
        "tiny",
        "--trials",
        "1",
        "--inflight",
        "2",
        "--workdir",
        str(tmp_path / "models"),
        "--lora-ranks",
        "4",
    ]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    paths = ["abort_all", "pause", "distributed", "ipc", "lora-r4"]
    assert [r["path"] for r in doc["results"]] == paths
    for r in doc["results"]:
        assert 0 < r["latency_s"] < 60
        assert r["weight_bytes"] > 0 and r["gb_per_s"] > 0
    full, lora = doc["results"][0], doc["results"][-1]
    # rank 4 on every linear layer of the tiny llama (d=64, intermediate 256, 2 layers), fp32:
    # q, k, v, o: 4*64 + 64*4 = 512 each; gate, up: 4*64 + 256*4 = 1280; down: 4*256 + 64*4 =
    # 1280 -> 5888 per layer, 11776 parameters, 47104 bytes plus the safetensors header.
    assert 47104 < lora["weight_bytes"] < 47104 + 8192
    assert lora["fraction"] == pytest.approx(lora["weight_bytes"] / full["weight_bytes"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(180)
def test_trainer_bench_measures_both_steps_and_the_io(tmp_path: Path) -> None:
    out = tmp_path / "trainer.json"
    argv = [
        "bench",
        "trainer",
        "--shapes",
        "tiny",
        "--samples",
        "8",
        "--output-tokens",
        "16",
        "--lengths",
        "long-tail",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    r = json.loads(out.read_text())["results"]["tiny"]
    assert r["seq_tokens"] == 8 * 64 + r["out_tokens"] and 8 <= r["out_tokens"] <= 8 * 16
    for variant in ("plain", "sluice"):
        assert r[variant]["tok_per_s"] > 0 and r[variant]["mfu"] is None  # no peak on a CPU
    assert r["ratio"] == r["sluice"]["tok_per_s"] / r["plain"]["tok_per_s"]
    for k in ("publish_fp32_s", "publish_bf16_s", "checkpoint_s", "checkpoint_snapshot_s"):
        assert r["sluice"][k] > 0, k


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_bench_measures_both_variants_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "fsdp.json"
    argv = ["bench", "fsdp", "--shape", "tiny", "--world", "2", "--samples", "4"]
    argv += ["--output-tokens", "8", "--steps", "1", "--warmup", "1", "--json", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())["results"]
    for v in ("ddp", "fsdp"):
        assert len(r[v]["ranks"]) == 2 and r[v]["tok_per_s"] > 0
        for rank in r[v]["ranks"]:
            assert all(rank["held_bytes"][k] > 0 for k in ("params", "grads", "optimizer"))
    assert r["held_ratio"] == r["fsdp"]["held_total_max"] / r["ddp"]["held_total_max"]
    assert r["held_ratio"] < 0.75  # sharded over 2 ranks (tiny shape: padding weighs more)
