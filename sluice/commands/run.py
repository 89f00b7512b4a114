"""Change a live run's settings: ``sluice run set-eta N``.

``set-eta`` changes the staleness limit in Redis; the next admission of any worker uses it
(lowering it stops admissions until the trainer catches up; raising it admits at once), and so
does the trainer's staleness drop. The run's value wins from then on: a worker or trainer
started (or restarted, or resumed) later with a config that says another eta logs one warning
naming both values and uses the run's. (batch_groups is fixed for a run: a trainer whose
config differs stops with an error naming both values.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from sluice.commands.status import (
    CommandError,
    add_redis_arguments,
    connect_and_pick_run,
    resolve_url,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="run_command", metavar="SUBCOMMAND", required=True)
    se = sub.add_parser(
        "set-eta",
        help="change the staleness limit eta of a live run",
        description="Change the staleness limit eta of a live run; the next admission uses it.",
    )
    se.add_argument("eta", type=int, help="new staleness limit (>= 0; 0 = synchronous RL)")
    add_redis_arguments(se)


async def _set_eta(args: argparse.Namespace) -> int:
    from staleness import VersionManager

    if args.eta < 0:
        raise CommandError(f"eta={args.eta} must be >= 0 (0 = synchronous RL)")
    url = resolve_url(args)
    client, run = await connect_and_pick_run(url, args.run)
    try:
        vm = await VersionManager.from_client(client, run)
        old = await vm.set_eta(args.eta)
    finally:
        await client.aclose()
    print(f"run {run}: eta {old} -> {args.eta} (takes effect at the next admission)")
    return 0


def run(args: argparse.Namespace) -> int:
    # RedisUnavailable after connecting (Redis went away): one line, exit 1, in sluice.cli.
    try:
        if args.run_command == "set-eta":
            return asyncio.run(_set_eta(args))
        raise CommandError(f"unknown subcommand {args.run_command!r}")
    except CommandError as e:
        print(f"sluice run: {e}", file=sys.stderr)
        return e.code
