"""Serve a transformers causal LM on CPU behind SGLang's HTTP subset (docs/sglang-protocol.md).

The CPU reference server of ``inference.cpu_server``: float32, weights only from
safetensors, continuous batching with a KV cache. Token ids in, token ids out.

With ``--config RUN.yaml`` the model directory (``model.path``), threads
(``inference.threads``), admin key (``inference.admin_api_key``) and seed (``run.seed``) come
from the run config; explicit flags win.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sluice.config import add_config_arguments

    add_config_arguments(
        p, "inference.threads=2", "run config YAML (model.path, inference.threads)"
    )
    p.add_argument(
        "--model", default=None, help="model directory (config.json + *.safetensors); or --config"
    )
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
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default 1, or the config's)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="model dtype (default float32; float64 makes log-prob checks independent of "
        "batching order)",
    )
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters (/load_lora_adapter, lora_path), as SGLang's flag; on by "
        "itself with --config when trainer.lora.rank > 0",
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="largest adapter rank accepted (default: trainer.lora.rank of --config, else 64)",
    )
    p.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        help="module names adapters may touch, or 'all' (default all)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="server seed for requests without sampling_seed (default 0, or run.seed)",
    )


def _from_config(args: argparse.Namespace) -> None:
    """Fill ``--model/--threads/--admin-api-key/--seed`` left unset from the run config."""
    from sluice.errors import InputError

    if args.config is not None or args.overrides:
        from sluice.config import load_config

        cfg = load_config(args.config, args.overrides)  # ConfigError: exit 2 (sluice.cli)
        if args.model is None:
            if not cfg.model.path:
                raise InputError(
                    "model.path is empty in the config; give --model DIR or set "
                    "model.path (`sluice model init DIR --task NAME` makes a tiny model)"
                )
            args.model = cfg.model.path
        if args.threads is None:
            args.threads = cfg.inference.threads
        if args.admin_api_key is None:
            args.admin_api_key = cfg.inference.admin_api_key
        if args.seed is None:
            args.seed = cfg.run.seed
        lora = cfg.trainer.lora
        if lora.enabled:  # the trainer publishes adapters: serve them
            args.enable_lora = True
            if args.max_lora_rank is None:
                args.max_lora_rank = lora.rank
            if args.lora_target_modules is None:
                from inference.lora import lora_server_args

                flags = lora_server_args(lora.rank, list(lora.target_modules))
                args.lora_target_modules = flags[flags.index("--lora-target-modules") + 1 :]
    if args.model is None:
        raise InputError("give --model DIR or --config RUN.yaml (with model.path)")
    args.threads = 1 if args.threads is None else args.threads
    args.seed = 0 if args.seed is None else args.seed


def run(args: argparse.Namespace) -> int:
    from sluice.errors import InputError

    _from_config(args)
    for name in ("port", "max_batch", "threads"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.port > 65535:
        raise InputError(f"--port must be <= 65535, got {args.port}")
    if args.max_lora_rank is not None and args.max_lora_rank < 1:
        raise InputError(f"--max-lora-rank must be >= 1, got {args.max_lora_rank}")
    if args.enable_lora and args.max_lora_rank is None:
        args.max_lora_rank = 64
    from inference.cpu_server.app import serve
    from inference.models import check_model_dir

    # A bad model dir (ModelDirError: exit 2) or a port that cannot be listened on
    # (CannotListen: exit 1, before the model loads) is one line in sluice.cli.
    check_model_dir(args.model)
    serve(
        args.model,
        host=args.host,
        port=args.port,
        weight_version=args.weight_version,
        admin_api_key=args.admin_api_key,
        max_batch=args.max_batch,
        threads=args.threads,
        seed=args.seed,
        dtype=args.dtype,
        max_lora_rank=args.max_lora_rank if args.enable_lora else None,
        lora_target_modules=args.lora_target_modules,
    )
    return 0
