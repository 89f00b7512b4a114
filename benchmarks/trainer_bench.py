"""Trainer speed: sluice's train step against a plain PyTorch step on the same model and batch.

Both run in this process on the same device, on a random-init Qwen2-shaped model and the same
synthetic batch (``--samples`` sequences of ``--prompt-tokens`` + output tokens, the output
lengths fixed or drawn from a long tail), one after the other:

* ``sluice``: ``trainer.step.train_step`` as the trainer calls it — micro-batches packed by
  ``trainer.micro_batch_tokens``, the proximal log-probs recomputed by a no-grad forward, the
  decoupled-PPO loss, clipping, AdamW (fp32 master weights, bf16 autocast on CUDA).
* ``plain``: the floor: the same model class and dtype policy, a forward + log-prob loss +
  backward per micro-batch of the same rows and one fused AdamW step; nothing else.

Tokens/s counts every sequence position the step reads (prompt + output, padding excluded),
the same for both; ``trained tok/s`` counts output tokens. MFU = 6 · parameters · tokens/s over
the device's peak (``--peak-tflops``; attention FLOPs not counted). Then the trainer's per-step
costs outside the step: publishing a version to disk (fp32 and bf16, ``trainer.publish_dtype``),
a checkpoint written in line, and its copy to host memory (all a step pays with
``trainer.async_checkpoint``).

``--profile DIR`` writes a torch.profiler table (and a Chrome trace) of one sluice step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    # layers, hidden, heads, kv_heads, intermediate, vocab
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "kv": 4, "inter": 256, "vocab": 256},
    "10M": {"layers": 4, "hidden": 256, "heads": 4, "kv": 4, "inter": 1024, "vocab": 8192},
    # the pipeline bench's long-tail-gpu model
    "167M": {"layers": 9, "hidden": 1024, "heads": 16, "kv": 4, "inter": 2816, "vocab": 32000},
    # Qwen2-0.5B's shape, untied
    "0.5B": {"layers": 24, "hidden": 896, "heads": 14, "kv": 2, "inter": 4864, "vocab": 151936},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", default=["tiny", "10M"], choices=list(SHAPES))
    p.add_argument("--samples", type=int, default=128, help="sequences per step (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=256, help="output length (or max)")
    p.add_argument(
        "--lengths",
        choices=("fixed", "long-tail"),
        default="fixed",
        help="output lengths: all --output-tokens, or lognormal (median 1/4 of it) capped at it",
    )
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--no-io", action="store_true", help="skip the publish/checkpoint timings")
    p.add_argument("--profile", default=None, help="write a profile of one sluice step here")
    p.add_argument("--json", default=None, help="write results to this JSON file")


def _model(shape: dict[str, int], device: Any) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device).eval()


def _samples(args: argparse.Namespace, vocab: int) -> list[Any]:
    import numpy as np

    from trainer.batch import TrainSample

    rng = np.random.default_rng(0)
    out = []
    t_max = args.output_tokens
    for i in range(args.samples):
        if args.lengths == "fixed":
            t = t_max
        else:
            t = int(min(t_max, max(1, rng.lognormal(np.log(max(1, t_max // 4)), 1.0))))
        out.append(
            TrainSample(
                group_id=f"g{i // 8}",
                prompt_ids=rng.integers(3, vocab, args.prompt_tokens).astype(np.int64),
                output_ids=rng.integers(3, vocab, t).astype(np.int64),
                behaviour_logp=np.full(t, -np.log(vocab), dtype=np.float32),
                token_versions=np.zeros(t, dtype=np.int64),
                advantage=float(rng.standard_normal()),
                reward=float(rng.random()),
            )
        )
    return out


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, steps: int, warmup: int, device: Any) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _sluice_step(model: Any, samples: list[Any], tc: Any, device: Any) -> Any:
    from trainer.model import build_optimizer
    from trainer.step import train_step

    opt, sched = build_optimizer(model, tc)

    def step() -> None:
        train_step(
            model, opt, sched, samples, tc, temperature=1.0, device=device, current_version=0
        )

    return step, opt


def _plain_step(model: Any, samples: list[Any], tc: Any, device: Any) -> Any:
    """The floor: the same micro-batches, forward + log-prob loss + backward, fused AdamW."""
    import torch

    from trainer.batch import pack_micro_batches

    mbs = [mb.to(device) for mb in pack_micro_batches(samples, tc.micro_batch_tokens)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    auto = device.type == "cuda"

    def step() -> None:
        for mb in mbs:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=auto):
                logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            lp = lp.gather(-1, mb.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            loss = -(lp * mb.mask * mb.advantages[:, None]).sum() / len(samples)
            torch.autograd.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def _io_costs(model: Any, opt: Any, workdir: Path) -> dict[str, float]:
    """Seconds to publish one version (fp32 as saved, and bf16) and to write a checkpoint."""
    import torch

    from trainer.checkpoint import save_checkpoint, snapshot_checkpoint
    from weights.disk import write_model_dir

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    write_model_dir(model, workdir / "v1")
    out["publish_fp32_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_model_dir(model, workdir / "v2", dtype=torch.bfloat16)  # trainer.publish_dtype
    out["publish_bf16_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_checkpoint(workdir / "ckpt", model=model, optimizer=opt, scheduler=None, state={})
    out["checkpoint_s"] = time.perf_counter() - t0
    # What the step pays with trainer.async_checkpoint: the copy to host memory.
    t0 = time.perf_counter()
    snapshot_checkpoint(model=model, optimizer=opt, scheduler=None, state={})
    out["checkpoint_snapshot_s"] = time.perf_counter() - t0
    return out


def _peak(args: argparse.Namespace, device: Any) -> float | None:
    from trainer.metrics import device_peak_flops

    return device_peak_flops(device, args.peak_tflops)


def _profile(step: Any, device: Any, out_dir: Path, name: str) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        step()
        _sync(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    (out_dir / f"profile-{name}.txt").write_text(table)
    prof.export_chrome_trace(str(out_dir / f"trace-{name}.json"))
    del torch
    return str(table)


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.common import machine_info, print_table, write_json
    from trainer.config import TrainerConfig
    from trainer.model import choose_device, set_attention_backends

    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    set_attention_backends(device, cudnn=False)  # trainer.cudnn_attention's default, both steps
    peak = _peak(args, device)
    tc = TrainerConfig(micro_batch_tokens=args.micro_batch_tokens, lr=1e-5)
    results: dict[str, Any] = {}
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        samples = _samples(args, shape["vocab"])
        seq_tokens = sum(s.length for s in samples)
        out_tokens = sum(int(s.output_ids.shape[0]) for s in samples)
        res: dict[str, Any] = {"shape": shape, "seq_tokens": seq_tokens, "out_tokens": out_tokens}
        for variant, make in (("plain", _plain_step), ("sluice", _sluice_step)):
            model = _model(shape, device)
            n_params = sum(p.numel() for p in model.parameters())
            step, opt = make(model, samples, tc, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt = _timed(step, args.steps, args.warmup, device)
            tok_s = seq_tokens / dt
            r: dict[str, Any] = {
                "step_s": dt,
                "tok_per_s": tok_s,
                "trained_tok_per_s": out_tokens / dt,
                "params": n_params,
                "mfu": (6 * n_params * tok_s / peak) if peak else None,
            }
            if device.type == "cuda":
                r["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if variant == "sluice":
                if args.profile:
                    _profile(step, device, Path(args.profile), name)
                if not args.no_io:
                    with tempfile.TemporaryDirectory(prefix="sluice-trainer-bench-") as d:
                        r.update(_io_costs(model, opt, Path(d)))
            res[variant] = r
            del model, opt, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
        res["ratio"] = res["sluice"]["tok_per_s"] / res["plain"]["tok_per_s"]
        results[name] = res
        s, p = res["sluice"], res["plain"]
        rows.append(
            [
                name,
                f"{p['tok_per_s']:,.0f}",
                f"{s['tok_per_s']:,.0f}",
                f"{res['ratio']:.2f}",
                f"{s['trained_tok_per_s']:,.0f}",
                f"{p['mfu']:.1%}" if p["mfu"] is not None else "n/a",
                f"{s['mfu']:.1%}" if s["mfu"] is not None else "n/a",
                f"{s.get('publish_fp32_s', float('nan')):.3f}",
                f"{s.get('publish_bf16_s', float('nan')):.3f}",
                f"{s.get('checkpoint_s', float('nan')):.3f}",
                f"{s.get('checkpoint_snapshot_s', float('nan')):.3f}",
            ]
        )
    print_table(
        f"train step on {device} ({args.samples} seqs, prompt {args.prompt_tokens}, "
        f"output {args.lengths} {args.output_tokens})",
        [
            "shape",
            "plain tok/s",
            "sluice tok/s",
            "sluice/plain",
            "trained tok/s",
            "plain MFU",
            "sluice MFU",
            "publish fp32 s",
            "publish bf16 s",
            "checkpoint s",
            "snapshot s",
        ],
        rows,
    )
    write_json(
        args.json,
        {
            "bench": "trainer",
            "machine": machine_info(),
            "device": str(device),
            "peak_flops": peak,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "results": results,
        },
    )
    return 0
