"""The ``sluice`` command line. Thin: parses, then imports the heavy parts of one command.

Each command is a module under ``sluice.commands`` (or ``benchmarks``) with
``add_arguments(parser)`` and ``run(args) -> int``; those modules import nothing heavy at top
level, so ``sluice --help`` stays fast.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import signal
import sys

# name -> (module, one-line help). Add a line here to add a command.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("sluice.commands.bench", "throughput benchmarks (buffer, engine, ...)"),
    "serve": ("sluice.commands.serve", "CPU reference inference server (SGLang HTTP subset)"),
    "model": ("sluice.commands.model", "tiny random-init models (sluice model init DIR ...)"),
    "status": ("sluice.commands.status", "a run's version, staleness gate, workers and buffer"),
    "run": ("sluice.commands.run", "change a live run's settings (sluice run set-eta N)"),
    "rollout": ("sluice.commands.rollout", "rollout worker: generate groups into the run's buffer"),
    "train": ("sluice.commands.train", "the trainer: decoupled-PPO steps on the run's buffer"),
    "demo": (
        "sluice.commands.demo",
        "the main job: Redis, server, worker, trainer, live view, report",
    ),
    "config": ("sluice.commands.config", "show a run config resolved, with defaults and help"),
    "report": ("sluice.commands.report", "rebuild RUN_DIR/report/ from RUN_DIR/metrics.jsonl"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice",
        description="Fully asynchronous RL post-training on a Redis trajectory buffer.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A process that hangs can be asked where: SIGUSR1 writes every thread's Python stack to
    # the process's stderr (the fault suite asks before it SIGKILLs a process that ignored
    # SIGTERM). The real stderr: sys.stderr may be a stream without a file descriptor.
    if sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    mod = importlib.import_module(args._module)
    from sluice.config import add_module_dirs, load_config
    from sluice.errors import one_line

    try:
        if hasattr(args, "config") and hasattr(args, "overrides"):
            # Every command that reads a run config rejects a bad one here, before it starts;
            # modules it names (a reward's module:function) are found beside it.
            load_config(args.config, args.overrides)
            add_module_dirs(args.config)
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # A known error is one line and its exit code (sluice.errors); anything else is a bug
        # and keeps its traceback.
        known = _known(e)
        if known is None:
            raise
        code, err = known
        print(f"sluice {args.command}: {one_line(err)}", file=sys.stderr)
        return code


def _known(e: BaseException) -> tuple[int, BaseException] | None:
    """``(exit code, error)`` for ``e`` or, in an exception group, its first known error."""
    from sluice.errors import exit_code

    code = exit_code(e)
    if code is not None:
        return code, e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = _known(sub)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    raise SystemExit(main())
