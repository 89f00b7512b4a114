"""A real sluice run as OS processes, for fault injection: start, SIGKILL, restart, check.

``FaultRun`` starts a private ``redis-server`` (AOF, ``appendfsync always``), one CPU inference
server (``sluice serve``), ``workers`` rollout workers (``sluice rollout``) and one trainer
(``sluice train``), all from ONE config file, each as a child process started and stopped by
its own pid (never looked up by name). Every process logs to ``DIR/logs/NAME.N.log`` (one file
per incarnation).

A process that exits without having been killed or stopped by the harness is a failure:
``check_alive`` raises naming it with its log tail (the trainer's exit 0 at its step target is
the one expected exit).

``finish`` ends the run the way an operator would: wait for the trainer to reach its target
and exit 0, SIGTERM the workers (each must exit 0 within 30 s), SIGTERM the server, then
``audit`` reads Redis and the trainer's records and checks the invariants of
``docs/reliability.md``. ``close`` stops whatever is left and asserts nothing we started is
still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from buffer import keys
from inference.launch import cpu_server_command
from procs import (
    NotHealthy,
    ProcessExited,
    RedisServer,
    alive,
    free_port,
    kill_pid,
    log_tail,
    reap,
    spawn,
    wait_exit,
    wait_http_ok,
)

ROOT = Path(__file__).resolve().parents[2]


def make_model(directory: Path, seed: int = 1) -> Path:
    """A tiny llama for the ``reverse`` task (its vocabulary and special ids)."""
    from inference.models import init_tiny_model
    from rollout_workers.tasks import get_task

    task = get_task("reverse", n_digits=3, n_train=256, n_eval=16)
    return init_tiny_model(
        directory,
        vocab=task.vocab_size,
        layers=1,
        hidden=32,
        heads=2,
        seed=seed,
        bos_token_id=task.bos_token_id,
        eos_token_id=task.eos_token_id,
        pad_token_id=task.pad_token_id,
        init_std=0.1,
    )


class ProcessFailed(AssertionError):
    """A process exited that nobody killed or stopped; the message carries its log tail."""


@dataclass
class Proc:
    """One role (``server``, ``worker0``, ``trainer``) and its current OS process."""

    name: str
    argv: list[str]
    logs: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    expected_exit: bool = True
    """False while running: an exit now is a failure (until we kill/stop it or it may finish)."""
    history: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}.{self.incarnation}.log"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, *extra: str) -> Proc:
        assert not self.alive(), f"{self.name} is already running"
        self.incarnation += 1
        self.popen = spawn(
            [*self.argv, *extra], self.log_path, env=self.env, new_session=False, cwd=ROOT
        )
        self.history.append(self.popen)
        self.expected_exit = False
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.popen is not None and self.alive(), f"{self.name} is not running"
        self.expected_exit = True
        kill_pid(self.popen, timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait ``timeout`` s; a process still there then is SIGKILLed and reported
        as hung. Returns the exit code."""
        assert self.popen is not None
        self.expected_exit = True
        p = self.popen
        if alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        if wait_exit([p], timeout):
            # Before the SIGKILL, ask where it is stuck: every thread's stack (SIGUSR1), then
            # every asyncio task's (SIGUSR2), into its log (sluice.cli, sluice.commands).
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
                time.sleep(1.0)
            kill_pid(p, timeout=10)
            raise ProcessFailed(
                f"{self.name} (pid {p.pid}) hung: still running {timeout}s after "
                f"SIGTERM\n{log_tail(self.log_path, 150)}"
            )
        return reap(p)

    def wait_log(self, text: str, timeout: float) -> None:
        """Until the current incarnation's log contains ``text`` (or it exited)."""
        deadline = time.monotonic() + timeout
        while self.alive() and text not in self.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name}: no {text!r} in its log\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)


@dataclass
class Audit:
    """What ``FaultRun.audit`` found (every field is also checked there)."""

    steps: int
    trained: dict[str, int]
    """group id -> the optimizer step it went into."""
    dropped: set[str]
    acked: set[str]
    remaining: set[str]
    snapshot: dict[str, Any]
    dead_letter: int


class FaultRun:
    """One run in ``directory``; see the module docstring. Use as a context manager."""

    def __init__(
        self,
        directory: Path,
        *,
        steps: int = 10,
        workers: int = 2,
        batch_groups: int = 4,
        eta: int = 1,
        n_samples: int = 4,
        password: str | None = None,
        run_name: str = "faults",
        extra: dict[str, dict[str, Any]] | None = None,
        redis: Any = None,
    ) -> None:
        self.dir = directory
        self.logs = directory / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.steps = steps
        self.run_name = run_name
        # ``redis``: another Redis to run on (a ``procs.RedisCluster``), not started yet.
        self.redis = redis or RedisServer(
            directory=directory / "redis", appendonly=True, password=password
        )
        self.model = make_model(directory / "model")
        self.port = free_port()
        self.server_url = f"http://127.0.0.1:{self.port}"
        self.run_dir = directory / "run"
        conf: dict[str, dict[str, Any]] = {
            "redis": {"url": self.redis.url},
            "run": {"name": run_name, "dir": str(self.run_dir), "seed": 0},
            "staleness": {"eta": eta, "batch_groups": batch_groups},
            "model": {"path": str(self.model)},
            "task": {"name": "reverse", "options": {"n_digits": 3, "n_train": 256, "n_eval": 16}},
            "inference": {"servers": [self.server_url], "threads": 1},
            "rollout": {
                "n_samples": n_samples,
                "max_inflight_groups": 3,
                "temperature": 1.0,
                "heartbeat_ttl_s": 2.0,
                "lease_ttl_s": 3.0,
                "health_interval_s": 0.3,
                "metrics_interval_s": 0.5,
                "shutdown_grace_s": 5.0,
                "log_every": 10_000,
                "on_run_finished": "wait",  # finish() stops the workers and checks their exit
            },
            "trainer": {
                "max_steps": steps,
                "lr": 1e-3,
                "checkpoint_every": 2,
                "keep_checkpoints": 1000,
                "keep_weights": 3,
                "threads": 1,
                "reclaim_idle_ms": 60_000,
                "wait_log_s": 5.0,
            },
        }
        for section, values in (extra or {}).items():
            conf.setdefault(section, {}).update(values)
        self.config = directory / "run.yaml"
        self.config.write_text(yaml.safe_dump(conf))
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.pop("SLUICE_TRAINER_CRASH_AT", None)
        self.env = env
        sluice = [sys.executable, "-m", "sluice"]
        cfg = ["--config", str(self.config)]
        admin = conf["inference"].get("admin_api_key")
        serve = cpu_server_command(self.model, self.port, admin_api_key=admin and str(admin))
        self.server = Proc("server", serve, self.logs, env)
        self.workers = [
            Proc(f"worker{i}", [*sluice, "rollout", *cfg], self.logs, env) for i in range(workers)
        ]
        self.trainer = Proc("trainer", [*sluice, "train", *cfg], self.logs, env)
        self.events: list[tuple[float, str]] = []
        self.injected = 0
        """Entries written into the stream by the test itself (never admitted)."""
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    @property
    def procs(self) -> list[Proc]:
        return [self.server, *self.workers, self.trainer]

    def note(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self._t0, 2), what))

    def start(self) -> FaultRun:
        self.redis.start()
        self.server.start()
        self.wait_server()
        self.trainer.start()
        for w in self.workers:
            w.start()
        self.note("started")
        return self

    def wait_server(self, timeout: float = 60.0) -> None:
        self.check_alive()
        assert self.server.popen is not None
        log = self.server.log_path
        try:
            wait_http_ok(self.server_url + "/health", self.server.popen, timeout, log)
        except ProcessExited:
            self.check_alive()  # raises ProcessFailed naming the server and its log tail
            raise
        except NotHealthy:
            raise ProcessFailed(
                f"server not healthy within {timeout}s\n{self.server.tail()}"
            ) from None

    def check_alive(self) -> None:
        """Raise if a process exited that was neither killed nor stopped by us (the trainer may
        exit 0 once it reached its step target)."""
        for p in self.procs:
            if p.popen is None or p.expected_exit or p.alive():
                continue
            code = p.popen.returncode
            if p is self.trainer and code == 0 and self.trained_steps() >= self.steps:
                p.expected_exit = True
                continue
            raise ProcessFailed(f"{p.name} exited with {code} on its own:\n{p.tail()}")
        if self.redis.proc is not None and self.redis.proc.poll() is not None:
            raise ProcessFailed("redis-server exited on its own")

    def close(self) -> None:
        """Stop everything still running (by pid) and assert that nothing we started is left."""
        for p in self.procs:
            if p.alive():
                p.expected_exit = True
                assert p.popen is not None
                kill_pid(p.popen, timeout=10)
        self.redis.stop()
        for p in self.procs:
            for old in p.history:
                assert old.poll() is not None, f"{p.name} pid {old.pid} still running"

    def __enter__(self) -> FaultRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ faults
    def kill_worker(self, i: int) -> None:
        self.workers[i].kill()
        self.note(f"SIGKILL worker{i}")

    def restart_worker(self, i: int) -> None:
        self.workers[i].start()  # a fresh process gets a fresh worker id (host-pid)
        self.note(f"restart worker{i}")

    def kill_trainer(self) -> None:
        self.trainer.kill()
        self.note("SIGKILL trainer")

    def restart_trainer(self) -> None:
        self.trainer.start("--resume")
        self.note("restart trainer --resume")

    def kill_server(self) -> None:
        self.server.kill()
        self.note("SIGKILL server")

    def restart_server(self) -> None:
        self.server.start()
        self.wait_server()
        self.note("restart server (same port)")

    def kill_redis(self) -> None:
        self.redis.kill()
        self.note("SIGKILL redis")

    def restart_redis(self) -> None:
        self.redis.start()
        self.note("restart redis from AOF")

    # ------------------------------------------------------------------ progress
    def metrics(self) -> list[dict[str, Any]]:
        """The trainer's step rows of ``metrics.jsonl``."""
        p = self.run_dir / "metrics.jsonl"
        if not p.exists():
            return []
        rows = []
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a row cut short by SIGKILL mid-write
                continue
            if "event" not in row:  # step rows only (an eval result is an event line)
                rows.append(row)
        return rows

    def trained_steps(self) -> int:
        return max((int(r["step"]) for r in self.metrics()), default=0)

    def wait_steps(self, n: int, timeout: float) -> None:
        """Until the trainer has logged step ``n``; fails naming the state after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.trained_steps() < n:
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"step {n} not reached within {timeout}s (at {self.trained_steps()}); "
                    f"events {self.events}\ntrainer log:\n{self.trainer.tail()}"
                )
            time.sleep(0.1)

    def finish(self, timeout: float = 120.0) -> Audit:
        """Wait for the step target and the trainer's exit 0, stop workers and server with
        SIGTERM (each must exit 0 in time), then ``audit``."""
        self.wait_steps(self.steps, timeout)
        assert self.trainer.popen is not None
        try:
            code = self.trainer.popen.wait(60)
        except subprocess.TimeoutExpired:
            raise ProcessFailed(
                f"trainer did not exit after step {self.steps}\n{self.trainer.tail()}"
            ) from None
        self.trainer.expected_exit = True
        assert code == 0, f"trainer exited {code}\n{self.trainer.tail()}"
        self.check_alive()
        for w in self.workers:
            # A process still in interpreter start-up dies of SIGTERM before any handler can
            # exist (nothing is held then); stop workers once they are up, as an operator would.
            w.wait_log("loading weights", 60.0)
            code = w.stop(30.0)
            assert code == 0, f"{w.name} exited {code} on SIGTERM\n{w.tail()}"
        self.server.stop(30.0)
        self.note("stopped")
        return asyncio.run(self.audit())

    # ------------------------------------------------------------------ invariants
    async def audit(self) -> Audit:
        """Check the run's books (raises AssertionError naming the first broken invariant)."""
        from buffer import RedisTrajectoryBuffer, connect
        from buffer.codec import decode_group
        from buffer.redis_buffer import CONSUMER_GROUP
        from staleness import VersionManager

        rows = self.metrics()
        # 1. The step target was reached and every step number 1..N was trained.
        by_step: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            by_step.setdefault(int(r["step"]), []).append(r)
        assert sorted(by_step) == list(range(1, self.steps + 1)), sorted(by_step)
        # 2. No group id in two optimizer steps. A step repeated after a crash (replay of a
        # lost update) must repeat the same groups: only its last row survives in the model.
        trained: dict[str, int] = {}
        dropped: set[str] = set()
        for n, rs in sorted(by_step.items()):
            ids = [set(r["group_ids"]) for r in rs]
            assert all(i == ids[0] for i in ids), f"step {n} replayed with other groups: {rs}"
            assert len(rs[-1]["group_ids"]) == len(ids[0]), f"step {n} lists a group twice"
            for g in ids[0]:
                assert g not in trained, f"group {g} trained in steps {trained[g]} and {n}"
                trained[g] = n
            for r in rs:
                dropped.update(r.get("dropped_group_ids", []))
        assert not dropped & set(trained), "a group was both dropped and trained"
        # The committed checkpoint chain names the same groups (keep_checkpoints is large).
        client = await connect(self.redis.url)
        try:
            ptr = await client.hgetall(keys.trainer_checkpoint(self.run_name, "trainer-0"))
            assert int(ptr[b"step"]) == self.steps, ptr
            chain: list[str] = []
            cur: str | None = ptr[b"path"].decode()
            while cur:
                state = json.loads((Path(cur) / "state.json").read_text())
                chain += state["groups"]
                cur = state["prev"]
            assert len(chain) == len(set(chain)), "a group is in two checkpoints"
            assert set(chain) == set(trained), (
                f"checkpoints and metrics disagree: {set(chain) ^ set(trained)}"
            )
            # 3. Every pushed group is accounted for: acked (trained or dropped: the seen
            # marks), still in the stream, or dead-lettered. Pending (read, not acked) only on
            # the trainer's own consumer, and only groups it neither trained nor dropped: the
            # single-rank trainer reads ahead into a pool (trainer.data), and what the pool held
            # when the run ended stays pending there for a resume to train (plan_replay's
            # "fresh" groups).
            acked: set[str] = set()
            async for k in client.scan_iter(match=keys.seen(self.run_name, "*")):
                acked.update(g.decode() for g in await client.hkeys(k))
            buf = RedisTrajectoryBuffer(client, self.run_name, "audit")
            stats = await buf.stats()
            vm = await VersionManager.from_client(client, self.run_name)
            snap_rej = (await vm.snapshot()).rejected_by
            remaining = set()
            by_entry: dict[bytes, str] = {}
            for eid, fields in await client.xrange(keys.stream(self.run_name)):
                by_entry[eid] = decode_group(fields[b"d"]).group_id
                remaining.add(by_entry[eid])
            if stats.pending:
                rows_p = await client.xpending_range(
                    keys.stream(self.run_name), CONSUMER_GROUP, "-", "+", stats.pending
                )
                owners = {r["consumer"].decode() for r in rows_p}
                assert owners == {"trainer-0"}, f"groups pending on other consumers: {rows_p}"
                pooled = {by_entry[r["message_id"]] for r in rows_p}
                assert not pooled & (set(trained) | dropped | acked), (
                    f"pending but trained, dropped or acked: {pooled & (set(trained) | acked)}"
                )
            drops = sum(snap_rej.get(r, 0) for r in ("stale", "future_version"))
            dead = snap_rej.get("dead_letter", 0)  # slots of dead-lettered entries
            assert set(trained) | dropped <= acked, (
                f"trained or dropped but not acked: {(set(trained) | dropped) - acked}; "
                f"events {self.events}"
            )
            # Acked and not trained = dropped over-stale (a step whose groups were all dropped
            # logs no metrics row, so the gate's drop count is the witness).
            assert len(acked - set(trained)) <= drops, (len(acked - set(trained)), drops)
            assert not remaining & acked, "a group both acked and still in the stream"
            # 4. The admission counters balance; with every worker stopped nothing is in
            # flight. A SIGKILLed worker's slots come back through reap (any process runs it
            # once the heartbeat expired; the stopped workers no longer do, so we do here).
            deadline = time.monotonic() + 10
            snap = await vm.snapshot()
            while snap.inflight_total and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                await vm.reap()
                snap = await vm.snapshot()
            assert snap.admitted == snap.finished + snap.rejected + snap.inflight_total, snap
            assert snap.inflight_total == 0, f"slots still in flight: {snap.inflight}"
            pushed = len(acked | remaining) + stats.dead_letter
            # Each pushed group holds one admitted slot: finished, or (its worker was SIGKILLed
            # between push and finish) returned by reap, or counted late; drops move finished
            # slots to rejected.
            lo = snap.finished + drops + dead
            hi = lo + snap.rejected_by.get("worker_dead", 0) + snap.late + self.injected
            assert lo <= pushed <= hi, (pushed, snap.as_dict())
            unknown = set(snap.rejected_by) - {
                "stale",
                "cancelled_stale",
                "future_version",
                "worker_dead",
                "shutdown",
                "inference_error",
                "dead_letter",
            }
            assert not unknown, f"rejections for unexpected reasons: {snap.rejected_by}"
            return Audit(
                steps=self.steps,
                trained=trained,
                dropped=dropped,
                acked=acked,
                remaining=remaining,
                snapshot=snap.as_dict(),
                dead_letter=stats.dead_letter,
            )
        finally:
            await client.aclose()
