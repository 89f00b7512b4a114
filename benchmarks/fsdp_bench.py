"""FSDP2 against DDP: the memory each rank holds, and the step's speed, same model and batch.

``--world N`` ranks (processes on this host: gloo on the CPU, NCCL on GPUs, one GPU per rank)
run the trainer's own step (``trainer.step.train_step``, AdamW from ``trainer.model``) twice,
one variant after the other, on a random-init Qwen2-shaped model (``sluice bench trainer``'s
shapes) and the same synthetic batch split ``rank::N``:

* ``ddp``: ``trainer.parallel=ddp``: every rank holds the full fp32 weights, gradients and AdamW
  state (with one rank: the plain unsharded step, as ``sluice train`` runs it);
* ``fsdp``: ``trainer.parallel=fsdp``: the model sharded by ``trainer.fsdp.shard_model`` (FSDP2;
  bf16 all-gathers with fp32 master weights on CUDA).

Per rank it counts the bytes of parameters, gradients and optimizer state the rank holds
(``trainer.fsdp.local_bytes``: local shards, storages counted once; taken just before each
``optimizer.step``, when gradients and state both exist; DDP's gradient buckets are not
counted, which favours DDP) and the peak device memory on CUDA; the step's tokens/s counts
every position of the whole batch (prompt + output, all ranks). The table gives the ratio
fsdp/ddp of both.

On one GPU, ``--world 1 --device cuda`` measures the sharded code path's tokens/s against the
unsharded step (what one rank pays for FSDP2's hooks and bf16 casts).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("ddp", "fsdp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.trainer_bench import SHAPES

    p.add_argument("--shape", default="10M", choices=list(SHAPES))
    p.add_argument("--world", type=int, default=2, help="ranks (processes) (default 2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--samples", type=int, default=16, help="sequences per step, all ranks")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--lengths", choices=("fixed", "long-tail"), default="fixed")
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--json", default=None, help="write results to this JSON file")


def _rank(rank: int, variant: str, args: argparse.Namespace, work: str) -> None:
    """One rank of one variant: train, measure, write ``work/{variant}-{rank}.json``."""
    import torch
    import torch.distributed as td

    from benchmarks.trainer_bench import SHAPES, _model, _samples
    from trainer.config import TrainerConfig
    from trainer.fsdp import local_bytes, shard_model
    from trainer.model import build_optimizer, set_attention_backends
    from trainer.step import DistInfo, train_step

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    set_attention_backends(device, cudnn=False)  # trainer.cudnn_attention's default
    td.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{work}/init-{variant}",
        rank=rank,
        world_size=args.world,
    )
    dist = DistInfo(rank, args.world)
    shape = SHAPES[args.shape]
    model: Any = _model(shape, torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters())
    if variant == "fsdp":
        model = shard_model(model, device)
        train_model = model
    else:
        model.to(device)
        train_model = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[rank] if cuda else None)
    tc = TrainerConfig(micro_batch_tokens=args.micro_batch_tokens, lr=1e-5, parallel=variant)
    opt, sched = build_optimizer(model, tc)
    held: dict[str, int] = {}

    def measure(*_: Any) -> None:
        b = local_bytes(model, opt)
        if sum(b.values()) >= sum(held.values()):
            held.update(b)

    opt.register_step_pre_hook(measure)
    samples = _samples(args, shape["vocab"])
    seq_tokens = sum(s.length for s in samples)
    mine = samples[rank :: args.world]

    def step() -> None:
        train_step(
            train_model, opt, sched, mine, tc, temperature=1.0, device=device,
            current_version=0, dist=dist,
        )  # fmt: skip

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    td.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    out = {
        "rank": rank,
        "params": params,
        "held_bytes": held,
        "held_total": sum(held.values()),
        "step_s": dt,
        "tok_per_s": seq_tokens / dt,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
    }
    Path(work, f"{variant}-{rank}.json").write_text(json.dumps(out))
    td.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.multiprocessing.spawn import start_processes

    from benchmarks.common import machine_info, print_table, write_json

    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} GPUs")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sluice-fsdp-bench-") as work:
        for variant in VARIANTS:
            start_processes(  # type: ignore[no-untyped-call]
                _rank, args=(variant, args, work), nprocs=args.world, start_method="spawn"
            )
            ranks = [
                json.loads(Path(work, f"{variant}-{r}.json").read_text()) for r in range(args.world)
            ]
            results[variant] = {
                "ranks": ranks,
                "held_total_max": max(r["held_total"] for r in ranks),
                "tok_per_s": min(r["tok_per_s"] for r in ranks),
                "peak_device_mem_gb": ranks[0]["peak_device_mem_gb"],
            }
    d, f = results["ddp"], results["fsdp"]
    ratio = f["held_total_max"] / d["held_total_max"]
    speed = f["tok_per_s"] / d["tok_per_s"]
    results["held_ratio"] = ratio
    results["tok_per_s_ratio"] = speed
    if d["peak_device_mem_gb"]:
        results["peak_device_mem_ratio"] = f["peak_device_mem_gb"] / d["peak_device_mem_gb"]
    mb = 1024 * 1024
    rows = []
    for v in VARIANTS:
        r0 = results[v]["ranks"][0]["held_bytes"]
        peak = results[v]["peak_device_mem_gb"]
        rows.append(
            [
                v,
                f"{r0['params'] / mb:,.1f}",
                f"{r0['grads'] / mb:,.1f}",
                f"{r0['optimizer'] / mb:,.1f}",
                f"{results[v]['held_total_max'] / mb:,.1f}",
                f"{results[v]['tok_per_s']:,.0f}",
                f"{peak:.2f}" if peak else "n/a",
            ]
        )
    rows.append(["fsdp/ddp", "", "", "", f"{ratio:.3f}", f"{speed:.2f}", ""])
    params = results["ddp"]["ranks"][0]["params"]
    print_table(
        f"{args.shape} ({params / 1e6:.1f}M params), {args.world} rank(s) on {args.device}: "
        "MiB held per rank (rank 0; total: the largest rank)",
        ["variant", "params", "grads", "AdamW state", "total", "tok/s", "peak GB"],
        rows,
    )
    write_json(
        args.json,
        {
            "bench": "fsdp",
            "machine": machine_info(),
            "torch": torch.__version__,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "results": results,
        },
    )
    return 0
