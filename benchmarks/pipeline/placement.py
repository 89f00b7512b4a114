"""Where the benchmark's processes run: inference and training on disjoint cores, every process
started here (through ``procs``, the one process module) pinned to its side and stopped by its
own pid."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


def pin_all_threads(pid: int, cpus: tuple[int, ...]) -> None:
    """Pin every thread of process ``pid`` (Redis starts its background threads before we
    can)."""
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
        """Start ``sluice ARGS`` (or the command ``args`` with ``sluice=False``) on ``cpus``,
        in its own session, output appended to ``log``."""
        from procs import spawn

        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(len(cpus)))
        cmd = [sys.executable, "-m", "sluice", *args] if sluice else list(args)
        proc = spawn(cmd, log, env=env, cpu_list=cpus)
        self.started.append(proc)
        self.pids.append(proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        from procs import stop_pid

        stop_pid(proc, timeout=timeout)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


def tail(log: Path, n: int = 30) -> str:
    """The last ``n`` lines of a process's log, for an error message."""
    from procs import log_tail

    return log_tail(log, n)


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0
) -> None:
    """Wait until ``url/health`` answers 200; raises ``procs.ProcessExited`` (a RuntimeError)
    if ``proc`` exits first, ``procs.NotHealthy`` (a TimeoutError) after ``timeout`` s, each
    with the log's tail."""
    from procs import wait_http_ok

    wait_http_ok(url + "/health", proc, timeout, log, what="server")
