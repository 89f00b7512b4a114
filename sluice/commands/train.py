"""Train on the run's trajectory buffer: drop over-stale groups, decoupled-PPO steps, publish
weights to RUN_DIR/weights/v{N}, checkpoint with exactly-once acks.

Data parallel: ``torchrun --nproc-per-node N -m sluice train --config RUN.yaml`` (gloo on CPU,
NCCL on GPU); rank 0 publishes and checkpoints. See docs/trainer.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sluice.config import add_config_arguments

    add_config_arguments(p, "trainer.lr=1e-5")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the trainer's last committed checkpoint and replay lost steps",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this step (default trainer.max_steps)",
    )


def run(args: argparse.Namespace) -> int:
    from sluice.config import ConfigError, load_config

    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"sluice train: --max-steps must be >= 1, got {args.max_steps}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"sluice train: {e}") from None

    from buffer import RedisUnavailable
    from trainer.loop import TrainerError, run_trainer

    try:
        steps = asyncio.run(run_trainer(cfg, resume=args.resume, max_steps=args.max_steps))
    except (TrainerError, RedisUnavailable) as e:
        raise SystemExit(f"sluice train: {e}") from None
    logging.getLogger("sluice.trainer").info("done: %d steps this run", steps)
    return 0
