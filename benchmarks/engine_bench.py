"""CPU server decode throughput vs a plain transformers ``generate`` loop on the same model.

For each concurrency c (default 1, 8, 32): c requests of ``--new-tokens`` tokens each
(sampled, T=1, ``ignore_eos``) sent at once to a ``sluice serve`` child process, against one
batched ``model.generate`` over the same c prompts in this process (static batching, the
baseline; same thread count). Tokens/s = generated tokens / wall time; the server's time
includes HTTP. Both run on the same random-init tiny model, written to a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32], help="(default 1 8 32)"
    )
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per request (default 128)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--layers", type=int, default=2, help="model layers (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="model hidden size (default 64)")
    p.add_argument("--vocab", type=int, default=256, help="model vocabulary (default 256)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    p.add_argument("--model", default=None, help="use this model dir instead of a tiny one")


async def _server_round(url: str, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    import aiohttp

    async with aiohttp.ClientSession() as s:

        async def one(ids: list[int], seed: int) -> int:
            body = {
                "input_ids": ids,
                "sampling_params": {
                    "max_new_tokens": new_tokens,
                    "temperature": 1.0,
                    "ignore_eos": True,
                    "sampling_seed": seed,
                },
            }
            async with s.post(url + "/generate", json=body) as r:
                r.raise_for_status()
                return len((await r.json())["output_ids"])

        await one(prompts[0], 0)  # warm-up
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts)))
        return sum(counts), time.perf_counter() - t0


def _baseline_round(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    import torch

    ids = torch.tensor(prompts)
    kw: dict[str, Any] = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
    )
    with torch.inference_mode():
        model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), **kw)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        dt = time.perf_counter() - t0
    return int(out[:, ids.shape[1] :].numel()), dt


def _rounds(url: str, model: Any, vocab: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One round per concurrency: the server at ``url`` and ``generate`` on the same prompts."""
    import random

    rng = random.Random(0)
    results: list[dict[str, Any]] = []
    for c in args.concurrency:
        prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(c)]
        n_s, t_s = asyncio.run(_server_round(url, prompts, args.new_tokens))
        n_b, t_b = _baseline_round(model, prompts, args.new_tokens)
        results.append(
            {
                "concurrency": c,
                "server_tok_per_s": n_s / t_s,
                "baseline_tok_per_s": n_b / t_b,
                "server_s": t_s,
                "baseline_s": t_b,
                "tokens": n_s,
            }
        )
    return results


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from benchmarks.common import machine_info, print_table, write_json
    from inference.launch import launch_cpu_server
    from inference.models import init_tiny_model, load_model

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sluice-engine-bench-") as tmp:
        model_dir = (
            Path(args.model)
            if args.model
            else init_tiny_model(
                Path(tmp) / "model",
                vocab=args.vocab,
                layers=args.layers,
                hidden=args.hidden,
                seed=0,
            )
        )
        model = load_model(model_dir)
        vocab = int(model.config.vocab_size)
        server = launch_cpu_server(
            model_dir,
            threads=args.threads,
            extra_args=["--max-batch", str(max(args.concurrency))],
            log_path=Path(tmp) / "server.log",
        )
        with server:
            results = _rounds(server.url, model, vocab, args)
    print_table(
        f"CPU server vs transformers generate ({args.new_tokens} new tokens/request, "
        f"{args.threads} thread(s))",
        ["concurrency", "server tok/s", "baseline tok/s", "server / baseline"],
        [
            [r["concurrency"], r["server_tok_per_s"], r["baseline_tok_per_s"],
             r["server_tok_per_s"] / r["baseline_tok_per_s"]]
            for r in results
        ],
    )  # fmt: skip
    write_json(
        args.json,
        {
            "bench": "engine",
            "machine": machine_info(),
            "model": {
                "dir": str(args.model or "tiny"),
                "layers": args.layers,
                "hidden": args.hidden,
                "vocab": vocab,
            },
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "threads": args.threads,
            "results": results,
        },
    )
    return 0
