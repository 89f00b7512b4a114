"""Serve a transformers causal LM on CPU behind SGLang's HTTP subset (shared/SGLANG_PROTOCOL.md).

The CPU reference server of ``rollout_workers.cpu_server``: float32, weights only from
safetensors, continuous batching with a KV cache. Token ids in, token ids out.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json + *.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port (default 30000)")
    p.add_argument("--weight-version", default="0", help="initial weight version (default '0')")
    p.add_argument(
        "--admin-api-key",
        default=None,
        help="require 'Authorization: Bearer K' on control endpoints (pause, update, abort, ...)",
    )
    p.add_argument(
        "--max-batch", type=int, default=64, help="most requests decoded together (default 64)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument(
        "--seed", type=int, default=0, help="server seed for requests without sampling_seed"
    )


def run(args: argparse.Namespace) -> int:
    for name in ("port", "max_batch", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from rollout_workers.cpu_server import serve
    from rollout_workers.models import ModelDirError, check_model_dir

    try:
        check_model_dir(args.model)
    except ModelDirError as e:
        raise SystemExit(f"sluice serve: {e}") from None
    serve(
        args.model,
        host=args.host,
        port=args.port,
        weight_version=args.weight_version,
        admin_api_key=args.admin_api_key,
        max_batch=args.max_batch,
        threads=args.threads,
        seed=args.seed,
    )
    return 0
