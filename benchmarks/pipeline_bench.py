"""Pipeline throughput: async RL against its own ceilings and against synchronous RL (eta = 0).

One invocation, one model, one task, one machine. With ``--engine cpu`` (default) placement is
disaggregated, as on a GPU cluster where inference and training own their devices: the CPU
server and the rollout worker (and Redis) are pinned to the *inference* cores, the trainer to
the *training* cores (``taskset`` / ``sched_setaffinity``; one torch thread per process). On 2
cores: one each. With ``--engine sglang`` one SGLang server (``--mem-fraction``) and the
trainer (CUDA, bf16 autocast) share one GPU — colocated, time-sliced by the driver — and the
server is started once and reused by every run (each run's worker loads the initial weights
into it); server idle is then the worker's view: time with no request in flight.

Measured, each over a steady-state window that skips the first ``warmup`` train steps (or the
first ``batch_groups`` generated groups):

* **generation ceiling** ``g``: one worker with the gate open (eta 1000) and no trainer,
  groups/s over ``steps * batch_groups`` groups (polling the gate's ``finished`` counter);
* **training ceiling** ``t``: the trainer on the buffer pre-filled by that run (the same
  groups; eta 1000 so none is dropped), trained groups/s from ``metrics.jsonl`` row times;
* **pipeline runs** at each eta of ``--etas``: trainer + worker + server on a fresh private
  ``redis-server`` (fresh ``used_memory_peak``) and (CPU) a fresh server, ``--steps`` steps.
  Per run: trained groups/s and output tokens/s, trainer idle (``idle_s`` / window), server
  idle (``1 - d busy_s / d uptime_s`` of the CPU server's ``/model_info`` over the window),
  mean/max staleness (the trainer's histograms), groups dropped, final reward (mean of the last
  fifth of the steps), Redis ``used_memory_peak`` beside the bound
  ``(eta + 1 + checkpoint_every) * batch_groups * bytes_per_group + overhead``
  (``bytes_per_group``: the largest ``MEMORY USAGE`` of the stream per entry seen while
  sampling; ``overhead``: the empty server's
  ``used_memory`` plus every non-stream key of the run at the end). The trainer acks with
  its checkpoints (``--checkpoint-every``, default every step): ``eta + 1`` batches admitted
  ahead of the trainer, up to ``checkpoint_every`` read and not yet acked.
* **buffer + gate share** of trainer wall time: on the training ceiling (the read never waits
  there) ``(idle_s + buffer_s) / window``; in pipeline runs ``buffer_s / window`` (the blocking
  read's time is inseparable from waiting there, so it is left out).

The ceilings are measured before and after the runs and averaged (the machine may be shared).
Throughput of a pipeline run is *sustained*: trained groups in the window plus the change of
the backlog (pushed, not yet read), so draining the start-up backlog is not counted.
``efficiency = best async groups/s / min(g, t)`` (best over eta >= 1);
``speedup_vs_sync = best async / eta 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer import keys

# Sizes picked so that, on one core each, generating a group and training on it take
# comparable time (see the module docstring of each run's output for the measured ceilings).
WORKLOADS: dict[str, dict[str, Any]] = {
    "reverse": {
        "task": "reverse",
        "options": {"n_digits": 4},
        "model": {"layers": 3, "hidden": 192},
        "n_samples": 8,
        "batch_groups": 8,
        "max_new_tokens": None,
        "max_inflight_groups": 2,
        "steps": 40,
        "quick_steps": 6,
    },
    "long-tail": {
        "task": "long-tail",
        "options": {"median": 16, "sigma": 1.0, "min_len": 4, "max_len": 128},
        "model": {"layers": 3, "hidden": 192},
        "n_samples": 8,
        "batch_groups": 4,
        "max_new_tokens": None,
        "max_inflight_groups": 4,
        "steps": 30,
        "quick_steps": 5,
    },
    # For one GPU shared by SGLang and the trainer (--engine sglang): a ~100M-parameter Qwen2
    # shape (head_dim 64, GQA 4:1) on long outputs, so that generating a batch and training on
    # it both take real GPU time.
    "long-tail-gpu": {
        "task": "long-tail",
        "options": {"median": 64, "sigma": 1.0, "min_len": 8, "max_len": 512},
        "model": {
            "arch": "qwen2",
            "layers": 9,
            "hidden": 1024,
            "heads": 16,
            "kv_heads": 4,
            "intermediate": 2816,
        },
        "n_samples": 8,
        "batch_groups": 16,
        "max_new_tokens": None,
        "max_inflight_groups": 32,
        "steps": 16,
        "quick_steps": 5,
        # A random-init 100M model at lr 1e-3 collapses within 3 steps into 512-token outputs
        # that never stop (groups cost ~15x more than in the ceiling runs); at 1e-5 outputs
        # still grew 3-4x over 16 steps on the H100 (README, "On a GPU").
        "trainer": {"lr": 1e-5},
    },
}
GATE_OPEN_ETA = 1000  # the config's upper bound: the ceilings never wait on the gate
POLL_S = 0.1
MEM_FIELDS = (
    "used_memory",
    "used_memory_dataset",
    "used_memory_overhead",
    "mem_clients_normal",
    "used_memory_vm_eval",
    "used_memory_scripts",
    "mem_replication_backlog",
    "used_memory_startup",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default=None,
        help="task mix and model (default: reverse on cpu, long-tail-gpu on sglang)",
    )
    p.add_argument(
        "--etas", type=int, nargs="+", default=None, help="staleness limits (default 0 1 2 4 8)"
    )
    p.add_argument("--steps", type=int, default=None, help="train steps per run (workload default)")
    p.add_argument("--batch-groups", type=int, default=None, help="groups per train step")
    p.add_argument("--n-samples", type=int, default=None, help="samples per group")
    p.add_argument(
        "--inflight", type=int, default=None, help="worker max_inflight_groups (workload default)"
    )
    p.add_argument("--layers", type=int, default=None, help="model layers (workload default)")
    p.add_argument("--hidden", type=int, default=None, help="model hidden size (workload default)")
    p.add_argument(
        "--engine",
        choices=("cpu", "sglang"),
        default="cpu",
        help="cpu: a CPU reference server per run, core-pinned (default); sglang: one SGLang "
        "server on the GPU for the whole invocation, the trainer on the same GPU",
    )
    p.add_argument(
        "--mem-fraction", type=float, default=0.3, help="SGLang --mem-fraction-static (0.3)"
    )
    p.add_argument("--sglang-args", default="", help="extra SGLang launch arguments, one string")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="trainer checkpoint (and so ack) interval in steps (default 1); the Redis bound "
        "is (eta + 1 + this) batches",
    )
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run: etas 0 2, few steps")
    p.add_argument(
        "--ceilings-twice",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the ceilings before and after the runs, use the mean (default: on, "
        "off with --quick)",
    )
    p.add_argument("--json", default=None, help="write results JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of throughput and idle vs eta here")
    p.add_argument("--workdir", default=None, help="run directories and logs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (logs, metrics)")
    p.add_argument(
        "--run-timeout", type=float, default=300.0, help="seconds one run may take (default 300)"
    )


# ------------------------------------------------------------------ placement and processes


@dataclass(frozen=True)
class Placement:
    inference: tuple[int, ...]
    training: tuple[int, ...]

    @classmethod
    def split(cls) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(tuple(cpus), tuple(cpus))
        half = len(cpus) // 2
        return cls(tuple(cpus[:half]), tuple(cpus[half:]))

    @property
    def disjoint(self) -> bool:
        return not set(self.inference) & set(self.training)

    def describe(self) -> dict[str, Any]:
        return {
            "inference_cpus": list(self.inference),
            "training_cpus": list(self.training),
            "redis": "pinned to the inference cpus",
            "disjoint": self.disjoint,
            "torch_threads": {"server": len(self.inference), "trainer": len(self.training)},
        }


def _pin_all_threads(pid: int, cpus: tuple[int, ...]) -> None:
    """Pin every thread of ``pid`` (Redis starts its background threads before we can)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


@dataclass
class Procs:
    """Every process this benchmark starts, by pid; ``stop_all`` stops the live ones."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    def spawn(
        self, args: list[str], cpus: tuple[int, ...], log: Path, *, sluice: bool = True
    ) -> subprocess.Popen[bytes]:
        """Start ``sluice ARGS`` (or the command ``args`` with ``sluice=False``) on ``cpus``."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(len(cpus)))
        cmd = [sys.executable, "-m", "sluice", *args] if sluice else list(args)
        taskset = shutil.which("taskset")
        pre = None
        if taskset:
            cmd = [taskset, "-c", ",".join(map(str, cpus)), *cmd]  # execs: the pid is python's
        else:

            def pre() -> None:
                os.sched_setaffinity(0, cpus)

        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=pre,
                start_new_session=True,
            )
        self.started.append(proc)
        self.pids.append(proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        from procs import stop_pid

        stop_pid(proc, timeout=timeout)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server {url} not healthy within {timeout}s:\n{_tail(log)}")


def _server_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/model_info", timeout=5) as r:
        info: dict[str, Any] = json.loads(r.read())
    if "busy_s" not in info:
        raise RuntimeError(f"{url}/model_info has no busy_s: not the sluice CPU server")
    return info


def _sample_busy(
    s: Setup, r: Any, run: str, url: str, out: list[tuple[float, float, float]]
) -> None:
    """Append ``(wall time, busy_s, uptime_s)`` of the inference server to ``out``.

    CPU server: its own ``/model_info`` (seconds with a forward pass running). SGLang has no
    such counter, so there it is the worker's view (its ``metrics`` hash in Redis, written every
    ``metrics_interval_s``): seconds with at least one request in flight on the server, i.e.
    the time the server had work. Nothing is appended until the worker has written metrics."""
    if s.engine == "cpu":
        st = _server_stats(url)
        out.append((time.time(), float(st["busy_s"]), float(st["uptime_s"])))
        return

    raw = r.hmget(keys.worker_metrics(run, "w0"), ["servers", "uptime_s", "updated_at"])
    if raw[0] is None or raw[1] is None or raw[2] is None:
        return
    servers = json.loads(raw[0])
    uptime = float(raw[1])
    busy = sum(float(x["utilisation"]) for x in servers) * uptime  # this worker: one server
    out.append((float(raw[2]), busy, uptime))


def _tail(log: Path, n: int = 30) -> str:
    from procs import log_tail

    return log_tail(log, n)


# ------------------------------------------------------------------ one run's pieces


@dataclass
class Setup:
    workload: str
    spec: dict[str, Any]
    steps: int
    batch_groups: int
    n_samples: int
    workdir: Path
    model: Path
    placement: Placement
    timeout: float
    procs: Procs
    engine: str = "cpu"
    shared_server: str | None = None
    """SGLang: the one server every run uses (started once; a worker loads v0 on start)."""
    checkpoint_every: int = 1

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 10)


def _config(s: Setup, *, url: str, run: str, run_dir: Path, eta: int) -> Path:
    import yaml

    spec = s.spec
    rollout: dict[str, Any] = {
        "n_samples": s.n_samples,
        "max_inflight_groups": spec["max_inflight_groups"],
        "log_every": 10_000,
        "metrics_interval_s": 1.0,
    }
    if spec["max_new_tokens"] is not None:
        rollout["max_new_tokens"] = spec["max_new_tokens"]
    cfg = {
        "redis": {"url": url},
        "run": {"name": run, "dir": str(run_dir), "seed": 0},
        "staleness": {"eta": eta, "batch_groups": s.batch_groups},
        "model": {"path": str(s.model)},
        "task": {"name": spec["task"], "options": spec["options"]},
        "inference": {"engine": s.engine, "threads": len(s.placement.inference)},
        "rollout": rollout,
        "trainer": {
            "device": "cpu" if s.engine == "cpu" else "cuda",
            "threads": len(s.placement.training),
            "max_steps": s.steps,
            # Acks go with checkpoints: the Redis bound's (eta + 1 + checkpoint_every) uses it.
            "checkpoint_every": s.checkpoint_every,
            "keep_checkpoints": 1,
            "keep_weights": 3,
            **spec.get("trainer", {}),
        },
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _start_redis(s: Setup, d: Path) -> Any:
    from procs import RedisServer

    r = RedisServer(directory=d / "redis").start()
    assert r.proc is not None
    s.procs.started.append(r.proc)
    s.procs.pids.append(r.proc.pid)
    _pin_all_threads(r.proc.pid, s.placement.inference)
    return r


def _start_server(s: Setup, d: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """A fresh CPU server for one run, or (None, url) of the shared SGLang server."""
    from procs import free_port

    if s.shared_server is not None:
        return None, s.shared_server
    port = free_port()
    log = d / "server.log"
    threads = str(len(s.placement.inference))
    args = ["serve", "--model", str(s.model), "--port", str(port), "--threads", threads]
    proc = s.procs.spawn(args, s.placement.inference, log)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url, proc, log)
    return proc, url


def start_sglang(s: Setup, mem_fraction: float, extra: list[str], timeout: float = 600.0) -> str:
    """Start the one SGLang server of this invocation (on the inference cpus) and wait for it."""
    from inference.launch import sglang_command
    from procs import free_port

    port = free_port()
    cmd = sglang_command(s.model, port, mem_fraction=mem_fraction, extra_args=extra)
    log = s.workdir / "sglang.log"
    t0 = time.monotonic()
    proc = s.procs.spawn(cmd, s.placement.inference, log, sluice=False)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url, proc, log, timeout=timeout)
    print(f"SGLang up at {url} in {time.monotonic() - t0:.0f}s", flush=True)
    return url


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _window(rows: list[dict[str, Any]], warmup: int) -> tuple[list[dict[str, Any]], float, float]:
    """Rows after the warm-up step and their window ``(t_start, t_end)`` in wall time."""
    if len(rows) <= warmup:
        raise RuntimeError(f"only {len(rows)} train steps logged; need more than {warmup}")
    return rows[warmup:], float(rows[warmup - 1]["time"]), float(rows[-1]["time"])


def _interp(samples: list[tuple[float, float, float]], t: float) -> tuple[float, float]:
    """(busy_s, uptime_s) of the server at wall time ``t``, linear between samples."""
    if t <= samples[0][0]:
        return samples[0][1], samples[0][2]
    for (t0, b0, u0), (t1, b1, u1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            return b0 + f * (b1 - b0), u0 + f * (u1 - u0)
    return samples[-1][1], samples[-1][2]


def _server_idle(samples: list[tuple[float, float, float]], t0: float, t1: float) -> float | None:
    if len(samples) < 2:
        return None
    b0, u0 = _interp(samples, t0)
    b1, u1 = _interp(samples, t1)
    if u1 <= u0:
        return None
    return max(0.0, 1.0 - (b1 - b0) / (u1 - u0))


def _redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def _stream_bytes_per_entry(r: Any, run: str) -> float | None:

    stream = keys.stream(run)
    n = int(r.xlen(stream))
    if n == 0:
        return None
    mem = r.memory_usage(stream, samples=0)
    return float(mem) / n if mem else None


def _other_keys_bytes(r: Any, run: str) -> int:

    stream = keys.stream(run).encode()
    total = 0
    for k in r.scan_iter(match=keys.namespace(run), count=1000):
        if k != stream:
            total += int(r.memory_usage(k, samples=0) or 0)
    return total


# ------------------------------------------------------------------ the ceilings


def run_ceilings(s: Setup) -> dict[str, Any]:
    """Worker alone (gate open) to ``steps * B`` groups, then the trainer alone on them."""

    d = s.workdir / "ceilings"
    d.mkdir(parents=True, exist_ok=True)
    run = f"ceil-{s.workload}-{uuid.uuid4().hex[:8]}"
    redis_srv = _start_redis(s, d)
    r = _redis_client(redis_srv.url)
    try:
        cfg = _config(s, url=redis_srv.url, run=run, run_dir=d / run, eta=GATE_OPEN_ETA)
        server, url = _start_server(s, d)
        target = s.steps * s.batch_groups
        worker = s.procs.spawn(
            [
                "rollout",
                "--config",
                str(cfg),
                "--servers",
                url,
                "--worker-id",
                "w0",
                "--max-groups",
                str(target),
            ],
            s.placement.inference,
            d / "worker.log",
        )
        k_gate = keys.gate(run)
        marks: dict[int, float] = {}
        srv_samples: list[tuple[float, float, float]] = []
        deadline = time.monotonic() + s.timeout
        last_srv = 0.0
        while worker.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"generation ceiling: worker not done in {s.timeout}s")
            done = int(r.hget(k_gate, "finished") or 0)
            now = time.time()
            for m in (s.batch_groups, target):
                if done >= m and m not in marks:
                    marks[m] = now
            if now - last_srv > 0.5:
                _sample_busy(s, r, run, url, srv_samples)
                last_srv = now
            time.sleep(POLL_S)
        if worker.returncode != 0:
            raise RuntimeError(f"worker exited {worker.returncode}:\n{_tail(d / 'worker.log')}")
        done = int(r.hget(k_gate, "finished") or 0)
        marks.setdefault(target, time.time())
        marks.setdefault(s.batch_groups, marks[target])
        _sample_busy(s, r, run, url, srv_samples)
        if server is not None:
            s.procs.stop(server)
        wm = {k.decode(): v.decode() for k, v in r.hgetall(keys.worker_metrics(run, "w0")).items()}
        tokens_per_group = int(wm["tokens_out"]) / max(1, int(wm["groups_pushed"]))
        t0, t1 = marks[s.batch_groups], marks[target]
        gen_gps = (target - s.batch_groups) / max(t1 - t0, 1e-9)
        bytes_per_group = _stream_bytes_per_entry(r, run)
        gen = {
            "groups_per_s": gen_gps,
            "tokens_per_s": gen_gps * tokens_per_group,
            "groups": done,
            "window_s": t1 - t0,
            "tokens_per_group": tokens_per_group,
            "server_idle": _server_idle(srv_samples, t0, t1),
            "bytes_per_group": bytes_per_group,
        }

        trainer = s.procs.spawn(
            ["train", "--config", str(cfg), "--max-steps", str(s.steps)],
            s.placement.training,
            d / "trainer.log",
        )
        try:
            trainer.wait(timeout=s.timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"training ceiling: trainer not done in {s.timeout}s") from None
        if trainer.returncode != 0:
            raise RuntimeError(f"trainer exited {trainer.returncode}:\n{_tail(d / 'trainer.log')}")
        rows, w0, w1 = _window(_read_metrics(d / run), s.warmup)
        span = max(w1 - w0, 1e-9)
        trained = sum(x["groups"] - x["dropped"] for x in rows)
        read_s = sum(x["idle_s"] for x in rows)
        buf_s = sum(x.get("buffer_s", 0.0) for x in rows)
        train = {
            "groups_per_s": trained / span,
            "tokens_per_s": sum(x["tokens"] for x in rows) / span,
            "steps": len(rows),
            "window_s": span,
            "dropped": int(rows[-1]["dropped_total"]),
            "read_s_per_step": read_s / len(rows),
            "buffer_s_per_step": buf_s / len(rows),
            "wall_s_per_step": span / len(rows),
            "buffer_gate_share": (read_s + buf_s) / span,
        }
        return {"gen": gen, "train": train, "run": run}
    finally:
        r.close()
        redis_srv.stop()


# ------------------------------------------------------------------ one pipeline run


def run_pipeline(s: Setup, eta: int, bytes_hint: float | None) -> dict[str, Any]:

    d = s.workdir / f"eta{eta}"
    d.mkdir(parents=True, exist_ok=True)
    run = f"pipe-{s.workload}-e{eta}-{uuid.uuid4().hex[:8]}"
    redis_srv = _start_redis(s, d)
    r = _redis_client(redis_srv.url)
    try:
        base_mem = int(r.info("memory")["used_memory"])
        cfg = _config(s, url=redis_srv.url, run=run, run_dir=d / run, eta=eta)
        server, url = _start_server(s, d)
        trainer = s.procs.spawn(
            ["train", "--config", str(cfg), "--max-steps", str(s.steps)],
            s.placement.training,
            d / "trainer.log",
        )
        worker = s.procs.spawn(
            ["rollout", "--config", str(cfg), "--servers", url, "--worker-id", "w0"],
            s.placement.inference,
            d / "worker.log",
        )
        srv_samples: list[tuple[float, float, float]] = []
        per_entry: list[float] = []
        produced: list[tuple[float, float, float]] = []  # (wall time, groups pushed, 0)
        clients_mem = 0  # the largest client-buffer memory seen (connections of 3 processes)
        top_mem: dict[str, Any] = {}  # INFO memory at the largest used_memory sampled
        t_run = time.time()
        k_gate = keys.gate(run)
        deadline = time.monotonic() + s.timeout
        last_srv = 0.0
        while trainer.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"eta={eta}: trainer not done in {s.timeout}s")
            if worker.poll() is not None:
                raise RuntimeError(
                    f"eta={eta}: worker exited {worker.returncode}:\n{_tail(d / 'worker.log')}"
                )
            now = time.time()
            produced.append((now, float(r.hget(k_gate, "finished") or 0), 0.0))
            mem = r.info("memory")
            if int(mem["used_memory"]) > int(top_mem.get("used_memory", 0)):
                top_mem = {k: mem[k] for k in MEM_FIELDS if k in mem}
                top_mem["t_s"] = round(now - t_run, 2)
            if now - last_srv > 0.5:
                _sample_busy(s, r, run, url, srv_samples)
                b = _stream_bytes_per_entry(r, run)
                if b is not None:
                    per_entry.append(b)
                mem = r.info("memory")
                clients_mem = max(clients_mem, int(mem.get("mem_clients_normal", 0)))
                last_srv = now
            time.sleep(POLL_S)
        if trainer.returncode != 0:
            raise RuntimeError(
                f"eta={eta}: trainer exited {trainer.returncode}:\n{_tail(d / 'trainer.log')}"
            )
        _sample_busy(s, r, run, url, srv_samples)
        s.procs.stop(worker)
        if server is not None:
            s.procs.stop(server)
        wm = {k.decode(): v.decode() for k, v in r.hgetall(keys.worker_metrics(run, "w0")).items()}
        b = _stream_bytes_per_entry(r, run)
        if b is not None:
            per_entry.append(b)
        mem = r.info("memory")
        peak = int(mem["used_memory_peak"])
        scripts = int(mem.get("used_memory_scripts", 0)) + int(mem.get("used_memory_vm_eval", 0))
        overhead = base_mem + clients_mem + scripts + _other_keys_bytes(r, run)
        all_rows = _read_metrics(d / run)
        rows, w0, w1 = _window(all_rows, s.warmup)
        span = max(w1 - w0, 1e-9)
        hist: dict[int, int] = {}
        for x in all_rows:
            for k, c in x["staleness_hist"].items():
                hist[int(k.rstrip("+"))] = hist.get(int(k.rstrip("+")), 0) + int(c)
        n_hist = sum(hist.values())
        tail = all_rows[-max(1, len(all_rows) // 5) :]
        bpg = max(per_entry) if per_entry else (bytes_hint or 0.0)
        bound = (eta + 1 + s.checkpoint_every) * s.batch_groups * bpg + overhead
        # Sustained rate: groups trained in the window plus the change of the backlog (pushed,
        # not yet read). Without it a run whose worker filled (eta + 1) batches while the
        # trainer started up would count that backlog as throughput.
        trained = sum(x["groups"] - x["dropped"] for x in rows)
        read_before = sum(x["groups"] for x in all_rows[: s.warmup])
        read_all = sum(x["groups"] for x in all_rows)
        backlog0 = _interp(produced, w0)[0] - read_before if produced else 0.0
        backlog1 = _interp(produced, w1)[0] - read_all if produced else 0.0
        sustained = max(0.0, trained + backlog1 - backlog0) / span
        tokens_per_group = sum(x["tokens"] for x in rows) / max(1, trained)
        return {
            "eta": eta,
            "groups_per_s": sustained,
            "tokens_per_s": sustained * tokens_per_group,
            "consumed_groups_per_s": trained / span,
            "backlog_start": backlog0,
            "backlog_end": backlog1,
            "trainer_idle": sum(x["idle_s"] for x in rows) / span,
            "server_idle": _server_idle(srv_samples, w0, w1),
            "mean_staleness": sum(k * c for k, c in hist.items()) / max(1, n_hist),
            "max_staleness": max(int(x["staleness_max"]) for x in all_rows),
            "dropped": int(all_rows[-1]["dropped_total"]),
            "final_reward": sum(x["reward_mean"] for x in tail) / len(tail),
            "redis_peak_bytes": peak,
            "redis_bound_bytes": int(bound),
            "redis_within_bound": peak <= bound,
            "bytes_per_group": bpg,
            "redis_overhead_bytes": overhead,
            "redis_top_sample": top_mem,
            "redis_overhead_parts": {
                "empty_server": base_mem,
                "client_buffers_max_sampled": clients_mem,
                "scripts": scripts,
                "other_keys": overhead - base_mem - clients_mem - scripts,
            },
            "buffer_gate_share": sum(x.get("buffer_s", 0.0) for x in rows) / span,
            "steps": len(all_rows),
            "window_s": span,
            "weight_updates": int(wm.get("updates", 0)),
            "update_latency_mean_s": float(
                json.loads(wm.get("update_latency_mean_s", "null")) or 0
            ),
            "interrupted_samples": int(wm.get("interrupted_samples", 0)),
            "gate_blocked_s": float(wm.get("gate_blocked_s", 0.0)),
            "run": run,
        }
    finally:
        r.close()
        redis_srv.stop()


# ------------------------------------------------------------------ report


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def summarize(gen: float, train: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    async_runs = [x for x in runs if x["eta"] >= 1]
    sync = next((x for x in runs if x["eta"] == 0), None)
    best = max(async_runs, key=lambda x: x["groups_per_s"]) if async_runs else None
    return {
        "efficiency": best["groups_per_s"] / min(gen, train) if best else None,
        "speedup_vs_sync": best["groups_per_s"] / sync["groups_per_s"] if best and sync else None,
        "best_eta": best["eta"] if best else None,
    }


def plot(path: str, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    etas = [x["eta"] for x in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(etas, [x["groups_per_s"] for x in runs], "o-", label="pipeline (trained groups/s)")
    a.axhline(doc["gen_ceiling"], color="tab:green", ls="--", label="generation ceiling")
    a.axhline(doc["train_ceiling"], color="tab:red", ls="--", label="training ceiling")
    a.set_xlabel("staleness limit eta")
    a.set_ylabel("groups / s")
    a.set_ylim(bottom=0)
    a.set_title(f"throughput ({doc['workload']})")
    a.legend(fontsize=8)
    b.plot(etas, [x["trainer_idle"] for x in runs], "o-", label="trainer idle")
    b.plot(
        etas,
        [x["server_idle"] if x["server_idle"] is not None else float("nan") for x in runs],
        "s-",
        label="inference server idle",
    )
    b.set_xlabel("staleness limit eta")
    b.set_ylabel("idle fraction")
    b.set_ylim(0, 1)
    b.set_title("idle fraction")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xticks(etas)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """``benchmarks.common.print_table``, wide enough for 12 columns when piped."""
    from benchmarks.common import print_table as common_table

    common_table(title, columns, rows, width=160)


# ------------------------------------------------------------------ entry point


def run(args: argparse.Namespace) -> int:
    from benchmarks.common import machine_info, write_json
    from inference.models import init_tiny_model
    from rollout_workers.tasks import get_task

    if args.workload is None:
        args.workload = "long-tail-gpu" if args.engine == "sglang" else "reverse"
    spec = json.loads(json.dumps(WORKLOADS[args.workload]))
    for k in ("layers", "hidden"):
        v = getattr(args, k)
        if v is not None:
            if v < 1:
                raise SystemExit(f"bench pipeline: --{k} must be >= 1, got {v}")
            spec["model"][k] = v
    if args.inflight is not None:
        if args.inflight < 1:
            raise SystemExit(f"bench pipeline: --inflight must be >= 1, got {args.inflight}")
        spec["max_inflight_groups"] = args.inflight
    etas = args.etas if args.etas is not None else ([0, 2] if args.quick else [0, 1, 2, 4, 8])
    if any(e < 0 or e > GATE_OPEN_ETA - 1 for e in etas):
        raise SystemExit(f"bench pipeline: --etas must be in [0, {GATE_OPEN_ETA - 1}], got {etas}")
    if len(set(etas)) != len(etas):
        raise SystemExit(f"bench pipeline: --etas has duplicates: {etas}")
    if args.ceilings_twice is None:
        args.ceilings_twice = not args.quick and args.engine == "cpu"
    if args.checkpoint_every < 1:
        raise SystemExit(
            f"bench pipeline: --checkpoint-every must be >= 1, got {args.checkpoint_every}"
        )
    if not 0 < args.mem_fraction <= 1:
        raise SystemExit(
            f"bench pipeline: --mem-fraction must be in (0, 1], got {args.mem_fraction}"
        )
    steps = args.steps or (spec["quick_steps"] if args.quick else spec["steps"])
    if steps < 2:
        raise SystemExit(f"bench pipeline: --steps must be >= 2 (one is warm-up), got {steps}")
    bg = args.batch_groups or spec["batch_groups"]
    ns = args.n_samples or spec["n_samples"]
    if bg < 1 or ns < 1:
        raise SystemExit("bench pipeline: --batch-groups and --n-samples must be >= 1")
    if args.engine == "sglang":
        from inference.launch import EngineUnavailable, choose_engine

        try:
            choose_engine("sglang")
        except EngineUnavailable as e:
            raise SystemExit(f"bench pipeline: {e}") from None
    own_dir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sluice-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    task = get_task(spec["task"], **spec["options"])
    model = init_tiny_model(
        workdir / "model",
        vocab=task.vocab_size,
        bos_token_id=task.bos_token_id,
        eos_token_id=task.eos_token_id,
        pad_token_id=task.pad_token_id,
        seed=0,
        **spec["model"],
    )
    placement = Placement.split()
    s = Setup(
        workload=args.workload,
        spec=spec,
        steps=steps,
        batch_groups=bg,
        n_samples=ns,
        workdir=workdir,
        model=model,
        placement=placement,
        timeout=args.run_timeout,
        procs=Procs(),
        engine=args.engine,
        checkpoint_every=args.checkpoint_every,
    )
    print(
        f"pipeline bench: {args.workload} on {args.engine}, {steps} steps x {bg} groups x {ns} "
        f"samples, etas {etas}; inference cpus {list(placement.inference)} (server, worker, "
        f"redis), training cpus {list(placement.training)}; workdir {workdir}",
        flush=True,
    )
    t_all = time.monotonic()
    load_start = list(os.getloadavg())
    try:
        if args.engine == "sglang":
            s.shared_server = start_sglang(s, args.mem_fraction, shlex.split(args.sglang_args))
        ceil = run_ceilings(s)
        print(
            f"ceilings: generation {ceil['gen']['groups_per_s']:.2f} groups/s, "
            f"training {ceil['train']['groups_per_s']:.2f} groups/s",
            flush=True,
        )
        runs = []
        for eta in etas:
            res = run_pipeline(s, eta, ceil["gen"]["bytes_per_group"])
            runs.append(res)
            print(
                f"eta {eta}: {res['groups_per_s']:.2f} groups/s, trainer idle "
                f"{res['trainer_idle']:.2f}, max staleness {res['max_staleness']}",
                flush=True,
            )
        # Measured again after the runs: on a shared machine the load moves; the ceilings used
        # are the mean of both measurements (each is in the JSON).
        after = run_ceilings(s) if args.ceilings_twice else None
    finally:
        s.procs.stop_all()
    both = [ceil] + ([after] if after else [])
    g = sum(c["gen"]["groups_per_s"] for c in both) / len(both)
    t = sum(c["train"]["groups_per_s"] for c in both) / len(both)
    share = sum(c["train"]["buffer_gate_share"] for c in both) / len(both)
    doc: dict[str, Any] = {
        "bench": "pipeline",
        "workload": args.workload,
        "engine": args.engine,
        "sglang_args": args.sglang_args if args.engine == "sglang" else None,
        "mem_fraction": args.mem_fraction if args.engine == "sglang" else None,
        "checkpoint_every": args.checkpoint_every,
        "task": {"name": spec["task"], "options": spec["options"]},
        "model": spec["model"],
        "steps": steps,
        "batch_groups": bg,
        "n_samples": ns,
        "warmup_steps": s.warmup,
        "placement": placement.describe(),
        "machine": machine_info(),
        "load_avg_start": load_start,
        "load_avg_end": list(os.getloadavg()),
        "gen_ceiling": g,
        "train_ceiling": t,
        "gen": ceil["gen"],
        "train": ceil["train"],
        "gen_after": after["gen"] if after else None,
        "train_after": after["train"] if after else None,
        "buffer_gate_share": share,
        "runs": runs,
        **summarize(g, t, runs),
        "pids": list(s.procs.pids),
        "elapsed_s": time.monotonic() - t_all,
    }
    cols = ["eta", "groups/s", "tok/s", "trainer idle", "server idle", "stale mean", "stale max"]
    cols += ["dropped", "reward", "redis peak KiB", "bound KiB", "buf+gate %"]
    rows: list[list[Any]] = [
        [
            "gen ceiling",
            g,
            g * ceil["gen"]["tokens_per_group"],
            "-",
            ceil["gen"]["server_idle"] or 0.0,
        ]
        + ["-"] * 7,
        [
            "train ceiling",
            t,
            t * ceil["train"]["tokens_per_s"] / ceil["train"]["groups_per_s"],
            "-",
            "-",
            "-",
            "-",
            ceil["train"]["dropped"],
            "-",
            "-",
            "-",
            100 * share,
        ],
    ]
    for x in runs:
        rows.append(
            [
                x["eta"],
                x["groups_per_s"],
                x["tokens_per_s"],
                x["trainer_idle"],
                x["server_idle"] if x["server_idle"] is not None else "-",
                x["mean_staleness"],
                x["max_staleness"],
                x["dropped"],
                x["final_reward"],
                x["redis_peak_bytes"] / 1024,
                x["redis_bound_bytes"] / 1024,
                100 * x["buffer_gate_share"],
            ]
        )
    print_table(
        f"pipeline: {args.workload}, cpus inference {list(placement.inference)} / training "
        f"{list(placement.training)}",
        cols,
        rows,
    )
    eff, sp = doc["efficiency"], doc["speedup_vs_sync"]
    print(
        f"efficiency (best async / min(gen, train)) = {eff:.3f}"
        if eff is not None
        else "efficiency: no eta >= 1 run",
        f"; speedup vs eta 0 = {sp:.2f}x" if sp is not None else "",
        f"; buffer+gate share of trainer wall (training ceiling) = "
        f"{100 * doc['buffer_gate_share']:.2f}%",
        sep="",
    )
    write_json(args.json, doc)
    if args.plot:
        plot(args.plot, doc)
    if own_dir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    bad = [k for k in ("gen_ceiling", "train_ceiling") if not _finite(doc[k]) or doc[k] <= 0]
    return 1 if bad else 0
