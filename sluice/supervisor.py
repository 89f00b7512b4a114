"""Named child processes, polled and restarted: what ``sluice demo`` runs its processes under.

A ``Supervisor`` starts each ``ChildSpec`` as its own OS process (``start_new_session=True``:
its own process group, so a Ctrl-C in the terminal reaches only the supervisor, which then
stops everything in order), with stdout and stderr appended to ``LOG_DIR/NAME.log``.
``poll()`` (non-blocking; call it every fraction of a second) reaps children that exited and:

- exit code 0 of a child with ``done_on_success`` (the trainer finishing its steps): the child
  is ``finished`` and not restarted;
- any other exit (a non-zero code, a signal, or a clean exit nobody asked for): the child is
  restarted with ``restart_args`` (the trainer: ``--resume``) until it has been restarted
  ``max_restarts`` times; after that it is ``failed`` and stays down.

Each of these writes one log line naming the child, its pid, how it ended (exit code or signal
name) and what was done, and is returned from ``poll()`` as a ``ChildEvent``.

Invariants (tests/integration/test_supervisor.py):
- Every process is signalled by its own pid; what a child left behind in its process group is
  SIGKILLed through the group it leads while its exited leader is still unreaped (so the group
  id cannot have been reused). Nothing is looked up by name.
- After ``stop_all()`` (or leaving the ``with`` block) no child and no member of a child's
  process group is alive: SIGTERM, ``timeout`` seconds, then SIGKILL.
- A child is never restarted more than ``max_restarts`` times.
- On Linux each child also gets SIGTERM if the supervising process dies without cleaning up
  (``PR_SET_PDEATHSIG``), so even a SIGKILLed demo leaves no worker behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from procs import alive, reap, spawn, stop_pids

log = logging.getLogger("sluice.supervisor")

RUNNING, FINISHED, FAILED, STOPPED = "running", "finished", "failed", "stopped"


def describe_exit(code: int | None) -> str:
    """``exit code 3`` / ``killed by SIGKILL`` for a Popen return code."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _pdeathsig() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies (else None)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl = getattr(libc, "prctl", None)
    if prctl is None:
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return preexec


@dataclass
class ChildSpec:
    """How to run one named child: ``args`` the first time, ``restart_args`` (default ``args``)
    after it died."""

    name: str
    args: list[str]
    restart_args: list[str] | None = None
    env: dict[str, str] | None = None
    """Extra environment variables (on top of the supervisor's environment)."""
    cwd: str | None = None
    done_on_success: bool = False
    """Exit code 0 means the child's work is done (not restarted)."""
    stop_timeout: float | None = None
    """Seconds between SIGTERM and SIGKILL on stop (None: the supervisor's)."""


@dataclass
class ChildEvent:
    """Something ``poll()`` saw: ``kind`` is ``restarted``, ``finished`` or ``failed``."""

    name: str
    kind: str
    pid: int
    exit: str
    restarts: int
    new_pid: int | None = None
    message: str = ""


@dataclass
class Child:
    spec: ChildSpec
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    state: str = RUNNING
    started_at: float = 0.0
    pids: list[int] = field(default_factory=list)
    """Every pid this child has had, first start first."""
    returncode: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        """True while the process runs; does not reap it."""
        return self.proc is not None and alive(self.proc)


class Supervisor:
    """Start, poll, restart and stop named children (see the module docstring)."""

    def __init__(
        self,
        log_dir: str | Path,
        *,
        max_restarts: int = 3,
        stop_timeout: float = 15.0,
        on_event: Callable[[ChildEvent], None] | None = None,
    ) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        if stop_timeout <= 0:
            raise ValueError(f"stop_timeout must be > 0, got {stop_timeout}")
        self.log_dir = Path(log_dir)
        self.max_restarts = max_restarts
        self.stop_timeout = stop_timeout
        self.on_event = on_event
        self.children: dict[str, Child] = {}
        self._preexec = _pdeathsig()

    # ------------------------------------------------------------------ start
    def _spawn(self, child: Child, args: list[str]) -> None:
        spec = child.spec
        env = dict(os.environ)
        if spec.env:
            env.update(spec.env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child.proc = spawn(
            args,
            child.log_path,
            env=env,
            cwd=spec.cwd,
            new_session=True,
            header=f"--- {time.strftime('%H:%M:%S')} $ {' '.join(args)}",
            preexec_fn=self._preexec,  # only prctl: safe between fork and exec
        )
        child.started_at = time.monotonic()
        child.state = RUNNING
        child.returncode = None
        child.pids.append(child.proc.pid)

    def start(self, spec: ChildSpec) -> Child:
        """Start ``spec`` (its name must be new); returns the running ``Child``."""
        if spec.name in self.children:
            raise ValueError(f"a child named {spec.name!r} is already supervised")
        if not spec.args:
            raise ValueError(f"child {spec.name!r} has no command")
        child = Child(spec=spec, log_path=self.log_dir / f"{spec.name}.log")
        self.children[spec.name] = child
        self._spawn(child, list(spec.args))
        log.info("started %s (pid %d, log %s)", spec.name, child.pid, child.log_path)
        return child

    # ------------------------------------------------------------------ poll
    def _reap(self, child: Child) -> int:
        """The child's process has exited (unreaped): kill its group's leftovers, then reap."""
        assert child.proc is not None
        code = reap(child.proc)
        child.returncode = code
        return code

    def poll(self) -> list[ChildEvent]:
        """Handle every child that exited since the last call; returns what was done."""
        events: list[ChildEvent] = []
        for child in self.children.values():
            if child.state != RUNNING or child.proc is None or child.alive():
                continue
            pid = child.proc.pid
            code = self._reap(child)
            how = describe_exit(code)
            name = child.spec.name
            if code == 0 and child.spec.done_on_success:
                child.state = FINISHED
                ev = ChildEvent(name, "finished", pid, how, child.restarts, message="done")
                log.info("%s (pid %d) finished: %s", name, pid, how)
            elif child.restarts >= self.max_restarts:
                child.state = FAILED
                ev = ChildEvent(
                    name,
                    "failed",
                    pid,
                    how,
                    child.restarts,
                    message=f"restart limit {self.max_restarts} reached; not restarted "
                    f"(log {child.log_path})",
                )
                log.error("%s (pid %d) died (%s): %s", name, pid, how, ev.message)
            else:
                child.restarts += 1
                args = list(child.spec.restart_args or child.spec.args)
                self._spawn(child, args)
                ev = ChildEvent(
                    name,
                    "restarted",
                    pid,
                    how,
                    child.restarts,
                    new_pid=child.pid,
                    message=f"restart {child.restarts}/{self.max_restarts} as pid {child.pid}"
                    + (
                        " with " + " ".join(args[len(child.spec.args) :])
                        if child.spec.restart_args
                        else ""
                    ),
                )
                log.warning("%s (pid %d) died (%s): %s", name, pid, how, ev.message)
            events.append(ev)
            if self.on_event is not None:
                self.on_event(ev)
        return events

    # ------------------------------------------------------------------ stop
    def stop(self, names: list[str] | None = None, timeout: float | None = None) -> None:
        """SIGTERM the named running children (all when None) together, SIGKILL those still
        running after ``timeout`` (default: each spec's ``stop_timeout`` or the supervisor's),
        then kill their process groups' leftovers and reap them."""
        chosen = [
            c
            for n, c in self.children.items()
            if (names is None or n in names) and c.proc is not None and c.returncode is None
        ]
        limit = timeout
        if limit is None:
            limit = max((c.spec.stop_timeout or self.stop_timeout) for c in chosen) if chosen else 0
        hung = stop_pids([c.proc for c in chosen if c.proc is not None], limit, kill_wait=10.0)
        for c in chosen:
            if c.proc in hung:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %.0fs: SIGKILL", c.spec.name, c.pid, limit
                )
        for c in chosen:
            code = self._reap(c)
            if c.state == RUNNING:
                c.state = STOPPED
            log.info(
                "stopped %s (pid %d): %s",
                c.spec.name,
                c.proc.pid if c.proc else -1,
                describe_exit(code),
            )

    def stop_all(self, timeout: float | None = None) -> None:
        """Stop every child (see ``stop``)."""
        self.stop(None, timeout)

    def all_pids(self) -> list[int]:
        """Every pid any child has had."""
        return [p for c in self.children.values() for p in c.pids]

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
