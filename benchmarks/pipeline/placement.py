"""Where the benchmark's processes run: inference and training on disjoint cores, every process
started here pinned to its side and stopped by its own pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
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


def tail(log: Path, n: int = 30) -> str:
    """The last ``n`` lines of a process's log, for an error message."""
    from procs import log_tail

    return log_tail(log, n)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    """Wait until ``url/health`` answers 200; raise (with the log's tail) if ``proc`` exits or
    ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server {url} not healthy within {timeout}s:\n{tail(log)}")
