"""Train on the run's trajectory buffer: drop over-stale groups, decoupled-PPO steps, publish
weights to RUN_DIR/weights/v{N}, checkpoint with exactly-once acks.

Data parallel: ``torchrun --nproc-per-node N -m sluice train --config RUN.yaml`` (gloo on CPU,
NCCL on GPU); rank 0 publishes and checkpoints. See docs/trainer.md.
"""

# The trainer takes its own section (``trainer``) plus ``TrainerArgs``; ``trainer_args``
# composes those from the run file.

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import TrainerArgs

if TYPE_CHECKING:
    from sluice.config import SluiceConfig


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


def trainer_args(cfg: SluiceConfig) -> TrainerArgs:
    """What the trainer takes from the run file outside its own section."""
    return TrainerArgs(
        run_name=cfg.run.name,
        run_dir=Path(cfg.run.dir),
        seed=cfg.run.seed,
        redis_url=cfg.redis.url,
        model_path=cfg.model.path,
        batch_groups=cfg.staleness.batch_groups,
        eta=cfg.staleness.eta,
        temperature=cfg.rollout.temperature,
        admin_api_key=cfg.inference.admin_api_key,
        eta_auto=cfg.staleness.auto_settings(),
    )


async def run_trainer(
    cfg: SluiceConfig, *, resume: bool = False, max_steps: int | None = None
) -> int:
    """``trainer.loop.run_trainer`` on the run file ``cfg``: returns the steps taken."""
    from sluice.commands import log_task_stacks_on_sigusr2
    from trainer.loop import run_trainer as train

    log_task_stacks_on_sigusr2()

    return await train(
        cfg.trainer,
        trainer_args(cfg),
        resume=resume,
        max_steps=max_steps,
        on_started=lambda: record_config(cfg, max_steps),
    )


def record_config(cfg: SluiceConfig, max_steps: int | None = None) -> None:
    """Record the config the trainer runs with in ``run.dir`` (``sluice.runconfig``:
    ``config.yaml``, or ``config.resume-N.yaml`` when it differs), ``--max-steps`` included."""
    from sluice.runconfig import record_trainer_config

    ran = cfg.model_copy(deep=True)
    if max_steps is not None:
        ran.trainer.max_steps = max_steps
    log = logging.getLogger("sluice.trainer")
    try:
        path, written = record_trainer_config(ran)
    except OSError as e:  # the run goes on; metrics.jsonl in the same directory will tell
        log.warning("could not record the config in %s: %s", ran.run.dir, e)
        return
    if written:
        log.info("config recorded in %s", path)
    else:
        log.info("config already recorded in %s", path)


def run(args: argparse.Namespace) -> int:
    from sluice.config import load_config
    from sluice.errors import InputError

    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max-steps must be >= 1, got {args.max_steps}")
    cfg = load_config(args.config, args.overrides)
    # ConfigError, TrainerError, RunSettingsMismatch (exit 2) and RedisUnavailable (exit 1)
    # become one line in sluice.cli (sluice.errors).
    steps = asyncio.run(run_trainer(cfg, resume=args.resume, max_steps=args.max_steps))
    logging.getLogger("sluice.trainer").info("done: %d steps this run", steps)
    return 0
