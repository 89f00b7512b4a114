"""Benchmarks: each prints a table and writes JSON, measuring against a baseline in the same run."""

from __future__ import annotations

import argparse
import importlib

# name -> (module under benchmarks/, help)
BENCHES: dict[str, tuple[str, str]] = {
    "buffer": (
        "benchmarks.buffer_bench",
        "buffer put/get throughput vs raw redis-py on the same bytes",
    ),
    "engine": (
        "benchmarks.engine_bench",
        "CPU server decode tok/s vs a transformers generate loop",
    ),
    "weight-sync": (
        "benchmarks.weight_sync_bench",
        "weight update to first new-version token: abort_all vs pause vs gloo broadcast",
    ),
    "pipeline": ("benchmarks.pipeline_bench", "async RL vs its ceilings and vs eta=0 (sync RL)"),
    "control-plane": (
        "benchmarks.control_plane_bench",
        "N simulated workers + a trainer on one Redis: ops/s, admission/put latency, Redis CPU",
    ),
    "trainer": (
        "benchmarks.trainer_bench",
        "sluice's train step vs a plain PyTorch step, same model and batch; publish, checkpoint",
    ),
    "fsdp": (
        "benchmarks.fsdp_bench",
        "trainer.parallel=fsdp vs ddp: parameter + gradient + AdamW bytes per rank, tok/s",
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_text) in BENCHES.items():
        mod = importlib.import_module(module)
        bp = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(bp)
        bp.set_defaults(_bench_module=module)


def run(args: argparse.Namespace) -> int:
    mod = importlib.import_module(args._bench_module)
    return int(mod.run(args) or 0)
