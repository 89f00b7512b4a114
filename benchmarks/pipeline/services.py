"""The services one run talks to: a private ``redis-server``, the inference server (a fresh CPU
server per run, or the one SGLang server of the invocation), and the server's busy time."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.pipeline.placement import pin_all_threads, wait_healthy
from benchmarks.pipeline.workloads import Setup
from buffer import keys


def server_stats(url: str) -> dict[str, Any]:
    """The CPU server's ``/model_info`` (with its ``busy_s`` and ``uptime_s`` counters)."""
    with urllib.request.urlopen(url + "/model_info", timeout=5) as r:
        info: dict[str, Any] = json.loads(r.read())
    if "busy_s" not in info:
        raise RuntimeError(f"{url}/model_info has no busy_s: not the sluice CPU server")
    return info


def sample_busy(
    s: Setup, r: Any, run: str, url: str, out: list[tuple[float, float, float]]
) -> None:
    """Append ``(wall time, busy_s, uptime_s)`` of the inference server to ``out``.

    CPU server: its own ``/model_info`` (seconds with a forward pass running). SGLang has no
    such counter, so there it is the worker's view (its ``metrics`` hash in Redis, written every
    ``metrics_interval_s``): seconds with at least one request in flight on the server, i.e.
    the time the server had work. Nothing is appended until the worker has written metrics."""
    if s.engine == "cpu":
        st = server_stats(url)
        out.append((time.time(), float(st["busy_s"]), float(st["uptime_s"])))
        return

    raw = r.hmget(keys.worker_metrics(run, "w0"), ["servers", "uptime_s", "updated_at"])
    if raw[0] is None or raw[1] is None or raw[2] is None:
        return
    servers = json.loads(raw[0])
    uptime = float(raw[1])
    busy = sum(float(x["utilisation"]) for x in servers) * uptime  # this worker: one server
    out.append((float(raw[2]), busy, uptime))


def start_redis(s: Setup, d: Path) -> Any:
    """A private ``redis-server`` in ``d/redis``, pinned to the inference cpus."""
    from procs import RedisServer

    r = RedisServer(directory=d / "redis").start()
    assert r.proc is not None
    s.procs.started.append(r.proc)
    s.procs.pids.append(r.proc.pid)
    pin_all_threads(r.proc.pid, s.placement.inference)
    return r


def start_server(s: Setup, d: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """A fresh CPU server for one run, or (None, url) of the shared SGLang server."""
    from inference.launch import cpu_server_command
    from procs import free_port

    if s.shared_server is not None:
        return None, s.shared_server
    port = free_port()
    log = d / "server.log"
    cmd = cpu_server_command(s.model, port, threads=len(s.placement.inference))
    proc = s.procs.spawn(cmd, s.placement.inference, log, sluice=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
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
    wait_healthy(url, proc, log, timeout=timeout)
    print(f"SGLang up at {url} in {time.monotonic() - t0:.0f}s", flush=True)
    return url
