"""Run a rollout worker: admit groups through the run's staleness gate, generate them on
inference servers, score them and push them to the run's Redis buffer, across weight updates.

Start as many as you like, on one machine or many, against the same Redis and run name: they
share the gate, the prompt cursor and the weight events. Servers come from --servers (or
inference.servers), else --launch N starts N of them (engine auto|sglang|cpu); the worker
waits up to rollout.server_wait_s for one to answer. SIGTERM/SIGINT stops cleanly (in-flight
groups hand their slots back, exit 0 within 30 s); so does the end of the run, when the trainer
finishes (rollout.on_run_finished: exit, or wait for the run to start again).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference.launch import ServerHandle
    from rollout_workers.pool import Server, ServerProcess
    from rollout_workers.worker import RolloutWorker
    from sluice.config import SluiceConfig

log = logging.getLogger("sluice.rollout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sluice.config import add_config_arguments

    add_config_arguments(p, "rollout.n_samples=4")
    p.add_argument(
        "--servers", default=None, help="comma-separated inference server URLs (running already)"
    )
    p.add_argument(
        "--launch", type=int, default=None, help="launch N inference servers (when no --servers)"
    )
    p.add_argument(
        "--engine", choices=("auto", "sglang", "cpu"), default=None, help="engine for --launch"
    )
    p.add_argument("--worker-id", default=None, help="worker id (default HOSTNAME-PID)")
    p.add_argument(
        "--max-groups",
        type=int,
        default=None,
        help="exit 0 after pushing this many groups (tests, benchmarks)",
    )
    p.add_argument(
        "--follow-weights",
        action="store_true",
        help="with --max-groups: after the last group keep loading new weight versions until "
        "stopped or the run finishes (rollout.after_max_groups=follow)",
    )


def _stop_while_starting(signum: int, frame: object) -> None:
    # Nothing is admitted or leased before the worker runs: a stop now is a clean exit.
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    import signal

    # SIGTERM while importing or launching servers exits 0 like a stop of a running worker
    # (tests/faults/test_bad_inputs.py::test_rollout_sigterm_while_starting_exits_0).
    signal.signal(signal.SIGTERM, _stop_while_starting)
    from sluice.config import load_config
    from sluice.errors import InputError

    overrides = list(args.overrides)
    if args.servers is not None:
        urls = [u.strip() for u in args.servers.split(",") if u.strip()]
        if not urls:
            raise InputError("--servers is empty: give URL,URL,...")
        overrides.append("inference.servers=[" + ",".join(f'"{u}"' for u in urls) + "]")
    if args.launch is not None:
        overrides.append(f"inference.launch={args.launch}")
    if args.engine is not None:
        overrides.append(f"inference.engine={args.engine}")
    if args.max_groups is not None and args.max_groups < 1:
        raise InputError(f"--max-groups must be >= 1, got {args.max_groups}")
    if args.follow_weights:
        if args.max_groups is None:
            raise InputError("--follow-weights needs --max-groups N")
        overrides.append("rollout.after_max_groups=follow")
    cfg = load_config(args.config, overrides)  # errors: one line and exit 2 (sluice.errors)
    if not cfg.model.path:
        raise InputError(
            "model.path is empty; the worker needs the version-0 weights. Create "
            f"them with `sluice model init DIR --task {cfg.task.name}` and pass "
            "--set model.path=DIR (or set model.path in the config)"
        )
    from inference.models import ModelDirError, check_model_dir, resolve_model_dir

    try:
        check_model_dir(cfg.model.path)
    except ModelDirError as e:
        raise InputError(f"model.path: {e}") from None
    # A checkpoint (RUN_DIR/checkpoints/step-N) stands for its model/ dir: servers load that.
    cfg.model.path = str(resolve_model_dir(cfg.model.path))
    from rollout_workers.rewards import resolve_reward_fn
    from sluice.config import build_task

    # A bad task (a malformed dataset row: FILE:ROW), reward module or engine fails here,
    # before any launch: TaskError exits 2, EngineUnavailable 1 (sluice.errors).
    resolve_reward_fn(build_task(cfg), cfg.rollout.reward_fn)
    if not cfg.inference.servers and cfg.inference.launch < 1:
        raise InputError("no servers: give --servers URL,... or --launch N")
    if not cfg.inference.servers:
        from inference.launch import choose_engine

        choose_engine(cfg.inference.engine)

    import uvloop

    from rollout_workers.pool import NoServer

    # RedisUnavailable (URL redacted), RunSettingsMismatch: one line in sluice.cli.
    try:
        return int(uvloop.run(_main(cfg, args)))
    except NoServer as e:  # one line
        raise SystemExit(f"sluice rollout: {e}") from None


async def open_worker(
    cfg: SluiceConfig,
    servers: list[Server],
    *,
    worker_id: str | None = None,
    max_groups: int | None = None,
) -> RolloutWorker:
    """A connected worker for the run ``cfg`` describes, over ``servers``: its own ``rollout``
    section, the task, and what it needs of the other sections (``RunInfo``)."""
    from rollout_workers.parts import RunInfo
    from rollout_workers.worker import RolloutWorker
    from sluice.config import build_task

    run = RunInfo(
        name=cfg.run.name,
        seed=cfg.run.seed,
        redis_url=cfg.redis.url,
        model_path=cfg.model.path,
        eta=cfg.staleness.eta,
        batch_groups=cfg.staleness.batch_groups,
        distributed=cfg.trainer.weight_sync == "distributed",
        ipc=cfg.trainer.weight_sync == "ipc",
        tp_size=cfg.inference.tp_size,
    )
    task = build_task(cfg)
    return await RolloutWorker.open(
        servers, cfg.rollout, task, run, worker_id=worker_id, max_groups=max_groups
    )


async def record_config(cfg: SluiceConfig, worker_id: str) -> None:
    """Record the worker's resolved config in the run's Redis (``sluice.runconfig``:
    ``keys.worker_config``)."""
    from buffer.connection import connect
    from sluice.runconfig import record_worker_config

    client = await connect(cfg.redis.url)
    try:
        key = await record_worker_config(client, cfg, worker_id)
    finally:
        await client.aclose()
    log.info("worker %s: config recorded in Redis (%s)", worker_id, key)


def _launcher(cfg: SluiceConfig) -> Callable[[int | None, int], ServerHandle]:
    """``launch(port, gpu)`` starts one server of ``cfg.inference`` (blocking)."""
    from inference.launch import choose_engine, launch_server

    inf = cfg.inference
    engine = choose_engine(inf.engine)
    kw: dict[str, Any] = {"admin_api_key": inf.admin_api_key}
    lora = cfg.trainer.lora
    if lora.enabled:  # the trainer publishes adapters: the servers must serve them
        kw.update(lora_rank=lora.rank, lora_target_modules=list(lora.target_modules))
    if engine == "cpu":
        kw["threads"] = inf.threads
        kw["extra_args"] = list(inf.extra_args)
    else:
        kw.update(
            mem_fraction=inf.mem_fraction,
            tp_size=inf.tp_size,
            deterministic=inf.deterministic,
            extra_args=list(inf.extra_args),
        )

    def launch(port: int | None, gpu: int) -> ServerHandle:
        extra = {"gpu": gpu} if engine == "sglang" else {}
        return launch_server(engine, cfg.model.path, port, **kw, **extra)

    return launch


async def _main(cfg: SluiceConfig, args: argparse.Namespace) -> int:
    import asyncio
    import functools
    import signal

    from inference.launch import model_vocab_size
    from rollout_workers.pool import make_servers
    from sluice.commands import log_task_stacks_on_sigusr2

    loop = asyncio.get_running_loop()
    log_task_stacks_on_sigusr2()
    early_stop = asyncio.Event()  # SIGTERM before the worker exists: stop as soon as it does
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, early_stop.set)
    inf = cfg.inference
    handles: list[ServerHandle] = []
    restarts: list[Callable[[], ServerHandle]] = []
    servers: list[Server] = []
    try:
        if inf.servers:
            urls = list(inf.servers)
        else:
            launch = _launcher(cfg)
            for i in range(inf.launch):
                h = await asyncio.to_thread(launch, None, i * inf.tp_size)
                handles.append(h)
                restarts.append(functools.partial(launch, h.port, i * inf.tp_size))
            urls = [h.url for h in handles]
        servers = make_servers(
            urls,
            handles=handles or None,
            restarts=restarts or None,
            admin_api_key=inf.admin_api_key,
            vocab_size=model_vocab_size(cfg.model.path),
        )
        worker = await open_worker(
            cfg, servers, worker_id=args.worker_id, max_groups=args.max_groups
        )
        await record_config(cfg, worker.worker_id)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        if early_stop.is_set():
            worker.request_stop()
        pushed = await worker.run()
        log.info("worker %s exits: %d groups pushed", worker.worker_id, pushed)
        return 0
    finally:
        # Stop what we launched, by pid: the current handle of each server (a relaunched one
        # replaced its first handle), and any launched before the worker existed.
        current: list[ServerProcess] = [s.handle for s in servers if s.handle is not None]
        first: list[ServerProcess] = [h for h in handles if all(h is not c for c in current)]
        for proc in current + first:
            await asyncio.to_thread(proc.stop, 10.0)
