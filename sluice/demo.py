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
4. Shows a live view (or plain lines with ``--no-live``) from ``RUN_DIR/metrics.jsonl``, the
   VersionManager snapshot, the buffer stats and the worker metrics in Redis; records
   ``progress.jsonl`` (gate counters over time) and ``events.jsonl`` (process starts, deaths,
   restarts, with pids).
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
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from buffer import keys
from sluice.config import (
    SluiceConfig,
    dump_config,
    read_config_file,
    validate_config,
)
from sluice.supervisor import ChildEvent, ChildSpec, Supervisor, describe_exit

log = logging.getLogger("sluice.demo")

# The demo's defaults: reverse 2 digits; mean reward goes from ~0.09 to >= 0.9 in ~120 steps
# (under a minute of training on 2 CPU cores). Measured: with 4 digits the tiny RoPE model
# collapses onto "repeat the last digit" (reward ~0.35, zero-variance groups) at every lr tried;
# 2 digits at lr 1e-3 learns reliably. examples/demo.yaml holds the same values
# (tests/test_demo.py checks).
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
    },
}

CHILD_ORDER = ("server", "trainer", "worker")


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
    return validate_config(_merge(data, read_config_file(path)), overrides, str(path))


def split_password(url: str) -> tuple[str, str | None]:
    """``url`` without its password, and the password (None if it had none)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    netloc = f"{user}@{host}" if user else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), (
        parts.password
    )


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
    py = sys.executable
    if engine == "cpu":
        args = [py, "-m", "sluice", "serve", "--config", str(config_path)]
        args += ["--host", "127.0.0.1", "--port", str(port)]
        env = {"OMP_NUM_THREADS": str(cfg.inference.threads), "PYTHONUNBUFFERED": "1"}
        return ChildSpec("server", args, env=env)
    from inference.launch import sglang_command

    inf = cfg.inference
    args = sglang_command(
        cfg.model.path,
        port,
        tp_size=inf.tp_size,
        mem_fraction=inf.mem_fraction,
        deterministic=inf.deterministic,
        admin_api_key=inf.admin_api_key,
        extra_args=inf.extra_args,
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
    return ChildSpec("worker", args, env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


# ---------------------------------------------------------------------- progress
@dataclass
class Progress:
    """What the live view shows; updated from the run's files and Redis."""

    started: float = field(default_factory=time.monotonic)
    rows: list[dict[str, Any]] = field(default_factory=list)
    snap: dict[str, Any] | None = None
    buffer: dict[str, int] | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=6))
    gen_window: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=20))
    _offset: int = 0
    _partial: str = ""

    def read_metrics(self, path: Path) -> list[dict[str, Any]]:
        """Rows appended to ``metrics.jsonl`` since the last call (a torn last line waits)."""
        try:
            with path.open() as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return []
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                new.append(obj)
        self.rows.extend(new)
        return new

    def last(self, key: str) -> Any:
        for r in reversed(self.rows):
            if r.get(key) is not None:
                return r[key]
        return None

    def gen_rate(self) -> float | None:
        if len(self.gen_window) < 2:
            return None
        (t0, n0), (t1, n1) = self.gen_window[0], self.gen_window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def train_rate(self, window: int = 5) -> float | None:
        pts = [r for r in self.rows if isinstance(r.get("time"), int | float)][-(window + 1) :]
        if len(pts) < 2 or pts[-1]["time"] <= pts[0]["time"]:
            return None
        return sum(r.get("groups", 0) or 0 for r in pts[1:]) / (pts[-1]["time"] - pts[0]["time"])

    def idle_s(self) -> float:
        seen: dict[Any, float] = {}
        for r in self.rows:
            seen[r.get("step")] = float(r.get("idle_s") or 0.0)
        return sum(seen.values())

    def max_staleness(self) -> int | None:
        vals = [r["staleness_max"] for r in self.rows if isinstance(r.get("staleness_max"), int)]
        return max(vals) if vals else None

    def dropped(self) -> int:
        return int(self.last("dropped_total") or 0)

    def gate_blocked_s(self) -> float:
        return sum(float(w.get("gate_blocked_s") or 0.0) for w in self.workers)

    def server_util(self) -> float | None:
        utils = [
            float(s.get("utilisation"))
            for w in self.workers
            for s in (w.get("servers") or [])
            if isinstance(s, dict) and isinstance(s.get("utilisation"), int | float)
        ]
        return max(utils) if utils else None


def _f(x: Any, nd: int = 3, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def _queued(buf: dict[str, int]) -> int | None:
    """Groups in the stream no trainer has read yet."""
    if "length" not in buf or "pending" not in buf:
        return None
    return max(0, buf["length"] - buf["pending"])


def plain_line(p: Progress, cfg: SluiceConfig) -> str:
    """One log line of progress (``--no-live``)."""
    snap = p.snap or {}
    buf = p.buffer or {}
    elapsed = time.monotonic() - p.started
    first = p.rows[0].get("reward_mean") if p.rows else None
    return (
        f"[{elapsed:6.1f}s] step {_f(p.last('step'))}/{cfg.trainer.max_steps} "
        f"v{_f(snap.get('version'))} reward {_f(p.last('reward_mean'))} (start {_f(first)}) "
        f"staleness max {_f(p.max_staleness())} (eta {snap.get('eta', cfg.staleness.eta)}) "
        f"dropped {p.dropped()} | gen {_f(p.gen_rate(), 1)} g/s train {_f(p.train_rate(), 1)} g/s"
        f" | buffer {_f(_queued(buf))} queued, {_f(buf.get('pending'))} unacked | waiting: "
        f"trainer {p.idle_s():.1f}s, worker gate {p.gate_blocked_s():.1f}s"
    )


def render(p: Progress, cfg: SluiceConfig, sup: Supervisor, engine: str) -> Any:
    """The rich live view."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    snap = p.snap or {}
    buf = p.buffer or {}
    elapsed = time.monotonic() - p.started
    first = p.rows[0].get("reward_mean") if p.rows else None
    target = cfg.trainer.reward_target
    t = Table(
        title=f"sluice demo: run {cfg.run.name}, task {cfg.task.name}, engine {engine}, "
        f"{elapsed:.0f}s",
        show_header=False,
        title_justify="left",
    )
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row(
        "step / version",
        f"{_f(p.last('step'))} / {cfg.trainer.max_steps}   v{_f(snap.get('version'))}",
    )
    t.add_row(
        "reward",
        f"[bold]{_f(p.last('reward_mean'))}[/bold] (first step {_f(first)}, target {_f(target)})",
    )
    t.add_row(
        "staleness",
        f"last step max {_f(p.last('staleness_max'))}, run max {_f(p.max_staleness())}, "
        f"eta {snap.get('eta', cfg.staleness.eta)}, dropped {p.dropped()}",
    )
    t.add_row(
        "throughput",
        f"generated {_f(p.gen_rate(), 1)} groups/s, trained {_f(p.train_rate(), 1)} groups/s",
    )
    t.add_row(
        "buffer",
        f"{_f(_queued(buf))} groups queued, {_f(buf.get('pending'))} read by the trainer (acked "
        f"at its next checkpoint), dead-letter {_f(buf.get('dead_letter'))}",
    )
    if snap:
        t.add_row(
            "gate",
            f"admitted {snap['admitted']}, finished {snap['finished']}, rejected "
            f"{snap['rejected']}, in flight {snap['inflight']}, capacity {snap['capacity']}",
        )
    util = p.server_util()
    t.add_row(
        "waiting",
        f"trainer for data {p.idle_s():.1f}s, worker at the gate {p.gate_blocked_s():.1f}s, "
        f"server busy {_f(util * 100 if util is not None else None, 0, '%')}",
    )
    procs = Table(show_header=True, title="processes", title_justify="left")
    for col in ("name", "pid", "state", "restarts", "log"):
        procs.add_column(col)
    for name in CHILD_ORDER:
        c = sup.children.get(name)
        if c is not None:
            procs.add_row(name, str(c.pid), c.state, str(c.restarts), str(c.log_path))
    parts: list[Any] = [t, procs]
    if p.events:
        parts.append("\n".join(escape(e) for e in p.events))
    return Group(*parts)


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
        self.redis: Any = None
        self.sup: Supervisor | None = None
        self.progress = Progress()
        self.stop_reason: str | None = None
        self.interrupted = False
        self.engine = "cpu"
        self._console: Any = None

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
        if self._console is not None:
            self._console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    # -- set-up
    def _prepare(self) -> tuple[SluiceConfig, Path, dict[str, str]]:
        from inference.launch import EngineUnavailable, choose_engine
        from rollout_workers.tasks import get_task

        cfg = self.cfg
        try:
            self.engine = choose_engine(cfg.inference.engine)
        except EngineUnavailable as e:
            raise DemoError(str(e), 2) from None
        try:
            task = get_task(cfg.task.name, **cfg.task.options)
        except (ValueError, FileNotFoundError) as e:
            raise DemoError(f"task: {e}", 2) from None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        model_path = cfg.model.path
        if not model_path:
            from inference.models import init_tiny_model

            mdir = self.run_dir / "model"
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
            model_path = str(mdir)
            self._say(
                f"model: tiny {cfg.model.arch} {cfg.model.layers}x{cfg.model.hidden} "
                f"(vocab {task.vocab_size}) at {mdir}"
            )
        url = self.opts.redis_url
        env: dict[str, str] = {}
        if url is None:
            from procs import RedisServer

            self.redis = RedisServer().start()
            url = self.redis.url
            self._event("started", "redis", pid=self.redis.pid, url=url)
            self._say(f"redis: private redis-server pid {self.redis.pid} on {url}")
        clean_url, password = split_password(url)
        if password is not None:
            from buffer.connection import PASSWORD_ENV

            env[PASSWORD_ENV] = password
        resolved = cfg.model_copy(deep=True)
        resolved.model.path = str(Path(model_path).resolve())
        resolved.run.dir = str(self.run_dir)
        resolved.redis.url = clean_url
        resolved.inference.servers = []
        config_path = self.run_dir / "config.yaml"
        config_path.write_text(
            "# written by sluice demo: the one config every process of this run reads\n"
            + dump_config(resolved)
        )
        self.cfg = resolved
        return resolved, config_path, env

    async def _check_redis(self, url: str) -> Any:
        from buffer.connection import RedisUnavailable, connect, redact_url
        from staleness import list_runs

        try:
            client = await connect(url)
        except (RedisUnavailable, ValueError) as e:
            raise DemoError(f"redis: {e}", 2) from None
        if self.opts.redis_url is not None and self.cfg.run.name in await list_runs(client):
            await client.aclose()
            raise DemoError(
                f"run {self.cfg.run.name!r} already exists in Redis at {redact_url(url)}: "
                "give the demo a new name with --set run.name=NAME",
                2,
            )
        return client

    async def _wait_healthy(self, url: str, timeout: float) -> None:
        import urllib.error
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert self.sup is not None
        deadline = time.monotonic() + timeout
        server = self.sup.children["server"]

        def ok() -> bool:
            try:
                with opener.open(url + "/health", timeout=2.0) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError, ValueError):
                return False

        while time.monotonic() < deadline:
            if self.stop_reason is not None:
                return
            self.sup.poll()
            if server.state != "running":
                raise DemoError(f"the inference server failed to start; see {server.log_path}")
            if await asyncio.to_thread(ok):
                return
            await asyncio.sleep(0.3)
        raise DemoError(
            f"the inference server was not healthy on {url} within {timeout:.0f}s; see "
            f"{server.log_path}"
        )

    # -- monitoring
    async def _sample(self, client: Any, vm: Any, buf: Any) -> None:

        p = self.progress
        p.read_metrics(self.run_dir / "metrics.jsonl")
        try:
            snap = (await vm.snapshot()).as_dict()
        except Exception as e:  # a snapshot is informative only; say why it is missing
            log.debug("snapshot failed: %s", e)
            return
        p.snap = snap
        p.buffer = (await buf.stats()).as_dict()
        now = time.time()
        p.gen_window.append((now, snap["finished"] + snap["rejected"]))
        workers = []
        async for k in client.scan_iter(match=keys.worker_metrics_glob(self.cfg.run.name)):
            raw = await client.hgetall(k)
            workers.append({kk.decode(): _maybe_json(v.decode()) for kk, v in raw.items()})
        p.workers = workers
        row = {
            "time": now,
            **{
                k: snap[k]
                for k in ("version", "admitted", "finished", "rejected", "inflight", "capacity")
            },
            "buffer_length": p.buffer["length"],
            "buffer_pending": p.buffer["pending"],
            "gate_blocked_s": p.gate_blocked_s(),
        }
        with (self.run_dir / "progress.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    async def _save_workers(self, client: Any) -> None:
        """Worker metrics and weight-update records from Redis into ``RUN_DIR/workers.json``."""

        out = []
        async for k in client.scan_iter(match=keys.worker_metrics_glob(self.cfg.run.name)):
            raw = await client.hgetall(k)
            m = {kk.decode(): _maybe_json(v.decode()) for kk, v in raw.items()}
            wid = str(m.get("worker", ""))
            ups = await client.lrange(keys.worker_updates(self.cfg.run.name, wid), 0, -1)
            m["updates"] = [json.loads(u) for u in ups]
            out.append(m)
        snap = self.progress.snap
        (self.run_dir / "workers.json").write_text(
            json.dumps({"workers": out, "gate": snap}, indent=1) + "\n"
        )

    async def _main(self) -> int:
        from buffer import RedisTrajectoryBuffer
        from staleness import VersionManager

        cfg, config_path, env = await asyncio.to_thread(self._prepare)
        url = self.opts.redis_url or self.redis.url
        client = await self._check_redis(url)
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            if self.stop_reason is None:
                self.stop_reason = signal.Signals(sig).name
                self.interrupted = True
                self._say(f"{signal.Signals(sig).name}: stopping every process")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        self.sup = sup = Supervisor(
            self.run_dir / "logs",
            max_restarts=self.opts.max_restarts,
            stop_timeout=self.opts.stop_timeout,
            on_event=self._on_child,
        )
        code = 1
        try:
            from procs import free_port

            port = free_port()
            server_url = f"http://127.0.0.1:{port}"
            for spec in (
                server_spec(cfg, self.engine, config_path, port),
                trainer_spec(cfg, config_path),
            ):
                spec.env = {**env, **(spec.env or {})}
                c = sup.start(spec)
                self._event("started", spec.name, pid=c.pid, log=str(c.log_path))
                self._say(f"{spec.name}: pid {c.pid}, log {c.log_path}")
            timeout = self.opts.server_timeout or (600.0 if self.engine == "sglang" else 120.0)
            await self._wait_healthy(server_url, timeout)
            if self.stop_reason is None:
                spec = worker_spec(config_path, server_url)
                spec.env = {**env, **(spec.env or {})}
                c = sup.start(spec)
                self._event("started", "worker", pid=c.pid, log=str(c.log_path))
                self._say(f"worker: pid {c.pid}, log {c.log_path}")
            vm = await VersionManager.from_client(
                client,
                cfg.run.name,
                eta=cfg.staleness.eta,
                batch_groups=cfg.staleness.batch_groups,
            )
            buf = RedisTrajectoryBuffer(client, cfg.run.name)
            code = await self._watch(vm, buf, client)
        finally:
            await self._shutdown(client)
        return code

    async def _watch(self, vm: Any, buf: Any, client: Any) -> int:
        assert self.sup is not None
        sup = self.sup
        live = None
        if self.opts.live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            live = Live(
                render(self.progress, self.cfg, sup, self.engine),
                console=self._console,
                auto_refresh=False,
                transient=False,
            )
            live.start()
        last_line = 0.0
        last_step = None
        try:
            while self.stop_reason is None:
                sup.poll()
                trainer = sup.children["trainer"]
                if trainer.state == "finished":
                    self.stop_reason = "trainer finished"
                    break
                failed = [c.spec.name for c in sup.children.values() if c.state == "failed"]
                if failed:
                    self.stop_reason = f"{', '.join(failed)} failed (restart limit)"
                    break
                await self._sample(client, vm, buf)
                if live is not None:
                    live.update(render(self.progress, self.cfg, sup, self.engine), refresh=True)
                else:
                    step = self.progress.last("step")
                    now = time.monotonic()
                    if (step != last_step and now - last_line >= 2.0) or now - last_line >= 10.0:
                        self._say(plain_line(self.progress, self.cfg))
                        last_line, last_step = now, step
                await asyncio.sleep(0.5)
            await self._sample(client, vm, buf)
        finally:
            if live is not None:
                live.update(render(self.progress, self.cfg, sup, self.engine), refresh=True)
                live.stop()
            self._console = None
        self._say(plain_line(self.progress, self.cfg))
        if self.stop_reason == "trainer finished":
            return 0
        return 130 if self.interrupted else 1

    async def _shutdown(self, client: Any) -> None:
        sup = self.sup
        if sup is not None:
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
            from sluice.report import ReportError, build_report

            try:
                s = build_report(self.run_dir)
            except ReportError as e:
                self._say(f"no report: {e}")
            else:
                self._say(
                    f"reward {_f(s['initial_reward'])} -> {_f(s['final_reward'])} in "
                    f"{s['steps']} steps, {_f(s['wall_s'], 1)}s; max staleness "
                    f"{s['max_staleness']} (eta {s['eta']}), dropped {s['dropped_groups']}, "
                    f"{_f(s['groups_per_s'], 1)} groups/s"
                )
                self._say(f"report: {self.run_dir / 'report' / 'report.md'}")
        return code


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def run_demo(opts: DemoOptions) -> int:
    """Run the demo (see the module docstring); returns the exit code."""
    try:
        demo = Demo(opts)
    except DemoError as e:
        print(f"sluice demo: {e}", file=sys.stderr)
        return e.code
    return demo.run()
