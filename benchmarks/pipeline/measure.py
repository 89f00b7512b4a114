"""Numbers read off a run: its steady-state window, the server's idle fraction over it, and the
Redis memory of the run's stream and other keys."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from buffer import keys

# INFO memory fields kept from the sample with the largest used_memory.
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


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The trainer's ``metrics.jsonl`` step rows ([] before the first); event lines (evals)
    are left out."""
    from trainer.metrics import is_step_row

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if is_step_row(r)]


def window(rows: list[dict[str, Any]], warmup: int) -> tuple[list[dict[str, Any]], float, float]:
    """Rows after the warm-up step and their window ``(t_start, t_end)`` in wall time."""
    if len(rows) <= warmup:
        raise RuntimeError(f"only {len(rows)} train steps logged; need more than {warmup}")
    return rows[warmup:], float(rows[warmup - 1]["time"]), float(rows[-1]["time"])


def interp(samples: list[tuple[float, float, float]], t: float) -> tuple[float, float]:
    """(busy_s, uptime_s) of the server at wall time ``t``, linear between samples."""
    if t <= samples[0][0]:
        return samples[0][1], samples[0][2]
    for (t0, b0, u0), (t1, b1, u1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            return b0 + f * (b1 - b0), u0 + f * (u1 - u0)
    return samples[-1][1], samples[-1][2]


def server_idle(samples: list[tuple[float, float, float]], t0: float, t1: float) -> float | None:
    """``1 - d busy_s / d uptime_s`` of the server between wall times ``t0`` and ``t1``."""
    if len(samples) < 2:
        return None
    b0, u0 = interp(samples, t0)
    b1, u1 = interp(samples, t1)
    if u1 <= u0:
        return None
    return max(0.0, 1.0 - (b1 - b0) / (u1 - u0))


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def stream_bytes_per_entry(r: Any, run: str) -> float | None:
    """``MEMORY USAGE`` of the run's stream per entry (None while it is empty)."""
    stream = keys.stream(run)
    n = int(r.xlen(stream))
    if n == 0:
        return None
    mem = r.memory_usage(stream, samples=0)
    return float(mem) / n if mem else None


def other_keys_bytes(r: Any, run: str) -> int:
    """``MEMORY USAGE`` of every key of the run except its stream."""
    stream = keys.stream(run).encode()
    total = 0
    for k in r.scan_iter(match=keys.namespace(run), count=1000):
        if k != stream:
            total += int(r.memory_usage(k, samples=0) or 0)
    return total


def worker_metrics(r: Any, run: str) -> dict[str, str]:
    """The metrics hash of the run's worker ``w0``, decoded."""
    raw = r.hgetall(keys.worker_metrics(run, "w0"))
    return {k.decode(): v.decode() for k, v in raw.items()}
