"""The rollout worker: admit, lease, generate, score, push — for ever, across weight updates.

One asyncio process drives any number of inference servers (SGLang or the CPU server, each
reached through an ``InferenceClient``). Several workers, on one machine or many, share a run
through Redis. ``RolloutWorker`` is the wiring of its parts, each in its own module:

- ``pool``: the servers, each in one explicit state; health checks, relaunch, ``acquire``.
- ``sampler``: one group's ``n`` samples, resubmitted across aborts and dead servers, scored.
- ``updater``: weight events, coalesced and applied to every server; groups past eta cancelled.
- ``evaluator``: eval every ``rollout.eval_every`` versions.
- ``metrics``: counters and the metrics hash.
- ``ports``: what the worker needs of the run's shared state (version manager, buffer, prompt
  leases, metrics and eval records); ``parts.connect`` builds them complete.

Per group (``_run_group``): the staleness gate admits a slot (``try_admit``), a prompt is leased
(``PromptSource``), ``n`` samples are generated concurrently and scored off the event loop
(``Sampler.group``), the group is pushed (``RedisTrajectoryBuffer.put``), the slot finished and
the lease released. At most ``rollout.max_inflight_groups`` groups at a time.

Invariants (tests/integration/test_rollout_worker.py, tests/unit/rollout_workers/test_rollout_workers_worker.py):

- Every admitted slot is finished (group pushed) or handed back with a reason (reward failure,
  inference error, ``zero_variance`` (dynamic sampling), ``cancelled_stale``, ``shutdown``); a SIGKILLed worker's slots come back
  through ``reap`` and its prompts through lease expiry
  (``test_sigkill_worker_prompts_and_slots_come_back``, ``test_sigterm_exits_clean``).
- The worker never admits past the gate (``test_worker_stops_at_gate_capacity``).
- A group whose push started is finished, never handed back: a shutdown waits for the push.
- The worker heart-beats from its first heartbeat until it stops, also while it waits for its
  servers, so a live worker is never reaped (``test_the_worker_heartbeats_while_it_waits_for_
  its_servers``; tests/integration/test_worker_lifecycle.py::
  test_a_worker_whose_server_starts_late_is_never_reaped); a clean stop then leaves the
  liveness books (``VersionManager.deregister``), holding no slot.
- The trainer's end of the run (``VersionManager.mark_finished``) stops the worker, or with
  ``rollout.on_run_finished: wait`` leaves it waiting for the run to start again; a mark that
  was there before the worker started does not stop it (``test_the_end_of_the_run_stops_the_
  worker``, ``test_a_run_finished_before_the_worker_started_is_waited_on``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from buffer.schema import TrajectoryGroup
from inference.protocol import InvalidInputError, SGLangClientError
from rollout_workers.config import RolloutConfig
from rollout_workers.dynamic import ZERO_VARIANCE, filtering_on, zero_variance
from rollout_workers.episodes import episode_runner
from rollout_workers.evaluator import Evaluator
from rollout_workers.inflight import InFlight
from rollout_workers.metrics import Counters, worker_metrics
from rollout_workers.parts import RunInfo, WorkerParts, connect
from rollout_workers.pool import Server, ServerPool, Shutdown, check_servers
from rollout_workers.prompts import Lease
from rollout_workers.rewards import RewardRunner, resolve_reward_fn
from rollout_workers.sampler import GroupRejected, Sampler, trajectory_group
from rollout_workers.tasks.base import Task
from rollout_workers.updater import UpdateRecord, WeightUpdater
from staleness.records import RunFinished

log = logging.getLogger("sluice.rollout")

BG_STOP_S = 5.0
"""How long shutdown waits for a cancelled background loop to end."""
RUN_END_POLL_S = 2.0
"""How often the worker reads the run's finished mark (``VersionManager.run_finished``)."""


def _loopback(url: str) -> bool:
    """Whether ``url`` names this host by a loopback address."""
    import ipaddress
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _check(run: RunInfo, max_groups: int | None, servers: list[Server]) -> None:
    """Settings the worker refuses before it connects to anything."""
    check_servers(servers)
    if not run.model_path:
        raise ValueError(
            "model.path is empty: the worker needs the version-0 weights. Create a model with "
            "`sluice model init DIR --task NAME` and set model.path=DIR"
        )
    if max_groups is not None and max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")


class RolloutWorker:
    """``await (await RolloutWorker.open(...)).run()``; ``request_stop()`` (or SIGTERM through
    the CLI) ends it cleanly. ``servers`` are ``pool.Server`` records (``pool.make_servers``)."""

    def __init__(
        self,
        parts: WorkerParts,
        servers: list[Server],
        rc: RolloutConfig,
        task: Task,
        run: RunInfo,
        *,
        worker_id: str,
        max_groups: int | None = None,
    ) -> None:
        _check(run, max_groups, servers)
        self.parts = parts
        self.pool = ServerPool(servers)
        self.rc = rc
        self.task = task
        self.run_info = run
        self.worker_id = worker_id
        self.max_groups = max_groups
        self.counters = Counters()
        self.groups = InFlight()
        """Groups in flight -> their admission version."""
        self.status = "starting"
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._bg: list[asyncio.Task[None]] = []
        self._crash: BaseException | None = None
        self._started = time.monotonic()
        self._run_end: RunFinished | None = None
        """The run's finished mark as this worker last read it."""
        self.run_finished: RunFinished | None = None
        """Set when this worker stops because the trainer ended the run."""
        self.updater = WeightUpdater(
            self.pool,
            parts.versions,
            self.groups,
            self.counters,
            worker_id=worker_id,
            model_path=run.model_path,
            update_mode=rc.update_mode,
            store_update=parts.records.store_update,
            wake=self._wake.set,
            on_serving=self._serving,
        )
        self.sampler = Sampler(
            self.pool,
            rc,
            RewardRunner(
                resolve_reward_fn(task, rc.reward_fn),
                timeout_s=rc.reward_timeout_s,
                processes=rc.reward_processes,
                decode=task.decode,
            ),
            self.counters,
            seed=run.seed,
            eos_token_id=task.eos_token_id,
            max_new_tokens=rc.max_new_tokens or task.max_new_tokens,
            on_interrupted=self.updater.note_interrupted,
            output_length=task.output_length,
            stop_token_ids=task.stop_token_ids,
        )
        self.episodes = episode_runner(task, rc, self.sampler)
        """``rollout.episode``'s runner, or None: one sample per row (``Sampler.group``)."""
        self.filter_zero_variance = filtering_on(rc.dynamic_sampling, task.decode([]) is not None)
        """Dynamic sampling (``rollout.dynamic_sampling``): drop zero-variance groups."""
        self.evaluator = Evaluator(
            parts.evals, self.sampler, task, rc, self.counters, worker_id=worker_id
        )

    @classmethod
    async def open(
        cls,
        servers: list[Server],
        rc: RolloutConfig,
        task: Task,
        run: RunInfo,
        *,
        worker_id: str | None = None,
        max_groups: int | None = None,
    ) -> RolloutWorker:
        """Connect to the run (``connect``) and build the worker; ``run`` closes it."""
        _check(run, max_groups, servers)
        wid = worker_id or default_worker_id()
        parts = await connect(run, wid, task.prompts("train"), rc)
        return cls(parts, servers, rc, task, run, worker_id=wid, max_groups=max_groups)

    # ------------------------------------------------------------------ views
    @property
    def servers(self) -> list[Server]:
        return self.pool.servers

    @property
    def version(self) -> int:
        """The weights this worker's servers serve (or are being brought to)."""
        return self.updater.version

    @property
    def updates(self) -> list[UpdateRecord]:
        return self.updater.updates

    @property
    def inflight_groups(self) -> int:
        return len(self.groups)

    def inflight_requests(self) -> int:
        return self.pool.inflight_requests()

    def metrics(self) -> dict[str, Any]:
        return worker_metrics(
            worker_id=self.worker_id,
            status=self.status,
            version=self.version,
            counters=self.counters,
            inflight_groups=len(self.groups),
            started=self._started,
            servers=self.pool.servers,
        )

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        """Stop admitting and shut down (safe from a signal handler on the loop)."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> int:
        """Run until ``request_stop`` or ``max_groups`` pushed; returns groups pushed. Closes
        the worker's connections and clients when it returns."""
        try:
            await self._start()
            await self._admission_loop()
            if self._following():
                await self._follow()
        finally:
            await self._shutdown()
        if self._crash is not None:
            raise self._crash
        return self.counters.groups_pushed

    async def _start(self) -> None:
        vs = self.parts.versions
        await vs.heartbeat(self.worker_id, self.rc.heartbeat_ttl_s)
        self._run_end = await vs.run_finished()  # before housekeeping compares marks with it
        # From here until it stops, the worker heart-beats: one waiting for its servers (or
        # loading weights) is alive and must not be reaped.
        self._spawn("housekeeping", self._housekeeping)
        if self._run_end is not None:
            log.warning(
                "worker %s: run %s finished at step %d before this worker started: it waits "
                "until a trainer starts the run again (`sluice train --resume`)",
                self.worker_id,
                self.run_info.name,
                self._run_end.step,
            )
        if self.run_info.distributed:
            await vs.register_sync_servers(self.worker_id, self.pool.urls())
        elif self.run_info.ipc:
            offered = self.pool.launched_urls()
            if self.rc.ipc_given_servers:
                offered += [u for u in self.pool.urls() if u not in offered and _loopback(u)]
            if not offered:
                log.warning(
                    "worker %s: trainer.weight_sync=ipc, but this worker launched no server "
                    "(--servers): its servers get each version from the disk copies only "
                    "(trainer.disk_every); use --launch on the trainer's host, or "
                    "rollout.ipc_given_servers for servers on this host you started",
                    self.worker_id,
                )
            await vs.register_sync_servers(
                self.worker_id,
                offered,
                kind="ipc",
                host=socket.gethostname(),
                tp_size=self.run_info.tp_size,
            )
        await self.updater.start()
        log.info(
            "worker %s: run %s, task %s, %d server(s), loading weights v%d (%s)",
            self.worker_id,
            self.run_info.name,
            self.task.name,
            len(self.pool.servers),
            self.version,
            self.updater.weights.location,
        )
        await self.pool.wait_for_a_server(self.rc.server_wait_s, self._stop)
        if self._stop.is_set():  # stopped while waiting: nothing admitted yet
            return
        await asyncio.gather(*(self.updater.bring_up(s) for s in self.pool.servers if s.alive))
        if not self.pool.live():
            raise RuntimeError(
                "no inference server could load the run's weights "
                f"(v{self.version} from {self.updater.weights.location}); see the log above"
            )
        self.status = "running"
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "watch_events": self.updater.watch_events,
            "updater": self.updater.run,
            "health_loop": lambda: self.pool.health_loop(self.rc.health_interval_s, self.updater),
        }
        for name, fn in loops.items():
            self._spawn(name, fn)
        self.evaluator.maybe_start(self.version)

    def _spawn(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """A guarded background loop that runs until the shutdown cancels it."""
        self._bg.append(asyncio.create_task(self._guard(name, fn), name=name))

    async def _guard(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop; if it crashes, stop the worker and re-raise from ``run``."""
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("worker %s: %s crashed", self.worker_id, name)
            self._crash = e
            self.request_stop()

    def _serving(self, version: int) -> None:
        self.evaluator.maybe_start(version)

    async def _shutdown(self) -> None:
        self.status = "stopping"
        self.pool.close()
        self.evaluator.stopped = True
        self._wake.set()
        t0 = time.monotonic()
        if len(self.groups) or self.evaluator.tasks:
            await self.pool.abort_requests(timeout=2.0)
            pending = self.groups.tasks() | self.evaluator.tasks
            if pending:
                await asyncio.wait(pending, timeout=self.rc.shutdown_grace_s)
            for t in self.groups.tasks() | self.evaluator.tasks:
                t.cancel()
            rest = self.groups.tasks() | self.evaluator.tasks
            if rest:
                await asyncio.wait(rest, timeout=5.0)
        for t in self._bg:
            t.cancel()
        if self._bg:
            _, stuck = await asyncio.wait(self._bg, timeout=BG_STOP_S)
            for t in stuck:  # it ignored the cancel; the exit goes on without it
                log.error(
                    "worker %s: %s did not stop %.0fs after its cancel",
                    self.worker_id,
                    t.get_name(),
                    BG_STOP_S,
                )
        self.status = "stopped"
        final = self.metrics()
        with contextlib.suppress(Exception):
            await self.parts.records.write_metrics(final)
        await self._deregister()
        log.info(
            "worker %s stopped in %.2fs: %s",
            self.worker_id,
            time.monotonic() - t0,
            json.dumps(final),
        )
        self.sampler.rewards.close()
        if self.episodes is not None:
            await self.episodes.close()
        if self.run_info.distributed or self.run_info.ipc:
            with contextlib.suppress(Exception):
                await self.parts.versions.unregister_sync_servers(self.pool.urls())
        await self.pool.close_clients()
        await self.parts.close()

    def _following(self) -> bool:
        return (
            self.rc.after_max_groups == "follow"
            and self.max_groups is not None
            and not self._stop.is_set()
            and self._crash is None
        )

    async def _follow(self) -> None:
        """``after_max_groups: follow``: generate nothing more, keep the updater loading each
        new version (its loops run on) until a stop or the run's finished mark."""
        log.info("worker %s: following weight versions (after_max_groups=follow)", self.worker_id)
        vs = self.parts.versions
        while not self._stop.is_set() and self._crash is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)
            if await vs.run_finished() is not None:
                break

    # ------------------------------------------------------------------ admission
    def _room(self) -> int:
        room = self.rc.max_inflight_groups - len(self.groups)
        if self.max_groups is not None:
            room = min(room, self.max_groups - self.counters.groups_pushed - len(self.groups))
        return room

    async def _admission_loop(self) -> None:
        vs = self.parts.versions
        backoff = 0.02
        while not self._stop.is_set():
            self._wake.clear()
            if self.max_groups is not None and self.counters.groups_pushed >= self.max_groups:
                break
            room = self._room()
            if room <= 0:
                await self._wake.wait()
                continue
            adm = await vs.admit(self.worker_id, room)
            k = adm.slots
            if k == 0:
                t0 = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff)
                self.counters.gate_blocked_s += time.monotonic() - t0
                self.counters.gate_waits += 1
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.02
            version = adm.version  # the gate's version when it admitted them, same step
            await self.updater.catch_up_to(version)
            for _ in range(k):
                t = asyncio.create_task(self._run_group(version))
                self.groups.add(t, version)
                t.add_done_callback(self._group_done)
        if self.max_groups is not None and not self._stop.is_set():
            log.info("worker %s: pushed %d groups (--max-groups)", self.worker_id, self.max_groups)

    def _group_done(self, t: asyncio.Task[None]) -> None:
        self.groups.done(t)
        self._wake.set()
        if not t.cancelled() and t.exception() is not None and self._crash is None:
            self._crash = t.exception()
            self._stop.set()

    async def _run_group(self, admission_version: int) -> None:
        admitted_at = time.time()
        lease: Lease | None = None
        tally = [0]  # tokens generated for this group so far (wasted if it is handed back)

        async def hand_back(reason: str, detail: str, requeue: bool) -> None:
            await self._hand_back(
                reason, detail, lease, requeue, version=admission_version, tokens=tally[0]
            )

        try:
            lease = await self.parts.prompts.lease()
            group_id = uuid.uuid4().hex
            if self.episodes is not None:
                outs, rewards = await self.episodes.group(
                    lease.prompt, group_id, admission_version, tally=tally
                )
            else:
                outs, rewards = await self.sampler.group(
                    lease.prompt, group_id, admission_version, tally=tally
                )
            if self.filter_zero_variance and zero_variance(rewards):
                await self._filtered(lease, rewards, admission_version)
                return
            group = trajectory_group(
                run=self.run_info.name,
                worker_id=self.worker_id,
                task=self.task.name,
                lease=lease,
                group_id=group_id,
                admission_version=admission_version,
                admitted_at=admitted_at,
                outs=outs,
                rewards=rewards,
            )
            # Push, finish and release as one unit that a shutdown does not cut in half: once
            # the push started, the slot is finished, never rejected.
            push = asyncio.ensure_future(self._push(group, lease))
            try:
                await asyncio.shield(push)
            except asyncio.CancelledError:
                await push
        except GroupRejected as e:
            await hand_back(e.reason, e.detail, requeue=False)
        except (Shutdown, asyncio.CancelledError):
            if self.groups.cancelled_stale(asyncio.current_task()) and not self.pool.closed:
                await hand_back(
                    "cancelled_stale",  # apart from the trainer's drops ("stale"): never pushed
                    f"admitted at v{admission_version}, run now at v{self.groups.cancel_version}:"
                    " past eta",
                    requeue=True,
                )
            else:
                await hand_back("shutdown", "worker stopping", requeue=True)
        except (SGLangClientError, InvalidInputError) as e:
            await hand_back("inference_error", str(e), requeue=False)
        except Exception as e:
            await hand_back("worker_error", repr(e), requeue=True)
            raise

    async def _push(self, group: TrajectoryGroup, lease: Lease) -> None:
        await self.parts.buffer.put(group)
        await self.parts.versions.finish(
            self.worker_id, 1, version=group.admission_version, tokens=group.num_output_tokens
        )
        await self.parts.prompts.release(lease)
        c = self.counters
        c.groups_pushed += 1
        c.samples += group.n
        c.tokens_out += group.num_output_tokens
        if c.groups_pushed % self.rc.log_every == 0:
            sys.stderr.write(json.dumps({"event": "rollout_metrics", **self.metrics()}) + "\n")
            sys.stderr.flush()

    async def _filtered(self, lease: Lease, rewards: list[float], admission_version: int) -> None:
        """Dynamic sampling: a zero-variance group is not pushed; its slot is handed back
        (``zero_variance``, with its admission version for the gate's in-flight book), its
        prompt is done for this epoch, and it is counted here and in the run's totals
        (``RedisRecords.count_filtered``, read by the trainer per step). Its tokens are not
        counted as waste: filtering is chosen, and ``staleness.eta: auto`` raises eta on waste."""
        self.counters.filtered_groups += 1
        await self.parts.records.count_filtered(len(rewards), float(sum(rewards)))
        await self._hand_back(
            ZERO_VARIANCE,
            f"all {len(rewards)} rewards are {rewards[0]}",
            lease,
            requeue=False,
            version=admission_version,
        )

    async def _hand_back(
        self,
        reason: str,
        detail: str,
        lease: Lease | None,
        requeue: bool,
        *,
        version: int | None = None,
        tokens: int = 0,
    ) -> None:
        c = self.counters
        c.groups_rejected += 1
        c.wasted_tokens += tokens
        c.rejected_by[reason] = c.rejected_by.get(reason, 0) + 1
        quiet = reason in ("shutdown", ZERO_VARIANCE)
        log.log(
            logging.DEBUG
            if reason == ZERO_VARIANCE
            else logging.INFO
            if quiet
            else logging.WARNING,
            "worker %s: group rejected reason=%s prompt=%s detail=%s",
            self.worker_id,
            reason,
            lease.prompt.id if lease else None,
            detail,
        )
        await self.parts.versions.reject(self.worker_id, 1, reason, version=version, tokens=tokens)
        if lease is not None:
            await self.parts.prompts.release(lease, requeue=requeue)

    # ------------------------------------------------------------------ liveness
    async def _housekeeping(self) -> None:
        """From the first heartbeat until the shutdown: heartbeat, reaping dead workers, the
        run's finished mark, lease renewal and metrics, each when due."""
        vs, rc = self.parts.versions, self.rc
        hb_every = rc.heartbeat_ttl_s / 3
        lease_every = rc.lease_ttl_s / 3
        tick = min(hb_every, lease_every, rc.metrics_interval_s, RUN_END_POLL_S, 1.0)
        last_hb = last_lease = last_metrics = last_end = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last_hb >= hb_every:
                await vs.heartbeat(self.worker_id, rc.heartbeat_ttl_s)
                if await vs.reap():
                    self._wake.set()
                last_hb = now
            if now - last_end >= RUN_END_POLL_S:
                await self._follow_run_end()
                last_end = now
            if now - last_lease >= lease_every:
                await self.parts.prompts.renew_all()
                last_lease = now
            if now - last_metrics >= rc.metrics_interval_s:
                await self.parts.records.write_metrics(self.metrics())
                last_metrics = now

    async def _follow_run_end(self) -> None:
        """Read the run's finished mark: a new one (the trainer ended the run while this
        worker ran) stops the worker, or with ``rollout.on_run_finished: wait`` is only
        logged; a removed one (a trainer started the run again) is logged."""
        mark = await self.parts.versions.run_finished()
        if mark == self._run_end:
            return
        self._run_end = mark
        name = self.run_info.name
        if mark is None:
            log.info("worker %s: run %s started again", self.worker_id, name)
        elif self.rc.on_run_finished == "exit":
            log.info("run %s finished at step %d: worker exits", name, mark.step)
            self.run_finished = mark
            self.request_stop()
        else:
            log.info(
                "run %s finished at step %d: worker waits for it to start again "
                "(rollout.on_run_finished=wait)",
                name,
                mark.step,
            )

    async def _deregister(self) -> None:
        """Leave the liveness books once every slot is handed back or finished, so the run
        sees a stopped worker, not a dead one (a holder is left for ``reap``)."""
        try:
            held = await self.parts.versions.deregister(self.worker_id)
        except Exception as e:  # Redis gone: the heartbeat expires and reap cleans up
            log.warning("worker %s: could not deregister (%s)", self.worker_id, e)
            return
        if held:
            log.warning(
                "worker %s still holds %d slot(s) at exit: reap hands them back after %.0fs",
                self.worker_id,
                held,
                self.rc.heartbeat_ttl_s,
            )
