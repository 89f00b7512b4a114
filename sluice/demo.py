"""``sluice demo``: one run of the whole pipeline on one machine, supervised, watched, reported.

What it does, in order:

1. Resolves the config: ``DEMO_DEFAULTS`` (the demo's defaults, mirrored in
   ``examples/demo.yaml``) under ``--config FILE`` under ``--set`` under the explicit flags
   (``--eta``, ``--max-steps``, ``--engine``); a bad value exits 2 naming the field.
2. Starts a private ``redis-server`` in a temp dir (or attaches to ``--redis-url``), creates a
   tiny random-init model for the task in ``RUN_DIR/model`` when ``model.path`` is empty, and
   writes the resolved config to ``RUN_DIR/config.yaml`` (a Redis password is not written: the
   children get it through ``$SLUICE_REDIS_PASSWORD``).
3. Starts, as separate supervised processes with that one config file: an inference server
   (``sluice serve --config`` or SGLang), the trainer (``sluice train --config``; restarted with
   ``--resume``) and one rollout worker (``sluice rollout --config --servers URL``). A process
   that dies is restarted up to ``--max-restarts`` times (``sluice.supervisor``).
4. Shows a live view (``sluice.live``; plain lines with ``--no-live``) from
   ``RUN_DIR/metrics.jsonl``, the VersionManager snapshot, the buffer stats and the worker
   metrics in Redis; records ``progress.jsonl`` (gate counters over time) and ``events.jsonl``
   (process starts, deaths, restarts, with pids).
5. Ends when the trainer exits 0 (``trainer.max_steps`` or ``trainer.reward_target`` reached),
   when a process exceeds its restart limit, or on Ctrl-C / SIGTERM. Then it stops the worker
   and trainer (SIGTERM, SIGKILL after a timeout), saves the worker metrics to
   ``workers.json``, stops the server and the private Redis, and writes ``RUN_DIR/report/``.

Exit codes: 0 the trainer finished; 1 a process failed for good or start-up failed; 2 bad
config or flags; 130 interrupted. No process it started outlives it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buffer import keys
from sluice.config import (
    SluiceConfig,
    read_config_file,
    resolve_task_paths,
    validate_config,
)
from sluice.live import Progress, View, fmt, plain_line, sample, worker_metrics
from sluice.runconfig import resolved_config, split_password, write_config_file
from sluice.supervisor import ChildEvent, ChildSpec, Supervisor, describe_exit

if TYPE_CHECKING:
    from procs import RedisServer

log = logging.getLogger("sluice.demo")

# The demo's defaults: reverse 2 digits; mean reward goes from ~0.09 to >= 0.9 in ~120 steps
# (under a minute of training on 2 CPU cores). Measured: with 4 digits the tiny RoPE model
# collapses onto "repeat the last digit" (reward ~0.35, zero-variance groups) at every lr tried;
# 2 digits at lr 1e-3 learns reliably. examples/demo.yaml holds the same values
# (tests/integration/test_demo.py checks).
DEMO_DEFAULTS: dict[str, Any] = {
    "run": {"name": "demo", "dir": "runs/demo", "seed": 0},
    "staleness": {"eta": 2, "batch_groups": 32},
    "model": {"path": "", "layers": 2, "hidden": 64, "heads": 4, "arch": "llama"},
    "task": {"name": "reverse", "options": {"n_digits": 2, "n_train": 80, "n_eval": 20}},
    "inference": {"engine": "auto", "threads": 1},
    "rollout": {
        "n_samples": 8,
        "max_inflight_groups": 32,
        "temperature": 1.0,
        "metrics_interval_s": 1.0,
        "heartbeat_ttl_s": 10.0,
        "log_every": 200,
    },
    "trainer": {
        "lr": 0.001,
        "max_steps": 400,
        "reward_target": 0.9,
        "threads": 1,
        "checkpoint_every": 10,
        "reclaim_idle_ms": 10_000,
        "device": "auto",
        # With --set trainer.lora.rank=R: the output head gets an adapter too. Measured on
        # this task (GRPO in-process, lr 3e-3, 250-300 steps): adapters on the linear layers
        # alone stay at reward ~0.25 at rank 8, 16 and 32 (the random-init head and embeddings
        # are frozen); with lm_head too, rank 8 reaches 0.9 in ~110 steps, as full weights do.
        "lora": {"target_modules": ["all-linear", "lm_head"]},
    },
}


class DemoError(RuntimeError):
    """A problem that stops the demo before or while starting; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class DemoOptions:
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    eta: int | None = None
    max_steps: int | None = None
    run_dir: str | None = None
    redis_url: str | None = None
    engine: str | None = None
    live: bool = True
    max_restarts: int = 3
    stop_timeout: float = 30.0
    server_timeout: float | None = None


# ---------------------------------------------------------------------- config
def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_demo_config(path: str | Path | None, overrides: list[str] | None = None) -> SluiceConfig:
    """``DEMO_DEFAULTS`` under the YAML file ``path`` under the dotted ``overrides``.

    A task section in the file replaces the demo's task options (they belong to one task)."""
    data: dict[str, Any] = copy.deepcopy(DEMO_DEFAULTS)
    if path is None:
        return validate_config(data, overrides, "demo defaults")
    cfg = validate_config(_merge(data, read_config_file(path)), overrides, str(path))
    return resolve_task_paths(cfg, path)


def resolve(opts: DemoOptions) -> SluiceConfig:
    """The demo's config: defaults, file, ``--set``, then the explicit flags."""
    overrides = list(opts.overrides)
    if opts.eta is not None:
        overrides.append(f"staleness.eta={opts.eta}")
    if opts.max_steps is not None:
        overrides.append(f"trainer.max_steps={opts.max_steps}")
    if opts.engine is not None:
        overrides.append(f"inference.engine={opts.engine}")
    return load_demo_config(opts.config, overrides)


# ---------------------------------------------------------------------- children
def server_spec(cfg: SluiceConfig, engine: str, config_path: Path, port: int) -> ChildSpec:
    """The inference server child: the CPU reference server reading the run config, or SGLang
    with the flags ``inference.launch.launch_sglang`` uses (token ids in and out)."""
    from inference.launch import cpu_server_command, sglang_command

    if engine == "cpu":
        args = cpu_server_command(None, port, config_path=config_path)
        env = {"OMP_NUM_THREADS": str(cfg.inference.threads), "PYTHONUNBUFFERED": "1"}
        return ChildSpec("server", args, env=env)

    inf = cfg.inference
    args = sglang_command(
        cfg.model.path,
        port,
        tp_size=inf.tp_size,
        mem_fraction=inf.mem_fraction,
        deterministic=inf.deterministic,
        admin_api_key=inf.admin_api_key,
        extra_args=inf.extra_args,
        lora_rank=cfg.trainer.lora.rank,
        lora_target_modules=cfg.trainer.lora.target_modules,
    )
    env = {"PYTHONUNBUFFERED": "1"}
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(inf.tp_size))
    return ChildSpec("server", args, env=env, stop_timeout=30.0)


def trainer_spec(cfg: SluiceConfig, config_path: Path) -> ChildSpec:
    args = [sys.executable, "-m", "sluice", "train", "--config", str(config_path)]
    threads = str(cfg.trainer.threads or 1)
    return ChildSpec(
        "trainer",
        args,
        restart_args=[*args, "--resume"],
        env={"OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"},
        done_on_success=True,
    )


def worker_spec(config_path: Path, server_url: str) -> ChildSpec:
    args = [sys.executable, "-m", "sluice", "rollout", "--config", str(config_path)]
    args += ["--servers", server_url]
    # Exit 0 is the worker's own end: the trainer finished the run (rollout.on_run_finished).
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return ChildSpec("worker", args, env=env, done_on_success=True)


# ---------------------------------------------------------------------- the run
class Demo:
    """One demo run; ``Demo(opts).run()`` returns the exit code."""

    def __init__(self, opts: DemoOptions) -> None:
        if opts.max_restarts < 0:
            raise DemoError(f"--max-restarts must be >= 0, got {opts.max_restarts}", 2)
        self.opts = opts
        self.cfg = resolve(opts)
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        base = opts.run_dir or f"{self.cfg.run.dir}-{self.stamp}"
        self.run_dir = Path(base).resolve()
        if (self.run_dir / "metrics.jsonl").exists():
            raise DemoError(
                f"run directory {self.run_dir} already holds a run (metrics.jsonl); "
                "pick another --run-dir or remove it",
                2,
            )
        # The private redis-server, when the demo started one (no --redis-url); stopped by run.
        self.redis: RedisServer | None = None
        self.progress = Progress()
        self.stop_reason: str | None = None
        self.interrupted = False
        self.engine = "cpu"
        # The screen while the run is watched; lines go to stdout before and after.
        self._view: View | None = None

    # -- events
    def _event(self, kind: str, name: str, **kw: Any) -> None:
        rec = {"time": time.time(), "kind": kind, "name": name, **kw}
        with (self.run_dir / "events.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def _on_child(self, ev: ChildEvent) -> None:
        self._event(
            ev.kind, ev.name, pid=ev.pid, exit=ev.exit, new_pid=ev.new_pid, restarts=ev.restarts
        )
        line = f"{time.strftime('%H:%M:%S')} {ev.name} (pid {ev.pid}) {ev.exit}: "
        line += {"restarted": "restarted", "finished": "finished", "failed": "FAILED"}[ev.kind]
        line += f" - {ev.message}"
        self.progress.events.append(line)
        self._say(line)

    def _say(self, line: str) -> None:
        if self._view is not None:
            self._view.say(line)
        else:
            print(line, flush=True)

    # -- set-up
    def _model(self, task: Any | None) -> str:
        """``model.path``, or a tiny random-init model for ``task`` in ``RUN_DIR/model`` when it
        is empty (made once: a rerun in the same directory reuses it); ``task`` None: a task
        that reads the model's tokenizer (text), so a model with a char tokenizer."""
        cfg = self.cfg
        if cfg.model.path:
            return cfg.model.path
        from inference.models import init_tiny_model, init_tiny_text_model

        mdir = self.run_dir / "model"
        if task is None:  # a text task: the tokenizer sets the vocabulary
            if not (mdir / "config.json").is_file():
                init_tiny_text_model(
                    mdir,
                    alphabet=cfg.model.alphabet or None,
                    chat_template=cfg.model.chat_template,
                    layers=cfg.model.layers,
                    hidden=cfg.model.hidden,
                    heads=cfg.model.heads,
                    arch=cfg.model.arch,
                    seed=cfg.run.seed,
                )
            self._say(
                f"model: tiny {cfg.model.arch} {cfg.model.layers}x{cfg.model.hidden} with a "
                f"char tokenizer and chat template at {mdir}"
            )
            return str(mdir)
        if not (mdir / "config.json").is_file():
            init_tiny_model(
                mdir,
                vocab=task.vocab_size,
                layers=cfg.model.layers,
                hidden=cfg.model.hidden,
                heads=cfg.model.heads,
                arch=cfg.model.arch,
                seed=cfg.run.seed,
                bos_token_id=task.bos_token_id,
                eos_token_id=task.eos_token_id,
                pad_token_id=task.pad_token_id,
            )
        self._say(
            f"model: tiny {cfg.model.arch} {cfg.model.layers}x{cfg.model.hidden} "
            f"(vocab {task.vocab_size}) at {mdir}"
        )
        return str(mdir)

    def _redis_url(self) -> str:
        """``--redis-url``, or the URL of a private redis-server started here."""
        if self.opts.redis_url is not None:
            return self.opts.redis_url
        from procs import RedisServer

        self.redis = RedisServer().start()
        url = self.redis.url
        self._event("started", "redis", pid=self.redis.pid, url=url)
        self._say(f"redis: private redis-server pid {self.redis.pid} on {url}")
        return url

    def _prepare(self) -> tuple[SluiceConfig, Path, dict[str, str], str]:
        """Engine, task, model and Redis resolved; the run's config written. Returns the
        config, its path, the children's extra environment and the Redis URL (with its
        password)."""
        from inference.launch import EngineUnavailable, choose_engine
        from rollout_workers.tasks import task_options
        from sluice.config import build_task

        cfg = self.cfg
        try:
            self.engine = choose_engine(cfg.inference.engine)
        except EngineUnavailable as e:  # the machine's, not the input's: exit 1
            raise DemoError(str(e), 1) from None
        reads_tokenizer = any(o.name == "tokenizer" for o in task_options(cfg.task.name) or [])
        if reads_tokenizer and not cfg.model.path and not cfg.task.options.get("tokenizer"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.model.path = self._model(None)
        try:
            task = build_task(cfg)
        except (ValueError, FileNotFoundError) as e:
            raise DemoError(f"task: {e}", 2) from None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        model_path = self._model(task)
        url = self._redis_url()
        env: dict[str, str] = {}
        clean_url, password = split_password(url)
        if password is not None:
            from buffer.connection import PASSWORD_ENV

            env[PASSWORD_ENV] = password
        resolved = cfg.model_copy(deep=True)
        resolved.model.path = model_path
        resolved.run.dir = str(self.run_dir)
        resolved.redis.url = clean_url
        resolved = resolved_config(resolved)  # (sluice.runconfig, as train and rollout record)
        resolved.inference.servers = []
        config_path = write_config_file(
            self.run_dir / "config.yaml",
            resolved,
            "written by sluice demo: the one config every process of this run reads",
        )
        self.cfg = resolved
        return resolved, config_path, env, url

    async def _check_redis(self, url: str) -> Any:
        from buffer.connection import RedisAuthFailed, RedisUnavailable, connect, redact_url
        from staleness import list_runs

        try:
            client = await connect(url)
        except (RedisAuthFailed, ValueError) as e:  # wrong credentials, a bad URL: exit 2
            raise DemoError(f"redis: {e}", 2) from None
        except RedisUnavailable as e:  # not reachable: exit 1
            raise DemoError(f"redis: {e}", 1) from None
        if self.opts.redis_url is not None and self.cfg.run.name in await list_runs(client):
            await client.aclose()
            raise DemoError(
                f"run {self.cfg.run.name!r} already exists in Redis at {redact_url(url)}: "
                "give the demo a new name with --set run.name=NAME",
                2,
            )
        return client

    async def _wait_healthy(self, sup: Supervisor, url: str, timeout: float) -> None:
        from procs import http_ok

        deadline = time.monotonic() + timeout
        server = sup.children["server"]
        while time.monotonic() < deadline:
            if self.stop_reason is not None:
                return
            sup.poll()
            if server.state != "running":
                raise DemoError(f"the inference server failed to start; see {server.log_path}")
            if await asyncio.to_thread(http_ok, url + "/health"):
                return
            await asyncio.sleep(0.3)
        raise DemoError(
            f"the inference server was not healthy on {url} within {timeout:.0f}s; see "
            f"{server.log_path}"
        )

    def _start(self, sup: Supervisor, spec: ChildSpec, env: dict[str, str]) -> None:
        spec.env = {**env, **(spec.env or {})}
        c = sup.start(spec)
        self._event("started", spec.name, pid=c.pid, log=str(c.log_path))
        self._say(f"{spec.name}: pid {c.pid}, log {c.log_path}")

    async def _start_children(
        self, sup: Supervisor, cfg: SluiceConfig, config_path: Path, env: dict[str, str]
    ) -> None:
        """The server and the trainer; once the server is healthy, the worker."""
        from procs import free_port

        port = free_port()
        server_url = f"http://127.0.0.1:{port}"
        self._start(sup, server_spec(cfg, self.engine, config_path, port), env)
        self._start(sup, trainer_spec(cfg, config_path), env)
        timeout = self.opts.server_timeout or (600.0 if self.engine == "sglang" else 120.0)
        await self._wait_healthy(sup, server_url, timeout)
        if self.stop_reason is None:
            self._start(sup, worker_spec(config_path, server_url), env)

    def _on_signal(self, sig: int) -> None:
        if self.stop_reason is None:
            self.stop_reason = signal.Signals(sig).name
            self.interrupted = True
            self._say(f"{signal.Signals(sig).name}: stopping every process")

    # -- monitoring
    async def _save_workers(self, client: Any) -> None:
        """Worker metrics and weight-update records from Redis into ``RUN_DIR/workers.json``."""
        out = await worker_metrics(client, self.cfg.run.name)
        for m in out:
            wid = str(m.get("worker", ""))
            ups = await client.lrange(keys.worker_updates(self.cfg.run.name, wid), 0, -1)
            m["updates"] = [json.loads(u) for u in ups]
        snap = self.progress.snap
        (self.run_dir / "workers.json").write_text(
            json.dumps({"workers": out, "gate": snap}, indent=1) + "\n"
        )

    async def _main(self) -> int:
        from buffer import RedisTrajectoryBuffer
        from staleness import VersionManager

        cfg, config_path, env, url = await asyncio.to_thread(self._prepare)
        client = await self._check_redis(url)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        sup = Supervisor(
            self.run_dir / "logs",
            max_restarts=self.opts.max_restarts,
            stop_timeout=self.opts.stop_timeout,
            on_event=self._on_child,
        )
        code = 1
        try:
            await self._start_children(sup, cfg, config_path, env)
            vm = await VersionManager.from_client(
                client,
                cfg.run.name,
                eta=cfg.staleness.eta,
                batch_groups=cfg.staleness.batch_groups,
            )
            buf = RedisTrajectoryBuffer(client, cfg.run.name)
            code = await self._watch(sup, vm, buf, client)
        finally:
            await self._shutdown(sup, client)
        return code

    def _finished(self, sup: Supervisor) -> bool:
        """Sets ``stop_reason`` when the run is over: the trainer finished, or a process
        failed for good."""
        sup.poll()
        if sup.children["trainer"].state == "finished":
            self.stop_reason = "trainer finished"
            return True
        failed = [c.spec.name for c in sup.children.values() if c.state == "failed"]
        if failed:
            self.stop_reason = f"{', '.join(failed)} failed (restart limit)"
            return True
        return False

    async def _watch(self, sup: Supervisor, vm: Any, buf: Any, client: Any) -> int:
        run = self.cfg.run.name
        with View(self.progress, self.cfg, sup, self.engine, live=self.opts.live) as view:
            self._view = view
            try:
                while self.stop_reason is None and not self._finished(sup):
                    await sample(self.progress, self.run_dir, run, client, vm, buf)
                    view.update()
                    await asyncio.sleep(0.5)
                await sample(self.progress, self.run_dir, run, client, vm, buf)
            finally:
                self._view = None
        self._say(plain_line(self.progress, self.cfg))
        if self.stop_reason == "trainer finished":
            return 0
        return 130 if self.interrupted else 1

    async def _shutdown(self, sup: Supervisor, client: Any) -> None:
        self._say(f"stopping ({self.stop_reason or 'start-up failed'})")
        await asyncio.to_thread(sup.stop, ["worker", "trainer"])
        try:
            await self._save_workers(client)
        except Exception as e:  # the report is built without worker metrics then
            log.warning("could not save worker metrics: %s", e)
        await asyncio.to_thread(sup.stop, ["server"])
        for c in sup.children.values():
            self._event("stopped", c.spec.name, pid=c.pid, exit=describe_exit(c.returncode))
        await client.aclose()

    def _report(self) -> None:
        from sluice.report import ReportError, build_report, staleness_line

        try:
            s = build_report(self.run_dir)
        except ReportError as e:
            self._say(f"no report: {e}")
            return
        self._say(
            f"reward {fmt(s['initial_reward'])} -> {fmt(s['final_reward'])} in "
            f"{s['steps']} steps, {fmt(s['wall_s'], 1)}s; staleness {staleness_line(s)}, "
            f"dropped {s['dropped_groups']}, cancelled {s['cancelled_groups']}, waste "
            f"{fmt((s['waste_share'] or 0) * 100, 2)}% of generated tokens, "
            f"{fmt(s['groups_per_s'], 1)} groups/s"
        )
        self._say(f"report: {self.run_dir / 'report' / 'report.md'}")

    def run(self) -> int:
        code = 1
        try:
            code = asyncio.run(self._main())
        except DemoError as e:
            self._say(f"sluice demo: {e}")
            code = e.code
        finally:
            if self.redis is not None:
                pid = self.redis.pid
                self.redis.cleanup()
                self._event("stopped", "redis", pid=pid)
        if (self.run_dir / "metrics.jsonl").is_file():
            self._report()
        return code


def run_demo(opts: DemoOptions) -> int:
    """Run the demo (see the module docstring); returns the exit code."""
    try:
        demo = Demo(opts)
    except DemoError as e:
        print(f"sluice demo: {e}", file=sys.stderr)
        return e.code
    return demo.run()
