"""Start or resume: the model, optimizer and training state a trainer begins with, and the
steps it must replay after a crash.

After a crash, ``--resume`` loads the checkpoint the ledger's pointer names (model, optimizer,
scheduler, RNG, step, version); the step records left in Redis are exactly the steps whose
updates were lost (``trainer.ledger``), and their groups are still pending on this consumer:
they are replayed in their recorded composition and judged at their recorded version
(``plan_replay``). Pending groups that no record names (read, not yet recorded) are trained as
new. At most ``checkpoint_every * batch_groups`` groups are replayed. The result equals a run
that never crashed (``tests/integration/test_trainer_crash.py``, six kill points).

Versions only grow: a resumed trainer continues from ``max(checkpoint version, the run's
version)``. A start without ``--resume`` over existing trainer state (a pointer, records or
pending groups) refuses with ``TrainerError``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from buffer import Delivered, RedisTrajectoryBuffer
from staleness import VersionManager
from trainer.checkpoint import restore_training_state
from trainer.config import TrainerArgs, TrainerConfig, TrainerError
from trainer.ledger import StepBatch, StepLedger
from trainer.model import build_optimizer, load_model
from trainer.step import DistInfo

log = logging.getLogger("sluice.trainer")


@dataclass
class TrainState:
    """Where training stands; the loop moves it forward."""

    step: int = 0
    version: int = 0
    weights_version: int | None = 0
    """The version whose weights the model holds now (None: moved since the last publish)."""
    ckpt_step: int = 0
    ckpt_path: str = ""
    dropped_total: int = 0
    replay: list[StepBatch] = field(default_factory=list)
    """Recorded steps still to replay, oldest first."""
    fresh: list[Delivered] = field(default_factory=list)
    """Pending groups no record names: read before any new ones."""


@dataclass
class Restored:
    """What ``restore`` hands the loop: a complete model, optimizer and state."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState


def entry_order(d: Delivered) -> tuple[int, int]:
    """Stream order of an entry id ``<ms>-<seq>``."""
    ms, _, seq = d.entry_id.partition("-")
    return int(ms), int(seq or 0)


def plan_replay(
    records: dict[int, dict[str, Any]], pending: list[Delivered], after_step: int
) -> tuple[list[StepBatch], list[Delivered]]:
    """Split ``pending`` (in stream order) into the recorded steps after ``after_step`` (each
    with its recorded groups still pending, at its recorded version) and the groups no such
    record names."""
    by_id = {d.entry_id: d for d in pending}
    used: set[str] = set()
    replay: list[StepBatch] = []
    for n in sorted(records):
        if n <= after_step:
            continue
        rec = records[n]
        got = [by_id[e] for e, _g in rec["entries"] if e in by_id]
        used.update(d.entry_id for d in got)
        if got:
            replay.append(StepBatch(got, int(rec["version"]), replay=True))
    fresh = [d for d in pending if d.entry_id not in used]
    log.info(
        "replaying %d steps (%d groups) whose updates were lost; %d pending groups are new",
        len(replay),
        len(used),
        len(fresh),
    )
    return replay, fresh


async def restore(
    tc: TrainerConfig,
    args: TrainerArgs,
    model_path: Path,
    *,
    ledger: StepLedger,
    buf: RedisTrajectoryBuffer,
    vm: VersionManager,
    resume: bool,
    dist: DistInfo,
    device: torch.device,
) -> Restored:
    """The model, optimizer and state to start from: the pointer's checkpoint, else the
    version-0 model at ``model_path``; with ``resume``, the replay plan too."""
    ptr = await ledger.pointer()
    records = await ledger.records(dist.rank)
    pending = await buf.own_pending(count=max(1000, 4 * tc.checkpoint_every * args.batch_groups))
    if not resume and (ptr or records or pending):
        what = (
            f"a checkpoint at step {ptr['step']} ({ptr['path']})"
            if ptr
            else f"{len(pending)} unacknowledged groups and {len(records)} step records"
        )
        raise TrainerError(
            f"run {args.run_name!r} already has {what} for trainer {tc.consumer!r}: "
            "pass --resume to continue it, or start a new run (run.name)"
        )
    restored = _load(tc, args, model_path, ptr, device, resume)
    st = restored.state
    run_version = await vm.version()
    if run_version > st.version:
        # Publications after the checkpoint were lost with the process: the model is the
        # checkpoint's, the next publication must still be above the run's version.
        st.version = run_version
        st.weights_version = None
    if resume:
        reclaimed: list[Delivered] = []
        if not dist.enabled:
            # Under torchrun a rank must not take a sibling's pending groups (the sibling
            # replays them); a single trainer takes over any consumer's idle ones.
            reclaimed = await buf.reclaim(tc.reclaim_idle_ms, count=10_000)
        unique = {d.entry_id: d for d in [*pending, *reclaimed]}  # XAUTOCLAIM may re-list ours
        st.replay, st.fresh = plan_replay(
            records, sorted(unique.values(), key=entry_order), st.ckpt_step
        )
    return restored


def _load(
    tc: TrainerConfig,
    args: TrainerArgs,
    model_path: Path,
    ptr: dict[str, str],
    device: torch.device,
    resume: bool,
) -> Restored:
    """Load the checkpoint ``ptr`` names (model, optimizer, scheduler, RNG, state), else seed
    torch with the run's seed and load the version-0 model."""
    st = TrainState()
    if ptr:
        path = Path(ptr["path"])
        model = _load_checkpoint_model(tc, path, model_path, device)
        optimizer, scheduler = build_optimizer(model, tc)
        state = restore_training_state(path, optimizer, scheduler, _place(tc))
        st.step = st.ckpt_step = int(state["step"])
        st.version = int(state["version"])
        st.weights_version = state.get("weights_version")
        st.ckpt_path = str(path)
        st.dropped_total = int(state.get("dropped_total", 0))
        log.info("resumed from %s (step %d, version %d)", path, st.step, st.version)
    else:
        torch.manual_seed(args.seed)
        model = _model(tc, model_path, device)
        if tc.lora.enabled:
            from trainer.lora import apply_lora

            model = apply_lora(model, tc.lora)
        optimizer, scheduler = build_optimizer(model, tc)
        st.weights_version = 0
        if resume:
            log.info("no checkpoint for run %s: starting from %s", args.run_name, model_path)
    return Restored(model, optimizer, scheduler, st)


def _model(tc: TrainerConfig, path: Path, device: torch.device) -> Any:
    """The model at ``path`` on ``device``; with ``trainer.parallel=fsdp`` loaded on the CPU
    and sharded (``trainer.fsdp``): a device never holds the whole fp32 model."""
    if tc.parallel != "fsdp":
        return load_model(path, device)
    if tc.lora.enabled:
        from trainer.config import TrainerError

        raise TrainerError(
            "trainer.parallel=fsdp with trainer.lora is not supported: a LoRA run trains few "
            "parameters; use trainer.parallel=ddp"
        )
    from trainer.fsdp import shard_model

    return shard_model(load_model(path, torch.device("cpu")), device)


def _place(tc: TrainerConfig) -> Any:
    """How a checkpoint's full optimizer state reaches the optimizer (None: as it is)."""
    if tc.parallel != "fsdp":
        return None
    from trainer.fsdp import place_optimizer_state

    return place_optimizer_state


def _load_checkpoint_model(
    tc: TrainerConfig, path: Path, model_path: Path, device: torch.device
) -> Any:
    """The model of checkpoint ``path``: its ``model/``, or with ``trainer.lora`` the base at
    ``model_path`` wrapped with the checkpoint's ``adapter/``. A checkpoint of the other kind
    is refused (``TrainerError`` naming both)."""
    from trainer.config import TrainerError

    has_adapter = (path / "adapter").is_dir()
    if tc.lora.enabled != has_adapter:
        kind = "a LoRA adapter" if has_adapter else "full weights"
        want = f"trainer.lora.rank={tc.lora.rank}"
        raise TrainerError(
            f"checkpoint {path} holds {kind} but the run has {want}: resume with the "
            "settings it was written with"
        )
    if not has_adapter:
        return _model(tc, path / "model", device)
    from safetensors.torch import load_file

    from trainer.lora import apply_lora, load_adapter_state

    model = apply_lora(load_model(model_path, device), tc.lora)
    tensors = load_file(str(path / "adapter" / "adapter_model.safetensors"), device=str(device))
    load_adapter_state(model, tensors)
    return model
