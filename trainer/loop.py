"""The trainer process: read groups, drop over-stale ones, step, publish, checkpoint, ack.

Per step ``N`` the trainer

1. takes its share of ``batch_groups`` groups (a blocking read of the consumer group, or a
   recorded step being replayed after a crash: ``trainer.resume``);
2. records the step in the ledger *before* training it (``trainer.ledger``): the groups and
   the version they are judged and trained at;
3. drops the groups the staleness rule rejects: ``staleness.gate.group_staleness(version,
   group)`` past eta (``past_eta``: reason "stale") or negative (a token newer than the trainer:
   "future_version"); ``VersionManager.drop`` then an immediate ack, so a dropped group is never
   replayed; the record notes them (``trainer.data``; ``tests/integration/test_trainer.py::
   test_stale_groups_are_dropped_counted_and_never_trained``);
4. takes one optimizer step on the rest (``trainer.step.train_step``);
5. every ``publish_every`` steps publishes version ``V+1`` from rank 0 through the
   ``weights.publish`` transport ``trainer.weight_sync`` names (disk or distributed);
6. every ``checkpoint_every`` steps (and on SIGTERM, ``max_steps``, ``reward_target``) writes
   a checkpoint, then commits it in the ledger: in ONE Redis transaction the groups of the
   steps it covers are acked, the pointer is set and those step records are deleted.

So a group is acked iff a committed checkpoint contains its update: exactly once across crashes
(``trainer.ledger``, ``trainer.resume``, ``tests/integration/test_trainer_crash.py``).

``open_trainer`` has every part built complete (``trainer.parts``: connections, ledger, model,
optimizer, state, group reader, publisher) and hands them to ``Trainer``, which only runs the
loop. Metrics: ``trainer.metrics``; fault injection: ``trainer.crash``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from staleness.auto_eta import EtaController, StepSample
from staleness.gate import group_staleness
from staleness.version_manager import Waste
from trainer.batch import samples_from_groups
from trainer.checkpoint import CheckpointSnapshot, snapshot_checkpoint, write_checkpoint
from trainer.config import TrainerArgs, TrainerConfig, TrainerError
from trainer.crash import crash_if
from trainer.data import Judged
from trainer.ledger import Covered, StepBatch, covered_by
from trainer.metrics import (
    HIST,
    Phases,
    StepCounts,
    StepRecord,
    device_peak_flops,
    eval_event,
    filtered_fields,
    hist_bucket,
    perf_fields,
    progress_record,
    step_row,
    trained_staleness_max,
    write_event,
    write_step,
)
from trainer.parts import TrainerParts, open_parts, publish_dtype
from trainer.step import DistInfo, StepStats, train_step
from trainer.tracking import Trackers
from weights.disk import model_files, prune
from weights.publish import model_bytes

__all__ = ["Trainer", "TrainerError", "open_trainer", "run_trainer"]

log = logging.getLogger("sluice.trainer")


class StopRequest:
    """Set by SIGTERM/SIGINT: the loop finishes the step, checkpoints and returns."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        if not self.requested:
            log.warning("stop requested: finishing the step, then checkpointing")
        self.requested = True


class Trainer:
    """One trainer process (one rank under torchrun): ``await (await open_trainer(...)).run()``."""

    def __init__(
        self,
        tc: TrainerConfig,
        args: TrainerArgs,
        parts: TrainerParts,
        *,
        max_steps: int | None,
        dist: DistInfo,
        stop: StopRequest,
    ) -> None:
        self.tc = tc
        self.args = args
        self.dist = dist
        self.max_steps = max_steps if max_steps is not None else tc.max_steps
        self.stop = stop
        self.vm, self.buf, self.ledger = parts.vm, parts.buf, parts.ledger
        self.reader, self.publisher = parts.reader, parts.publisher
        self.device, self.clock, self.crash_at = parts.device, parts.clock, parts.crash_at
        self.model = parts.restored.model
        self.optimizer = parts.restored.optimizer
        self.scheduler = parts.restored.scheduler
        self.st = parts.restored.state
        self.ckpt_dir = args.run_dir / "checkpoints"
        self.metrics_path = args.run_dir / "metrics.jsonl"
        self.pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)
        self._ckpt_task: asyncio.Task[None] | None = None
        self.phases = Phases()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.model_bytes = model_bytes(self.model, publish_dtype(tc.publish_dtype, self.device))
        """One full-weight update's bytes (base weights, in the published dtype)."""
        self.peak_flops = device_peak_flops(self.device, tc.peak_tflops)
        self.records = parts.records if dist.rank == 0 else None
        self._filtered_base: tuple[float, float, float] | None = None
        """The run's filtered totals at the previous step (``_filtered_since_last``)."""
        self.model_files = model_files(parts.model_dir)
        """The starting model's non-weight files, copied into every checkpoint's ``model/``."""
        self.last_row: dict[str, Any] | None = None
        self.eta = args.eta
        """The run's eta as the loop last read it (``sluice run set-eta`` and ``eta: auto``
        change it live)."""
        self.auto: EtaController | None = None
        """Rank 0 with ``staleness.eta: auto``: picks the run's eta from the steps."""
        self.lowering: tuple[int, int, dict[str, Any], int] | None = None
        """A lowering of eta in progress: (new eta, the version from which it is the bound,
        the measurements behind it, the version admission narrowed at)."""
        self._lowering_bound = args.eta
        """The bound when the lowering began (another value later: someone ran set-eta)."""
        self.trackers = Trackers([])
        """TensorBoard / W&B (``trainer.trackers``), opened on rank 0 by ``open_trackers``."""

    def open_trackers(self) -> None:
        """Rank 0: start the sinks ``trainer.trackers`` names (``trainer.tracking``)."""
        if self.dist.rank != 0:
            return
        self.trackers = Trackers.open(
            list(self.tc.trackers),
            self.args.run_dir,
            self.args.run_name,
            wandb_project=self.tc.wandb_project,
            wandb_mode=self.tc.wandb_mode,
            wandb_entity=self.tc.wandb_entity,
            config={"trainer": self.tc.model_dump(mode="json"), "run": self.args.run_name},
        )

    async def _track(self, row: dict[str, Any]) -> None:
        """Rank 0: the step's row and the workers' summed counters to the sinks."""
        if not self.trackers.sinks or self.records is None:
            return
        workers = await self.clock(self.records.worker_metrics())
        self.trackers.log_step(row, workers)

    async def close(self) -> None:
        self.trackers.close()
        await self.buf.close()
        await self.vm.close()

    def crash_hook(self, point: str, step: int | None = None) -> None:
        """SIGKILL this process if ``SLUICE_TRAINER_CRASH_AT`` names ``point`` of this step."""
        crash_if(self.crash_at, point, self.st.step + 1 if step is None else step)

    def _reduce(self, values: list[float], op: str = "sum") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.dist.enabled:
            import torch.distributed as td

            td.all_reduce(t, op=td.ReduceOp.SUM if op == "sum" else td.ReduceOp.MAX)
        return [float(x) for x in t.tolist()]

    def _barrier(self) -> None:
        if self.dist.enabled:
            import torch.distributed as td

            td.barrier()

    # ------------------------------------------------------------------ publish / checkpoint
    async def _publish(self) -> None:
        """Rank 0 publishes ``V+1``; every rank bumps its version."""
        v = self.st.version + 1
        model: Any = self.model
        if self.tc.parallel == "fsdp":  # every rank gathers; rank 0 keeps the full weights
            from trainer.fsdp import full_weights
            from trainer.parts import publish_dtype

            model = full_weights(
                model, publish_dtype(self.tc.publish_dtype, self.device), self.dist.rank
            )
        if self.dist.rank == 0:
            sent = await self.publisher.publish(v, model)
            self.phases.publish_bytes = sent if isinstance(sent, int) else None
        self.st.version = v
        self.st.weights_version = v

    async def _checkpoint(self) -> None:
        """Write the checkpoint, then commit it in the ledger (ack + pointer, one transaction)."""
        t0 = time.monotonic()
        try:
            await self._checkpoint_now()
        finally:
            self.phases.checkpoint_s += time.monotonic() - t0

    async def _checkpoint_now(self) -> None:
        n = self.st.step
        self._barrier()  # every rank has recorded (and trained) step n
        gathered = None
        if self.tc.parallel == "fsdp":  # every rank gathers; rank 0 keeps the full state
            from trainer.fsdp import checkpoint_tensors

            gathered = checkpoint_tensors(self.model, self.optimizer, self.dist.rank)
        if self.dist.rank == 0:
            await self._commit_checkpoint(n, gathered)
        self.st.ckpt_step = n
        self._barrier()

    async def _commit_checkpoint(self, n: int, gathered: Any = None) -> None:
        """Snapshot step ``n`` to host memory, then write it and commit it in the ledger: in
        the background with ``trainer.async_checkpoint`` on one rank (training goes on while
        the files are written; the groups are acked only once the checkpoint is durable, so a
        crash before that replays them), else before returning."""
        await self.wait_checkpoint()  # one write in flight at a time; its failure raises here
        records = [await self.clock(self.ledger.records(r)) for r in range(self.dist.world_size)]
        covered = covered_by(records, n)
        dest = self.ckpt_dir / f"step-{n:08d}"
        version = self.st.version
        snap = snapshot_checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={
                "step": n,
                "version": version,
                "weights_version": self.st.weights_version,
                "dropped_total": self.st.dropped_total,
                "groups": covered.groups,
                "prev": self.st.ckpt_path or None,
                "prev_step": self.st.ckpt_step,
                "consumer": self.tc.consumer,
                "world_size": self.dist.world_size,
                "time": time.time(),
            },
            model_files=self.model_files,
            gathered=gathered,
        )
        write = self._write_and_commit(snap, dest, covered, n, version)
        if self.tc.async_checkpoint and not self.dist.enabled:
            self._ckpt_task = asyncio.create_task(write, name=f"checkpoint-{n}")
        else:
            await write

    async def _write_and_commit(
        self, snap: CheckpointSnapshot, dest: Path, covered: Covered, n: int, version: int
    ) -> None:
        def crash(point: str) -> None:  # the checkpoint's own step, not the trainer's current
            crash_if(self.crash_at, point, n)

        await asyncio.to_thread(write_checkpoint, snap, dest, crash)
        crash("before_commit")
        path = str(dest.resolve())
        await self.clock(self.ledger.commit(covered, path=path, step=n, version=version))
        self.st.ckpt_path = path
        prune(self.ckpt_dir, "step-", self.tc.keep_checkpoints, protect=dest)
        log.info("checkpoint step %d committed (%d groups acked)", n, len(covered.groups))

    async def wait_checkpoint(self) -> None:
        """Wait for the checkpoint being written in the background, if any (and raise its
        error)."""
        task, self._ckpt_task = self._ckpt_task, None
        if task is not None:
            await task

    # ------------------------------------------------------------------ the loop
    async def run(self) -> int:
        """Train until ``max_steps``, ``reward_target`` or SIGTERM; returns steps taken now."""
        await self.reader.settle_dead_letters()
        if self.dist.rank == 0:  # a run trained again is not finished (workers go on)
            await self.vm.clear_finished()
        await self._progress("running")
        await self._start_auto()
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        train_model: Any = self.model
        if self.dist.enabled and self.tc.parallel == "ddp":  # fsdp: sharded when loaded
            from torch.nn.parallel import DistributedDataParallel as DDP

            cuda = self.device.type == "cuda"
            train_model = DDP(self.model, device_ids=[self.device.index] if cuda else None)
        # Under torchrun, a rank with fewer recorded steps than another reads new groups
        # while the other replays: each rank's share is still trained exactly once.
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        taken = 0
        reached = False
        t_start = time.time()
        while self.st.step < self.max_steps:
            self.eta = await self.clock(self.ledger.eta())
            narrowed = None if self.lowering is None else (self.lowering[3], self.lowering[0])
            batch = await self.reader.next_batch(self.eta, narrowed)
            stop = self._reduce([1.0 if (self.stop.requested or batch is None) else 0.0], "max")
            if stop[0] or batch is None:
                break
            reward = await self._step(batch, train_model, t_start)
            if reward is None:
                continue
            taken += 1
            n = self.st.step
            target = self.tc.reward_target
            reached_target = target is not None and reward >= target
            last = n >= self.max_steps or reached_target
            if last and self.st.weights_version is None:
                await self._publish()
            if n % self.tc.checkpoint_every == 0 or last:
                await self._checkpoint()
            if reached_target:
                log.info("reward %.4f reached reward_target %s", reward, target)
                reached = True
                break
            if self.stop.requested:
                break
        if self.st.step > self.st.ckpt_step:
            if self.st.weights_version is None:
                await self._publish()
            await self._checkpoint()
        await self.wait_checkpoint()
        if self.dist.rank == 0 and (reached or self.st.step >= self.max_steps):
            await self.vm.mark_finished(self.st.step)  # the run's workers exit (or wait)
        await self._copy_evals()
        await self._progress("finished" if self._ended() else "stopped")
        return taken

    async def _start_auto(self) -> None:
        """Rank 0 with ``eta: auto``: mark the run's eta as auto (``sluice status``) and start
        the controller from the run's eta now."""
        settings = self.args.eta_auto
        if settings is None or self.dist.rank != 0:
            return
        eta = await self.clock(self.ledger.eta())
        self.auto = EtaController(settings, eta)
        await self.clock(self.vm.set_eta_auto(settings.as_dict()))
        if self.auto.eta != eta:  # the run's eta was above eta_max
            await self.clock(self.vm.set_eta(self.auto.eta, why={"rule": "clamp to eta_max"}))
        log.info("eta: auto (%s), starting at %d", settings.as_dict(), self.auto.eta)

    async def _tune_eta(self, step_s: float, batch: StepBatch, waste: Waste | None) -> None:
        """Rank 0 with ``eta: auto``: feed the step to the controller and apply its decision
        (logged in the run's eta changes with its measurements, and in metrics.jsonl). A
        rise applies at once; a lowering narrows admission first and lowers the bound only
        once every group admitted before is past the old eta's reach (``narrow_admission``),
        so lowering eta expires no group that was admitted under the higher one."""
        if self.auto is None or waste is None:
            return
        if self.lowering is not None and self.eta != self._lowering_bound:
            self.lowering = None  # `sluice run set-eta` during a lowering: the user's eta wins
        if self.lowering is None and self.auto.eta != self.eta:  # `sluice run set-eta`
            self.auto.eta = min(self.eta, self.auto.settings.eta_max)
        if self.lowering is not None and self.st.version >= self.lowering[1]:
            new, _, why, _ = self.lowering
            self.lowering = None
            await self._apply_eta(self.eta, new, {**why, "phase": "bound"})
        decision = self.auto.observe(
            StepSample(
                step=self.st.step,
                idle_s=batch.idle_s,
                busy_s=step_s,
                hold_s=batch.hold_s,
                generated_tokens=waste.generated_tokens,
                wasted_tokens=waste.wasted_tokens,
                refused=waste.refused,
            )
        )
        if decision is None:
            return
        if decision.new > decision.old or decision.new >= self.eta:
            self.lowering = None
            await self._apply_eta(self.eta, decision.new, decision.why)
            return
        if self.lowering is not None:  # one lowering at a time: the next waits for its bound
            self.auto.eta = self.lowering[0]
            return
        # Groups admitted up to now expire at most ``version + eta`` (the bound now): from
        # the version after that, every group left was admitted under the narrower gate.
        until = self.st.version + self.eta + 1
        self.lowering = (decision.new, until, decision.why, self.st.version)
        self._lowering_bound = self.eta
        await self.clock(self.vm.narrow_admission(decision.new, why=decision.why))
        write_event(
            self.metrics_path,
            {
                "event": "eta",
                "admit": decision.new,
                "bound": self.eta,
                "bound_from_version": until,
                **decision.why,
            },
        )
        log.info(
            "eta: auto: admission at %d now, the bound %d -> %d from version %d (%s)",
            decision.new,
            self.eta,
            decision.new,
            until,
            decision.why,
        )

    async def _apply_eta(self, old: int, new: int, why: dict[str, Any]) -> None:
        await self.clock(self.vm.set_eta(new, why=why))
        self.eta = new
        write_event(self.metrics_path, {"event": "eta", "from": old, "to": new, **why})
        log.info("eta: auto: %d -> %d (%s)", old, new, why)

    def _ended(self) -> bool:
        """Whether this trainer ended the run (``max_steps``, or its last step reached
        ``reward_target``) rather than stopped (SIGTERM, no more data)."""
        target, row = self.tc.reward_target, self.last_row
        reward = None if row is None else row.get("reward_mean_all", row["reward_mean"])
        reached = target is not None and reward is not None and reward >= target
        return reached or self.st.step >= self.max_steps

    async def _step(self, batch: StepBatch, train_model: Any, t_start: float) -> float | None:
        """Record, judge, train, publish when due and log step ``N``; returns its mean reward,
        or None when every group (on every rank) was dropped and nothing was trained."""
        t0 = time.monotonic()
        n = self.st.step + 1
        await self.clock(self.ledger.record(n, batch))
        eta = self.eta
        judged = await self.reader.judge(batch, eta)
        if judged.dropped:
            await self.clock(self.ledger.record(n, batch, judged.dropped))
        self.st.dropped_total += int(self._reduce([len(judged.dropped)])[0])
        samples = samples_from_groups(
            [d.group for d in judged.kept], normalize_std=self.tc.normalize_adv_std
        )
        if self._reduce([len(samples)])[0] == 0:
            log.warning("step %d: every group was dropped; no update", n)
            await self.ledger.forget(n)
            return None
        t_train = time.monotonic()
        stats = train_step(
            train_model,
            self.optimizer,
            self.scheduler,
            samples,
            self.tc,
            temperature=self.args.temperature,
            pad_id=self.pad_id,
            device=self.device,
            current_version=self.st.weights_version,
            dist=self.dist,
            crash_hook=self.crash_hook,
        )
        self.phases.train_s = time.monotonic() - t_train  # the stats read back: synced
        self.phases.seq_tokens = sum(s.length for s in samples)
        self.st.step = n
        self.st.weights_version = None
        self.crash_hook("after_step", n)
        t_pub = time.monotonic()
        if n % self.tc.publish_every == 0:
            await self._publish()
        self.phases.publish_s = time.monotonic() - t_pub
        self.crash_hook("after_publish", n)
        waste = None
        if self.dist.rank == 0:
            await self.clock(self.vm.reap())
            waste = await self.clock(self.vm.waste())
        filtered = await self._filtered_since_last()
        reward_all = filtered_fields(filtered, stats.metrics["reward_mean"], stats.samples)
        turns, episodes = self._reduce([float(sum(s.turns for s in samples)), len(samples)])
        extra = {**reward_all, "turns_mean": turns / episodes}  # model turns per episode
        step_s = time.monotonic() - t0
        row = self._log_step(stats, batch, judged, step_s, t_start, eta, waste, extra=extra)
        await self._tune_eta(step_s, batch, waste)
        if row is not None:
            self.last_row = row
            await self._track(row)
            await self._copy_evals()
            await self._progress("running")
        return float(reward_all["reward_mean_all"])

    async def _filtered_since_last(self) -> tuple[float, float, float]:
        """Zero-variance groups the workers filtered since the previous step (rank 0 reads
        the run's totals; every rank gets the same numbers, so every rank takes the same
        ``reward_target`` decision). The first step of a process counts from its start."""
        now = (0.0, 0.0, 0.0)
        if self.records is not None:
            now = await self.clock(self.records.filtered_totals())
        if self._filtered_base is None:
            self._filtered_base = now
        base, self._filtered_base = self._filtered_base, now
        delta = [a - b for a, b in zip(now, base, strict=True)]
        return tuple(self._reduce(delta))  # type: ignore[return-value]

    async def _progress(self, state: str) -> None:
        """Rank 0: the trainer's summary (``trainer.metrics.progress_record``) into Redis."""
        if self.records is None:
            return
        rec = progress_record(state, self.st.step, self.max_steps, self.st.version, self.last_row)
        await self.clock(self.records.write_progress(rec))

    async def _copy_evals(self) -> None:
        """Rank 0: eval results recorded since the last look, appended to ``metrics.jsonl``."""
        if self.records is None:
            return
        for rec in await self.clock(self.records.new_evals()):
            event = eval_event(rec, self.st.step)
            write_event(self.metrics_path, event)
            self.trackers.log_eval(event)
            log.info(
                "eval v%s: greedy reward %s, sampled reward %s (%s prompts)",
                event.get("version"),
                event.get("greedy_reward"),
                event.get("sampled_reward"),
                event.get("prompts"),
            )

    def _log_step(
        self,
        stats: StepStats,
        batch: StepBatch,
        judged: Judged,
        step_s: float,
        t_start: float,
        eta: int,
        waste: Waste | None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Rank 0: the step's metrics row, written and logged (None on other ranks)."""
        arrived, dead = self.reader.take_arrivals()
        arrived_hist = [0.0] * HIST
        for a in arrived:
            arrived_hist[hist_bucket(a)] += 1
        trained_hist = [0.0] * HIST
        for d in judged.kept:
            trained_hist[hist_bucket(group_staleness(batch.version, d.group))] += 1
        counts = self._reduce(
            [
                len(batch.delivered) + len(batch.early),
                len(judged.dropped),
                batch.idle_s,
                *judged.hist,
                *arrived_hist,
                *trained_hist,
                float(dead),
                float(judged.dropped_tokens),
                float(judged.dropped_future),
            ]
        )
        tail = counts[3 + HIST :]
        counts = counts[: 3 + HIST]
        # Trained groups are never stale below 0 (those are dropped): -1 stands for "none".
        trained = trained_staleness_max(batch.version, judged.kept)
        trained_max = self._reduce([-1.0 if trained is None else float(trained)], "max")[0]
        buffer_s = self.clock.take()
        if self.dist.rank != 0:
            return None
        rec = StepRecord(
            step=self.st.step,
            version=self.st.version,
            dropped_total=self.st.dropped_total,
            batch=batch,
            kept=judged.kept,
            dropped=judged.dropped,
            step_s=step_s,
            wall_s=time.time() - t_start,
            max_steps=self.max_steps,
        )
        summed = StepCounts(
            groups=int(counts[0]),
            dropped=int(counts[1]),
            idle_s=counts[2],
            hist=counts[3:],
            staleness_max_trained=int(trained_max) if trained_max >= 0 else None,
            arrived_hist=tail[:HIST],
            trained_hist=tail[HIST : 2 * HIST],
            dead_lettered=int(tail[2 * HIST]),
            dropped_tokens=int(tail[2 * HIST + 1]),
            dropped_future=int(tail[2 * HIST + 2]),
            hold_s=batch.hold_s,
            eta=eta,
            waste=waste,
        )
        perf = perf_fields(self.phases, stats.tokens, self.params, self.peak_flops)
        perf["weights_via"] = getattr(self.publisher, "last_via", None)
        perf["model_bytes"] = self.model_bytes
        self.phases = Phases()
        row = step_row(rec, stats, summed, buffer_s, {**perf, **(extra or {})})
        write_step(self.metrics_path, row)
        return row


# ---------------------------------------------------------------------- wiring
async def open_trainer(
    tc: TrainerConfig,
    args: TrainerArgs,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    dist: DistInfo | None = None,
    stop: StopRequest | None = None,
) -> Trainer:
    """A ``Trainer`` with every part complete (``trainer.parts.open_parts``); ``TrainerError``
    if it cannot start."""
    dist = dist or DistInfo()
    stopping = stop or StopRequest()
    parts = await open_parts(tc, args, resume=resume, dist=dist, stopped=lambda: stopping.requested)
    return Trainer(tc, args, parts, max_steps=max_steps, dist=dist, stop=stopping)


def init_distributed() -> DistInfo:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (NCCL on GPU, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as td

    if not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend=backend)
    return DistInfo(rank=td.get_rank(), world_size=td.get_world_size())


async def run_trainer(
    tc: TrainerConfig,
    args: TrainerArgs,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Join torchrun's group if any, then train; SIGTERM/SIGINT finish the step, checkpoint
    and return. Returns the steps taken by this run. ``on_started`` is called on rank 0 once
    the trainer has started (connected, restored), before the first step (``sluice train``
    records the run's config then)."""
    dist = init_distributed()
    stop = StopRequest()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.request)
    loop.add_signal_handler(signal.SIGINT, stop.request)
    try:
        trainer = await open_trainer(
            tc, args, resume=resume, max_steps=max_steps, dist=dist, stop=stop
        )
        try:
            trainer.open_trackers()
            if on_started is not None and dist.rank == 0:
                on_started()
            return await trainer.run()
        finally:
            await trainer.close()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
        if dist.enabled:
            import torch.distributed as td

            td.destroy_process_group()
