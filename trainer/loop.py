"""The trainer process: read groups, drop over-stale ones, step, publish, checkpoint, ack.

Exactly-once (``tests/test_trainer_crash.py``). Per step ``N`` the trainer

1. takes its share of ``batch_groups`` groups (a blocking read of the consumer group, or a
   recorded step being replayed after a crash);
2. records the step in Redis *before* training it: ``trainer:{consumer}:steps:r{rank}``
   field ``N`` = ``{version, entries}`` (the version the groups are judged and trained at);
3. drops groups with ``version - min(token_versions) > eta`` (``VersionManager.drop`` then an
   immediate ack: a dropped group is never replayed), and notes them in the record;
4. takes one optimizer step on the rest (``trainer.step.train_step``);
5. every ``publish_every`` steps writes ``weights/v{V+1}`` atomically and publishes it;
6. every ``checkpoint_every`` steps (and on SIGTERM, ``max_steps``, ``reward_target``) writes
   a checkpoint, then in ONE Redis transaction acks every group of the steps it covers, sets
   the checkpoint pointer ``trainer:{consumer}:ckpt`` and deletes those step records.

So a group is acked iff a committed checkpoint contains its update. After a crash,
``--resume`` loads the pointer's checkpoint; the records left in Redis are exactly the steps
whose updates were lost, and their groups are still pending on this consumer: they are replayed
in their recorded composition and judged at their recorded version. Pending groups that no
record names (read, not yet recorded) are trained as new. At most ``checkpoint_every *
batch_groups`` groups are replayed. Versions only grow: a resumed trainer continues from
``max(checkpoint version, the run's version)``.

A dropped group's ``drop`` and ack are two calls (drop first): a crash between them hands the
slot back twice, which loosens the admission gate by one group (the per-group staleness check
still guards the loss); the reverse order could leak the slot for good.

Test hook: ``SLUICE_TRAINER_CRASH_AT=<point>:<step>`` makes the process SIGKILL itself at
``point`` of step ``step`` (points: ``mid_step`` after the first backward, ``after_step``,
``mid_publish``, ``after_publish``, ``mid_checkpoint``, ``before_commit``). For fault tests only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from buffer import Delivered, RedisTrajectoryBuffer, keys
from buffer.connection import with_retries
from trainer.batch import samples_from_groups
from trainer.checkpoint import (
    prune,
    restore_training_state,
    save_checkpoint,
    write_model_dir,
)
from trainer.step import DistInfo, StepStats, train_step

if TYPE_CHECKING:
    from staleness import VersionManager

log = logging.getLogger("sluice.trainer")
R = TypeVar("R")

CRASH_ENV = "SLUICE_TRAINER_CRASH_AT"
CRASH_POINTS = (
    "mid_step",
    "after_step",
    "mid_publish",
    "after_publish",
    "mid_checkpoint",
    "before_commit",
)
_HIST = 34  # staleness histogram buckets: -1 (bug), 0..31, 32+


class TrainerError(RuntimeError):
    """A trainer setting or run state that prevents starting; the message says what to do."""


def parse_crash_at(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    point, _, step = text.partition(":")
    if point not in CRASH_POINTS or not step.isdigit():
        raise TrainerError(
            f"{CRASH_ENV}={text!r}: expected <point>:<step> with point in {', '.join(CRASH_POINTS)}"
        )
    return point, int(step)


@dataclass
class _Batch:
    delivered: list[Delivered]
    version: int
    replay: bool
    idle_s: float = 0.0


@dataclass
class _State:
    step: int = 0
    version: int = 0
    weights_version: int | None = 0
    """The version whose weights the model holds now (None: moved since the last publish)."""
    ckpt_step: int = 0
    ckpt_path: str = ""
    dropped_total: int = 0
    replay: list[_Batch] = field(default_factory=list)
    fresh: list[Delivered] = field(default_factory=list)


def _choose_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainerError("trainer.device=cuda but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _entry_order(d: Delivered) -> tuple[int, int]:
    ms, _, seq = d.entry_id.partition("-")
    return int(ms), int(seq or 0)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


class Trainer:
    """One trainer process (one rank under torchrun). ``await Trainer(cfg, ...).run()``."""

    def __init__(
        self,
        cfg: Any,
        *,
        resume: bool = False,
        max_steps: int | None = None,
        dist: DistInfo | None = None,
    ) -> None:
        self.cfg = cfg
        self.tc = cfg.trainer
        self.resume = resume
        self.max_steps = max_steps if max_steps is not None else self.tc.max_steps
        self.dist = dist or DistInfo()
        self.run_name = cfg.run.name
        self.run_dir = Path(cfg.run.dir)
        self.weights_dir = self.run_dir / "weights"
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if not cfg.model.path:
            raise TrainerError(
                "model.path is empty: the trainer needs the version-0 weights (a Hugging Face "
                "model dir with config.json + *.safetensors); `sluice model init DIR` makes a tiny one"
            )
        self.model_path = Path(cfg.model.path)
        if not (self.model_path / "config.json").is_file():
            raise TrainerError(f"model.path={self.model_path} has no config.json")
        if not list(self.model_path.glob("*.safetensors")):
            raise TrainerError(f"model.path={self.model_path} has no *.safetensors weights")
        base = self.tc.consumer
        self.consumer = base if self.dist.world_size == 1 else f"{base}-r{self.dist.rank}"
        self.k_ckpt = keys.trainer_checkpoint(self.run_name, base)
        self.k_steps = [
            keys.trainer_steps(self.run_name, base, r) for r in range(self.dist.world_size)
        ]
        self.share = self.cfg.staleness.batch_groups // self.dist.world_size + (
            1 if self.dist.rank < self.cfg.staleness.batch_groups % self.dist.world_size else 0
        )
        self.crash_at = parse_crash_at(os.environ.get(CRASH_ENV))
        self.device = _choose_device(self.tc.device)
        self._stop = False
        self._dead_settled = 0
        self.st = _State()
        self.sync: Any = None
        """Rank 0's ``weights.distributed.DistributedSync`` (weight_sync=distributed)."""
        self._buffer_s = 0.0
        """Seconds in buffer/gate Redis calls since the last metrics row, the blocking read
        excluded (that is ``idle_s``): step records, eta, drop, ack, publish, reap."""

    # ------------------------------------------------------------------ hooks and signals
    def crash_hook(self, point: str, step: int | None = None) -> None:
        """SIGKILL this process if ``SLUICE_TRAINER_CRASH_AT`` names ``point`` of this step."""
        n = self.st.step + 1 if step is None else step
        if self.crash_at is not None and self.crash_at == (point, n):
            log.warning("test hook %s: SIGKILL at %s of step %d", CRASH_ENV, point, n)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def request_stop(self) -> None:
        if not self._stop:
            log.warning("stop requested: finishing the step, then checkpointing")
        self._stop = True

    async def _redis(self, call: Awaitable[R]) -> R:
        """Await one buffer/gate call, counting its time in ``buffer_s``."""
        t = time.monotonic()
        try:
            return await call
        finally:
            self._buffer_s += time.monotonic() - t

    # ------------------------------------------------------------------ model
    def _load_model(self, path: Path) -> Any:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(
            str(path), use_safetensors=True, dtype=torch.float32
        )
        model.to(self.device)
        model.eval()
        return model

    def _build_optim(self, model: Any) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=self.tc.lr,
            weight_decay=self.tc.weight_decay,
        )
        warm = self.tc.warmup_steps

        def factor(s: int) -> float:
            return 1.0 if warm == 0 else min(1.0, (s + 1) / warm)

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    # ------------------------------------------------------------------ setup
    async def _open(self) -> None:
        from staleness import RunNotFound, VersionManager

        url = self.cfg.redis.url
        try:
            self.vm: VersionManager = await VersionManager.open(
                url, self.run_name, batch_groups=self.cfg.staleness.batch_groups
            )
        except RunNotFound:
            self.vm = await VersionManager.open(
                url,
                self.run_name,
                eta=self.cfg.staleness.eta,
                batch_groups=self.cfg.staleness.batch_groups,
            )
        self.buf = await RedisTrajectoryBuffer.open(url, self.run_name, self.consumer)
        self.redis = self.buf.redis

    async def _restore(self) -> None:
        raw_ptr = await with_retries(
            lambda: self.redis.hgetall(self.k_ckpt), what="read checkpoint"
        )
        ptr = {k.decode(): v.decode() for k, v in raw_ptr.items()}
        records = await self._records(self.dist.rank)
        pending = await self.buf.own_pending(
            count=max(1000, 4 * self.tc.checkpoint_every * self.cfg.staleness.batch_groups)
        )
        if not self.resume and (ptr or records or pending):
            what = (
                f"a checkpoint at step {ptr['step']} ({ptr['path']})"
                if ptr
                else f"{len(pending)} unacknowledged groups and {len(records)} step records"
            )
            raise TrainerError(
                f"run {self.run_name!r} already has {what} for trainer {self.tc.consumer!r}: "
                "pass --resume to continue it, or start a new run (run.name)"
            )
        path = self.model_path
        if ptr:
            path = Path(ptr["path"])
            self.model = self._load_model(path / "model")
            self.optimizer, self.scheduler = self._build_optim(self.model)
            state = restore_training_state(path, self.optimizer, self.scheduler)
            self.st.step = self.st.ckpt_step = int(state["step"])
            self.st.version = int(state["version"])
            self.st.weights_version = state.get("weights_version")
            self.st.ckpt_path = str(path)
            self.st.dropped_total = int(state.get("dropped_total", 0))
            log.info("resumed from %s (step %d, version %d)", path, self.st.step, self.st.version)
        else:
            torch.manual_seed(self.cfg.run.seed)
            self.model = self._load_model(path)
            self.optimizer, self.scheduler = self._build_optim(self.model)
            self.st.weights_version = 0
            if self.resume:
                log.info("no checkpoint for run %s: starting from %s", self.run_name, path)
        run_version = await self.vm.version()
        if run_version > self.st.version:
            # Publications after the checkpoint were lost with the process: the model is the
            # checkpoint's, the next publication must still be above the run's version.
            self.st.version = run_version
            self.st.weights_version = None
        if self.resume:
            reclaimed: list[Delivered] = []
            if not self.dist.enabled:
                # Under torchrun a rank must not take a sibling's pending groups (the sibling
                # replays them); a single trainer takes over any consumer's idle ones.
                reclaimed = await self.buf.reclaim(self.tc.reclaim_idle_ms, count=10_000)
            unique = {d.entry_id: d for d in [*pending, *reclaimed]}  # XAUTOCLAIM may re-list ours
            self._plan_replay(records, sorted(unique.values(), key=_entry_order))
        await self._settle_dead_letters()

    async def _records(self, rank: int) -> dict[int, dict[str, Any]]:
        raw = await with_retries(
            lambda: self.redis.hgetall(self.k_steps[rank]), what="read step records"
        )
        return {int(k): json.loads(v) for k, v in raw.items()}

    def _plan_replay(self, records: dict[int, dict[str, Any]], pending: list[Delivered]) -> None:
        by_id = {d.entry_id: d for d in pending}
        used: set[str] = set()
        for n in sorted(records):
            if n <= self.st.ckpt_step:
                continue
            rec = records[n]
            got = [by_id[e] for e, _g in rec["entries"] if e in by_id]
            used.update(d.entry_id for d in got)
            if got:
                self.st.replay.append(_Batch(got, int(rec["version"]), replay=True))
        self.st.fresh = [d for d in pending if d.entry_id not in used]
        log.info(
            "replaying %d steps (%d groups) whose updates were lost; %d pending groups are new",
            len(self.st.replay),
            len(used),
            len(self.st.fresh),
        )

    # ------------------------------------------------------------------ data
    async def _next_batch(self) -> _Batch | None:
        if self.st.replay:
            return self.st.replay.pop(0)
        got, self.st.fresh = self.st.fresh[: self.share], self.st.fresh[self.share :]
        t0 = time.monotonic()
        last_log = t0
        while len(got) < self.share and not self._stop:
            got += await self.buf.get_batch(self.share - len(got), block_ms=1000)
            await self._settle_dead_letters()
            if time.monotonic() - last_log > self.tc.wait_log_s:
                last_log = time.monotonic()
                log.info("waiting for data: %d/%d groups", len(got), self.share)
        if self._stop and len(got) < self.share:
            self.st.fresh = got + self.st.fresh
            return None
        return _Batch(got, self.st.version, replay=False, idle_s=time.monotonic() - t0)

    async def _settle_dead_letters(self) -> None:
        """Hand back the admission slots of entries the buffer dead-lettered (undecodable: a
        corrupt payload, a newer schema): each was counted finished and will never be trained,
        so without this the gate would shrink by one slot per entry for good, and with a small
        ``eta`` the run would stall (tests/faults/test_component_fixes.py). An entry that was
        never admitted (written into the stream by hand) loosens the gate by one slot; the
        per-group staleness check still guards the loss."""
        n = self.buf.dead_lettered - self._dead_settled
        if n > 0:
            await self._redis(self.vm.drop(n, "dead_letter"))
            self._dead_settled += n
            log.warning("%d undecodable entries dead-lettered; their slots handed back", n)

    async def _record(self, n: int, batch: _Batch, dropped: list[str] | None = None) -> None:
        rec: dict[str, Any] = {
            "version": batch.version,
            "entries": [[d.entry_id, d.group.group_id] for d in batch.delivered],
        }
        if dropped is not None:
            rec["dropped"] = dropped
        # Idempotent (same field, same value): safe to retry across a Redis restart.
        await with_retries(
            lambda: self.redis.hset(self.k_steps[self.dist.rank], str(n), json.dumps(rec)),
            what=f"record step {n}",
        )

    async def _eta(self) -> int:
        v = await with_retries(lambda: self.redis.hget(self.vm.k_settings, "eta"), what="read eta")
        return int(v) if v is not None else self.cfg.staleness.eta

    # ------------------------------------------------------------------ publish / checkpoint
    async def _publish(self) -> None:
        """Rank 0 writes ``weights/v{V+1}`` and publishes it; every rank bumps its version."""
        v = self.st.version + 1
        if self.dist.rank == 0 and self.tc.weight_sync == "distributed":
            await self._publish_distributed(v)
        elif self.dist.rank == 0:
            dest = write_model_dir(
                self.model, self.weights_dir / f"v{v}", crash_hook=self.crash_hook_now
            )
            await self._redis(self.vm.publish_weights(v, str(dest.resolve()), "safetensors"))
            prune(self.weights_dir, "v", self.tc.keep_weights)
        self.st.version = v
        self.st.weights_version = v

    async def _publish_distributed(self, v: int) -> None:
        """Broadcast ``v`` to the registered servers, then publish it (fmt distributed-done).
        Every ``disk_every`` versions, and whenever the broadcast fails, the disk copy is
        written and recorded first (the catch-up source); on failure ``v`` is published as
        safetensors from it."""
        from weights.distributed import DistributedSync
        from weights.plan import FMT_DONE

        if self.sync is None:
            self.sync = DistributedSync(
                self.vm,
                master_addr=self.tc.sync_master_addr,
                port=self.tc.sync_port,
                bucket_mb=self.tc.bucket_mb,
                timeout_s=self.tc.sync_timeout_s,
            )
        dest: Path | None = None

        async def disk_copy() -> Path:
            d = write_model_dir(
                self.model, self.weights_dir / f"v{v}", crash_hook=self.crash_hook_now
            )
            await self._redis(self.vm.record_disk_weights(v, str(d.resolve())))
            prune(self.weights_dir, "v", self.tc.keep_weights)
            return d

        if v % self.tc.disk_every == 0:
            dest = await disk_copy()
        if await self.sync.broadcast(v, self.model):
            await self._redis(self.vm.publish_weights(v, f"group:{self.sync.group}", FMT_DONE))
            return
        if dest is None:
            dest = await disk_copy()
        await self._redis(self.vm.publish_weights(v, str(dest.resolve()), "safetensors"))

    def crash_hook_now(self, point: str) -> None:
        self.crash_hook(point, self.st.step)

    async def _checkpoint(self) -> None:
        """Write the checkpoint, then ack its groups + set the pointer in one transaction."""
        n = self.st.step
        if self.dist.enabled:
            import torch.distributed as td

            td.barrier()  # every rank has recorded (and trained) step n
        if self.dist.rank == 0:
            records = [await self._redis(self._records(r)) for r in range(self.dist.world_size)]
            entries: list[str] = []
            groups: list[str] = []
            fields: list[list[str]] = []
            for recs in records:
                fields.append([str(s) for s in recs if s <= n])
                for s in sorted(recs):
                    if s > n:
                        continue
                    dropped = set(recs[s].get("dropped", []))
                    for e, g in recs[s]["entries"]:
                        entries.append(e)
                        if e not in dropped:
                            groups.append(g)
            dest = self.ckpt_dir / f"step-{n:08d}"
            save_checkpoint(
                dest,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state={
                    "step": n,
                    "version": self.st.version,
                    "weights_version": self.st.weights_version,
                    "dropped_total": self.st.dropped_total,
                    "groups": groups,
                    "prev": self.st.ckpt_path or None,
                    "prev_step": self.st.ckpt_step,
                    "consumer": self.tc.consumer,
                    "world_size": self.dist.world_size,
                    "time": time.time(),
                },
                crash_hook=self.crash_hook_now,
            )
            self.crash_hook_now("before_commit")
            path = str(dest.resolve())

            def also(pipe: Any) -> None:
                pipe.hset(
                    self.k_ckpt,
                    mapping={"path": path, "step": n, "version": self.st.version},
                )
                for k, f in zip(self.k_steps, fields, strict=True):
                    if f:
                        pipe.hdel(k, *f)

            await self._redis(self.buf.ack(entries, also=also))
            self.st.ckpt_path = path
            prune(self.ckpt_dir, "step-", self.tc.keep_checkpoints, protect=dest)
            log.info("checkpoint step %d committed (%d groups acked)", n, len(groups))
        self.st.ckpt_step = n
        if self.dist.enabled:
            import torch.distributed as td

            td.barrier()

    # ------------------------------------------------------------------ the loop
    def _reduce(self, values: list[float], op: str = "sum") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.dist.enabled:
            import torch.distributed as td

            td.all_reduce(t, op=td.ReduceOp.SUM if op == "sum" else td.ReduceOp.MAX)
        return [float(x) for x in t.tolist()]

    async def run(self) -> int:
        """Train until ``max_steps``, ``reward_target`` or SIGTERM; returns steps taken now."""
        await self._open()
        try:
            return await self._run()
        finally:
            await self.buf.close()
            await self.vm.close()

    async def _run(self) -> int:
        await self._restore()
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        train_model: Any = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)
        # Under torchrun, a rank with fewer recorded steps than another reads new groups
        # while the other replays: each rank's share is still trained exactly once.
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        taken = 0
        t_start = time.time()
        reached_target = False
        while self.st.step < self.max_steps:
            batch = await self._next_batch()
            stop = self._reduce([1.0 if (self._stop or batch is None) else 0.0], "max")[0]
            if stop:
                break
            assert batch is not None
            t0 = time.monotonic()
            n = self.st.step + 1
            await self._redis(self._record(n, batch))
            eta = await self._redis(self._eta())
            kept, dropped = [], []
            hist = [0.0] * _HIST
            for d in batch.delivered:
                s = batch.version - d.group.min_version()
                hist[min(max(s, -1), _HIST - 2) + 1] += 1
                if s > eta or s < 0:
                    reason = "stale" if s > eta else "future_version"
                    log.warning(
                        "dropping group %s: staleness %d (version %d, oldest token v%d) %s eta %d",
                        d.group.group_id,
                        s,
                        batch.version,
                        d.group.min_version(),
                        ">" if s > eta else "< 0 with",
                        eta,
                    )
                    await self._redis(self.vm.drop(1, reason))
                    await self._redis(self.buf.ack([d.entry_id]))
                    dropped.append(d.entry_id)
                else:
                    kept.append(d)
            if dropped:
                await self._redis(self._record(n, batch, dropped))
            self.st.dropped_total += int(self._reduce([len(dropped)])[0])
            samples = samples_from_groups(
                [d.group for d in kept], normalize_std=self.tc.normalize_adv_std
            )
            total = self._reduce([len(samples)])[0]
            if total == 0:
                log.warning("step %d: every group was dropped; no update", n)
                await with_retries(
                    lambda n=n: self.redis.hdel(self.k_steps[self.dist.rank], str(n)),
                    what=f"delete record of step {n}",
                )
                continue
            stats = train_step(
                train_model,
                self.optimizer,
                self.scheduler,
                samples,
                self.tc,
                temperature=self.cfg.rollout.temperature,
                pad_id=pad_id,
                device=self.device,
                current_version=self.st.weights_version,
                dist=self.dist,
                crash_hook=self.crash_hook,
            )
            self.st.step = n
            taken += 1
            self.st.weights_version = None
            self.crash_hook("after_step", n)
            if n % self.tc.publish_every == 0:
                await self._publish()
            self.crash_hook("after_publish", n)
            if self.dist.rank == 0:
                await self._redis(self.vm.reap())
            step_s = time.monotonic() - t0
            reward = stats.metrics["reward_mean"]
            reached_target = self.tc.reward_target is not None and reward >= self.tc.reward_target
            counts = self._reduce([len(batch.delivered), len(dropped), batch.idle_s, *hist])
            self._log_step(stats, batch, counts, step_s, t_start, kept, dropped)
            last = n >= self.max_steps or reached_target
            if last and self.st.weights_version is None:
                await self._publish()
            if n % self.tc.checkpoint_every == 0 or last:
                await self._checkpoint()
            if reached_target:
                log.info("reward %.4f reached reward_target %s", reward, self.tc.reward_target)
                break
            if self._stop:
                break
        if self.st.step > self.st.ckpt_step:
            if self.st.weights_version is None:
                await self._publish()
            await self._checkpoint()
        return taken

    def _log_step(
        self,
        stats: StepStats,
        batch: _Batch,
        counts: list[float],
        step_s: float,
        t0: float,
        kept: list[Delivered],
        dropped: list[str],
    ) -> None:
        buffer_s, self._buffer_s = self._buffer_s, 0.0
        if self.dist.rank != 0:
            return
        dropped_set = set(dropped)
        groups, n_dropped, idle = int(counts[0]), int(counts[1]), counts[2]
        hist_v = counts[3:]
        hist = {}
        for i, c in enumerate(hist_v):
            if c:
                label = "-1" if i == 0 else (f"{_HIST - 2}+" if i == _HIST - 1 else str(i - 1))
                hist[label] = int(c)
        smax = max((i - 1 for i, c in enumerate(hist_v) if c), default=0)
        m = stats.metrics
        row = {
            "step": self.st.step,
            "version": self.st.version,
            "replay": batch.replay,
            "reward_mean": m["reward_mean"],
            "reward_std": m["reward_std"],
            "staleness_hist": hist,
            "staleness_max": smax,
            "dropped": n_dropped,
            "dropped_total": self.st.dropped_total,
            "groups": groups,
            # This rank's trained and dropped group ids: a replayed step repeats its row with
            # the same ids; across step numbers a group id appears once (tests/faults).
            "group_ids": [d.group.group_id for d in kept],
            "dropped_group_ids": [
                d.group.group_id for d in batch.delivered if d.entry_id in dropped_set
            ],
            "samples": stats.samples,
            "tokens": stats.tokens,
            "loss": stats.loss,
            "grad_norm": stats.grad_norm,
            "lr": stats.lr,
            "w_mean": m["w_mean"],
            "w_max": m["w_max"],
            "w_frac_masked": m["w_frac_masked"],
            "w_frac_truncated": m["w_frac_truncated"],
            "clip_frac": m["clip_frac"],
            "approx_kl": m["approx_kl"],
            "logp_abs_diff": m["logp_abs_diff"],
            "logp_k3_kl": m["logp_k3_kl"],
            "logp_gap_tokens": int(m["logp_gap_tokens"]),
            "tokens_per_s": stats.tokens / max(step_s, 1e-9),
            "idle_s": idle,
            "buffer_s": buffer_s,
            "step_s": step_s,
            "wall_s": time.time() - t0,
            "time": time.time(),
        }
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
        log.info(
            "step %d v%d reward %.3f±%.3f loss %.4f stale max %d dropped %d groups %d "
            "tok/s %.0f idle %.2fs step %.2fs%s",
            self.st.step,
            self.st.version,
            m["reward_mean"],
            m["reward_std"],
            stats.loss,
            smax,
            n_dropped,
            groups,
            row["tokens_per_s"],
            idle,
            step_s,
            " (replay)" if batch.replay else "",
        )


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


async def run_trainer(cfg: Any, *, resume: bool = False, max_steps: int | None = None) -> int:
    """Entry point of ``sluice train``: SIGTERM finishes the step, checkpoints and exits."""
    dist = init_distributed()
    trainer = Trainer(cfg, resume=resume, max_steps=max_steps, dist=dist)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, trainer.request_stop)
    loop.add_signal_handler(signal.SIGINT, trainer.request_stop)
    try:
        return await trainer.run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
        if dist.enabled:
            import torch.distributed as td

            td.destroy_process_group()
