"""Child processes started and stopped by their own pid: spawn, wait for health, stop, kill.

Invariants (tests/unit/procs/test_procs.py):
- Every process is signalled by its own pid; nothing is looked up by name.
- ``stop_pid``/``stop_pids``: SIGTERM, up to ``timeout`` s, then SIGKILL; ``kill_pid``: SIGKILL.
  Both then SIGKILL what the process left behind in the process group it leads (a process
  spawned with ``new_session=True``, e.g. SGLang's scheduler and detokenizer) while the exited
  process is still unreaped, so that group id cannot belong to anyone else; then reap it.
- ``alive`` never reaps, so ``stop_pid`` and ``kill_pid`` work whatever was called before.
- ``wait_http_ok`` raises ``ProcessExited`` as soon as the process exits (it reaps it), and
  ``NotHealthy`` at the deadline (it leaves the process running); both messages end with the
  tail of the process's log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

Proc = subprocess.Popen[bytes]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free when asked (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, n: int = 40) -> str:
    """The last ``n`` lines of the log at ``path`` (``(no log)`` when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------ start


def spawn(
    args: Sequence[str],
    log_path: str | Path | None,
    *,
    env: Mapping[str, str] | None = None,
    new_session: bool = True,
    cpu_list: Sequence[int] | None = None,
    cwd: str | Path | None = None,
    header: str | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Proc:
    """Start ``args`` with stdin from /dev/null, stdout and stderr appended to ``log_path``
    (discarded when None), after the line ``header`` when given.

    ``env``: the child's whole environment (None: this process's). ``new_session``: its own
    session and process group, so a Ctrl-C in the launching terminal does not reach it and
    ``stop_pid`` takes its leftovers through that group. ``cpu_list``: pinned to these CPUs
    (``taskset -c``, which execs, so the pid stays the program's; ``sched_setaffinity`` in the
    child where there is no taskset). ``preexec_fn`` runs in the child before the exec.
    """
    cmd = list(args)
    pre = preexec_fn
    if cpu_list is not None:
        cpus = tuple(cpu_list)
        taskset = shutil.which("taskset")
        if taskset:
            cmd = [taskset, "-c", ",".join(map(str, cpus)), *cmd]
        else:

            def pre() -> None:
                if preexec_fn is not None:
                    preexec_fn()
                os.sched_setaffinity(0, cpus)

    with contextlib.ExitStack() as files:
        out: int | IO[bytes] = subprocess.DEVNULL
        if log_path is not None:
            out = files.enter_context(open(log_path, "ab"))
            if header is not None:
                out.write(header.rstrip("\n").encode() + b"\n")
                out.flush()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=new_session,
            preexec_fn=pre,
        )


# ------------------------------------------------------------------ state


def alive(proc: Proc) -> bool:
    """True while the process runs; never reaps it."""
    if proc.returncode is not None:
        return False
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return info is None


def pid_alive(pid: int) -> bool:
    """True if any process ``pid`` exists and is not a zombie (for processes that are not our
    children, such as a child's children, which ``alive`` cannot ask about)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait_exit(procs: Sequence[Proc], timeout: float) -> list[Proc]:
    """Wait up to ``timeout`` s until each of ``procs`` exited, leaving them unreaped; returns
    those still running."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def reap(proc: Proc) -> int:
    """The process has exited: SIGKILL what is left of the process group it leads (while it is
    unreaped, so the group id is still its own), then reap it; returns its exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


# ------------------------------------------------------------------ stop


def stop_pids(procs: Sequence[Proc], timeout: float = 10.0, kill_wait: float = 10.0) -> list[Proc]:
    """SIGTERM every running process of ``procs`` together, SIGKILL those still running after
    ``timeout`` s, wait up to ``kill_wait`` s, then reap each (group leftovers killed).
    Returns the processes that ignored SIGTERM."""
    for p in procs:
        if alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    hung = wait_exit(procs, timeout)
    for p in hung:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    wait_exit(hung, kill_wait)
    for p in procs:
        reap(p)
    return hung


def stop_pid(proc: Proc, timeout: float = 10.0) -> int:
    """SIGTERM, SIGKILL after ``timeout`` s, reap; returns the exit code (see ``stop_pids``)."""
    stop_pids([proc], timeout)
    return proc.wait()


def kill_pid(proc: Proc, timeout: float = 30.0) -> int:
    """SIGKILL (as a crash would) and reap, its process group's leftovers included; returns the
    exit code."""
    if alive(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        wait_exit([proc], timeout)
    return reap(proc)


# ------------------------------------------------------------------ health

# No proxies for our own servers, whatever HTTP_PROXY says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ProcessExited(RuntimeError):
    """The process exited before it was healthy; the message ends with its log tail."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


class NotHealthy(TimeoutError):
    """The process did not answer in time (still running); the message ends with its log
    tail."""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET url`` answers 200 (False for another status or no answer)."""
    try:
        with _OPENER.open(url, timeout=timeout) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_http_ok(
    url: str,
    proc: Proc,
    timeout: float,
    log_path: str | Path,
    *,
    what: str = "process",
    interval: float = 0.1,
) -> None:
    """Poll ``GET url`` until it answers 200. Raises ``ProcessExited`` (reaped) as soon as
    ``proc`` exits, ``NotHealthy`` after ``timeout`` s (``proc`` left running)."""
    log = Path(log_path)
    deadline = time.monotonic() + timeout
    while True:
        if not alive(proc):
            code = reap(proc)
            raise ProcessExited(
                f"{what} (pid {proc.pid}) exited with code {code} before {url} answered 200; "
                f"log {log}, last lines:\n{log_tail(log)}",
                code,
            )
        if http_ok(url):
            return
        if time.monotonic() >= deadline:
            raise NotHealthy(
                f"{what} (pid {proc.pid}) not healthy on {url} within {timeout:.0f}s; "
                f"log {log}, last lines:\n{log_tail(log)}"
            )
        time.sleep(interval)
