"""The main job: train a tiny model on the reverse task with every sluice process, supervised.

With no arguments: a private redis-server, a tiny random-init model, one inference server (the
CPU server, or SGLang on a GPU), one rollout worker and one trainer as separate processes
reading one config (RUN_DIR/config.yaml), a live view, and RUN_DIR/report/ at the end. A
process that dies is restarted (the trainer with --resume). Ctrl-C stops everything.
Exit 0 when the trainer finished its steps or reached trainer.reward_target.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sluice.config import add_config_arguments

    add_config_arguments(
        p, "trainer.lr=1e-3", "run config YAML over the demo's defaults (examples/demo.yaml)"
    )
    p.add_argument("--eta", type=int, default=None, help="staleness limit (staleness.eta)")
    p.add_argument("--max-steps", type=int, default=None, help="train steps (trainer.max_steps)")
    p.add_argument(
        "--run-dir",
        default=None,
        help="run directory (default: run.dir plus a timestamp, e.g. runs/demo-20260101-120000)",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis instead of starting a private redis-server (so does a redis.url "
        "set in --config or --set)",
    )
    p.add_argument(
        "--engine", choices=("auto", "sglang", "cpu"), default=None, help="inference engine"
    )
    p.add_argument(
        "--no-live", action="store_true", help="plain log lines instead of the live view"
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="restarts allowed per process before the demo gives up (default 3)",
    )
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds between SIGTERM and SIGKILL when stopping a process (default 30)",
    )


def given_redis_url(args: argparse.Namespace) -> str | None:
    """The Redis the demo is told to use: ``--redis-url``, else a ``redis.url`` the config file
    or a ``--set`` gives (the last one wins); None: start a private redis-server."""
    from sluice.config import load_config, read_config_file

    if args.redis_url is not None:
        return str(args.redis_url)
    given = args.config is not None and "url" in (read_config_file(args.config).get("redis") or {})
    given = given or any(o.split("=", 1)[0].strip() == "redis.url" for o in args.overrides)
    return load_config(args.config, args.overrides).redis.url if given else None


def run(args: argparse.Namespace) -> int:
    from sluice.demo import DemoOptions, run_demo
    from sluice.errors import InputError

    for name in ("eta", "max_steps"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "eta" else 1):
            raise InputError(f"--{name.replace('_', '-')} out of range: {v}")
    if args.stop_timeout <= 0:
        raise InputError(f"--stop-timeout must be > 0, got {args.stop_timeout}")
    opts = DemoOptions(
        config=args.config,
        overrides=list(args.overrides),
        eta=args.eta,
        max_steps=args.max_steps,
        run_dir=args.run_dir,
        redis_url=given_redis_url(args),
        engine=args.engine,
        live=not args.no_live and sys.stdout.isatty(),
        max_restarts=args.max_restarts,
        stop_timeout=args.stop_timeout,
    )
    return run_demo(opts)
