"""A trainer's parts, built complete before the loop starts: the run's version manager and
buffer connections, the step ledger, the model, optimizer and state to start from
(``trainer.resume``), the group reader and the weight publisher ``trainer.weight_sync`` names.

Settings are checked before anything connects (``model.path``, ``SLUICE_TRAINER_CRASH_AT``,
``trainer.device``); if a later part fails, the connections opened so far are closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from buffer import RedisTrajectoryBuffer
from staleness import VersionManager
from staleness.checks import settings_differ
from trainer.config import TrainerArgs, TrainerConfig, TrainerError
from trainer.crash import CRASH_ENV, crash_if, parse_crash_at
from trainer.data import GroupReader
from trainer.ledger import StepLedger
from trainer.metrics import RedisClock, RunRecords, logged_eval_versions
from trainer.model import check_model_dir, choose_device, set_attention_backends
from trainer.resume import Restored, restore
from trainer.step import DistInfo
from weights.publish import (
    CrashHook,
    DiskPublisher,
    DistributedPublisher,
    IpcPublisher,
    WeightPublisher,
)


@dataclass(frozen=True)
class TrainerParts:
    """Everything a ``trainer.loop.Trainer`` runs with."""

    vm: VersionManager
    buf: RedisTrajectoryBuffer
    ledger: StepLedger
    reader: GroupReader
    publisher: WeightPublisher
    restored: Restored
    device: torch.device
    clock: RedisClock
    """Counts the seconds of buffer/gate calls (``buffer_s``); the reader and publisher too."""
    crash_at: tuple[str, int] | None
    """``SLUICE_TRAINER_CRASH_AT`` (``trainer.crash``), None when unset."""
    model_dir: Path | None = None
    """The version-0 model directory (resolved): its non-weight files (tokenizer, generation
    config, ...) go into every published weights dir and checkpoint ``model/``."""
    records: RunRecords | None = None
    """Rank 0's progress record and eval follower in the run's Redis (None on other ranks)."""


async def open_parts(
    tc: TrainerConfig,
    args: TrainerArgs,
    *,
    resume: bool,
    dist: DistInfo,
    stopped: Callable[[], bool],
) -> TrainerParts:
    """Check the settings, connect, restore and build the reader and publisher; the reader
    stops waiting for data once ``stopped()``."""
    model_path = check_model_dir(args.model_path)
    crash_at = parse_crash_at(os.environ.get(CRASH_ENV))
    device = choose_device(tc.device)
    set_attention_backends(device, tc.cudnn_attention)
    vm, buf, ledger, restored = await _connect_and_restore(
        tc, args, model_path, resume=resume, dist=dist, device=device
    )
    clock = RedisClock()
    state = restored.state
    b, w = args.batch_groups, dist.world_size
    share = b // w + (1 if dist.rank < b % w else 0)
    reader = GroupReader(
        buf,
        vm,
        clock,
        state,
        share=share,
        wait_log_s=tc.wait_log_s,
        stopped=stopped,
        hold_max_s=tc.hold_max_s,
        publish_every=tc.publish_every,
        world_size=w,
    )

    def crash_now(point: str) -> None:
        crash_if(crash_at, point, state.step)

    return TrainerParts(
        vm=vm,
        buf=buf,
        ledger=ledger,
        reader=reader,
        publisher=_publisher(tc, vm, args, clock, crash_now, model_path, device),
        restored=restored,
        device=device,
        clock=clock,
        crash_at=crash_at,
        model_dir=model_path,
        records=RunRecords(
            buf.redis,
            args.run_name,
            tc.consumer,
            logged_eval_versions(args.run_dir / "metrics.jsonl"),
        )
        if dist.rank == 0
        else None,
    )


async def _connect_and_restore(
    tc: TrainerConfig,
    args: TrainerArgs,
    model_path: Path,
    *,
    resume: bool,
    dist: DistInfo,
    device: torch.device,
) -> tuple[VersionManager, RedisTrajectoryBuffer, StepLedger, Restored]:
    """Connect to the run, then restore (``trainer.resume``); on failure close what opened."""
    consumer = tc.consumer if dist.world_size == 1 else f"{tc.consumer}-r{dist.rank}"
    async with contextlib.AsyncExitStack() as on_error:
        # The trainer creates the run (with ``args.eta``) if it is new; an existing run must
        # admit ``batch_groups`` per version, as many as a step consumes.
        vm = await VersionManager.open_or_create(
            args.redis_url,
            args.run_name,
            eta=args.eta,
            batch_groups=args.batch_groups,
            check_batch_groups=True,
        )
        on_error.push_async_callback(vm.close)
        # The run's eta wins (the step reads it live: ``sluice run set-eta``); say so once.
        note = settings_differ(args.run_name, run_eta=vm.eta, config_eta=args.eta)
        if note is not None and dist.rank == 0:
            logging.getLogger("sluice.trainer").warning("%s", note)
        buf = await RedisTrajectoryBuffer.open(args.redis_url, args.run_name, consumer)
        on_error.push_async_callback(buf.close)
        ledger = StepLedger(
            buf,
            args.run_name,
            tc.consumer,
            rank=dist.rank,
            world_size=dist.world_size,
            default_eta=args.eta,
        )
        restored = await restore(
            tc,
            args,
            model_path,
            ledger=ledger,
            buf=buf,
            vm=vm,
            resume=resume,
            dist=dist,
            device=device,
        )
        on_error.pop_all()  # started: the Trainer closes the connections
    return vm, buf, ledger, restored


def _publisher(
    tc: TrainerConfig,
    vm: VersionManager,
    args: TrainerArgs,
    clock: RedisClock,
    crash_hook: CrashHook,
    model_dir: Path,
    device: torch.device,
) -> WeightPublisher:
    """The transport ``trainer.weight_sync`` names, writing under ``RUN_DIR/weights`` (each
    version with ``model_dir``'s non-weight files, in ``publish_dtype``)."""
    weights_dir = args.run_dir / "weights"
    dtype = publish_dtype(tc.publish_dtype, device)
    common: dict[str, Any] = {
        "keep": tc.keep_weights,
        "timed": clock,
        "crash_hook": crash_hook,
        "model_dir": model_dir,
        "dtype": dtype,
    }
    if tc.lora.enabled:
        from weights.lora import LoraPublisher

        if tc.weight_sync != "disk":
            raise TrainerError(
                f"trainer.lora with trainer.weight_sync={tc.weight_sync} is not supported: "
                "adapters are published as files (weight_sync=disk; a few MB per version)"
            )
        return LoraPublisher(
            vm, weights_dir, keep=tc.keep_weights, timed=clock, crash_hook=crash_hook, dtype=dtype
        )
    if tc.weight_sync == "ipc":
        from weights.ipc import IpcSync

        ipc = IpcSync(
            vm,
            bucket_mb=tc.bucket_mb,
            timeout_s=tc.sync_timeout_s,
            admin_api_key=args.admin_api_key,
            dtype=dtype,
        )
        return IpcPublisher(vm, ipc, weights_dir, disk_every=tc.disk_every, **common)
    if tc.weight_sync == "distributed":
        from weights.distributed import DistributedSync

        sync = DistributedSync(
            vm,
            master_addr=tc.sync_master_addr,
            port=tc.sync_port,
            bucket_mb=tc.bucket_mb,
            timeout_s=tc.sync_timeout_s,
        )
        return DistributedPublisher(vm, sync, weights_dir, disk_every=tc.disk_every, **common)
    return DiskPublisher(vm, weights_dir, **common)


def publish_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``trainer.publish_dtype`` as the dtype to write (None: the fp32 master weights as they
    are)."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
