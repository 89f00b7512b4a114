"""Checkpoints on disk: safetensors for tensors, JSON for the rest.

Nothing here pickles or unpickles: the optimizer state is flattened into named tensors
(``state.{param index}.{name}``) plus JSON (param groups, non-tensor state), RNG states are
uint8 tensors, the scheduler's state dict is JSON.

A checkpoint is written under a temporary name in the same parent, fsynced and renamed into
place (``weights.disk.replace_dir``, as the published weight directories are), so a resuming
trainer sees either the complete checkpoint or none.

Layout of a checkpoint ``RUN_DIR/checkpoints/step-{step:08d}/``::

    model/                 a Hugging Face model dir (config.json, *.safetensors, and the
                           starting model's tokenizer and other non-weight files): servable
                           and usable as ``model.path`` (the checkpoint dir itself is too)
    adapter/               instead of model/ with ``trainer.lora``: the adapter only, as PEFT
                           writes it (adapter_model.safetensors, adapter_config.json); the
                           base model is ``model.path``
    optimizer.safetensors  flattened optimizer tensors
    rng.safetensors        torch CPU (and CUDA) RNG states
    state.json             step, version, optimizer param groups and scalars, scheduler,
                           python RNG, the ids of the groups trained since the previous
                           checkpoint and that checkpoint's path
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from weights.disk import copy_model_files, fsync_dir, replace_dir

STATE_FORMAT = 1


# ---------------------------------------------------------------------- optimizer state
def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors, JSON-able rest). Inverse: ``unflatten_optimizer``.
    The tensors are the optimizer's own (detached, not copied)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = v.detach()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    meta = {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        _, idx, name = k.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, int | float | str | bool) or x is None:
        return x
    raise TypeError(f"cannot store {type(x).__name__} in a checkpoint's JSON")


# ---------------------------------------------------------------------- checkpoints
@dataclass
class CheckpointSnapshot:
    """Everything a checkpoint holds, copied to host memory at one instant: the training
    process may go on changing the model while ``write_checkpoint`` writes it."""

    model: Any
    """The unwrapped model (its config and class; its weights are not read again)."""
    model_state: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]
    """``state.json``: the caller's part, optimizer metadata, scheduler, python RNG."""
    model_files: list[Path]
    adapter_config: dict[str, Any] | None = None
    """With LoRA: the adapter's ``adapter_config.json``, and ``model_state`` is the adapter's
    tensors only (``trainer.lora.adapter_state``)."""


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``: for a CUDA tensor an asynchronous copy into pinned memory (torch
    caches pinned blocks, so the next checkpoint reuses them); the caller synchronizes."""
    t = t.detach()
    if t.is_cuda:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out
    return t.to("cpu", copy=True).contiguous()


def snapshot_checkpoint(
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    model_files: Iterable[Path] = (),
    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> CheckpointSnapshot:
    """Copy the model, optimizer, scheduler and RNG states to host memory now (a device ->
    host copy; no file is written). ``state`` is the JSON part owned by the caller (step,
    version, group ids, ...). ``gathered``: the model and optimizer state dicts already as
    host copies (a sharded model's, ``trainer.fsdp.checkpoint_tensors``), taken as they are."""
    raw = model.module if hasattr(model, "module") else model
    opt_sd = gathered[1] if gathered is not None else optimizer.state_dict()
    tensors, opt_meta = flatten_optimizer(opt_sd)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    full = {
        "format": STATE_FORMAT,
        **state,
        "optimizer": opt_meta,
        "scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None,
        "python_random": _jsonable(random.getstate()),
    }
    adapter_cfg = None
    if gathered is not None:  # a sharded model's state, already host copies
        model_state, optimizer_state = gathered[0], tensors
    else:
        if hasattr(raw, "peft_config"):
            from trainer.lora import adapter_config, adapter_state

            adapter_cfg = adapter_config(raw)
            model_state = {k: _host_copy(v) for k, v in adapter_state(raw).items()}
        else:
            model_state = {k: _host_copy(v) for k, v in raw.state_dict().items()}
        optimizer_state = {k: _host_copy(v) for k, v in tensors.items()}
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the asynchronous device -> host copies have landed
    return CheckpointSnapshot(
        model=raw,
        model_state=model_state,
        optimizer=optimizer_state,
        rng=rng,
        state=full,
        model_files=list(model_files),
        adapter_config=adapter_cfg,
    )


def write_checkpoint(
    snap: CheckpointSnapshot,
    dest: str | Path,
    crash_hook: Callable[[str], None] | None = None,
) -> Path:
    """Write ``snap`` as a checkpoint directory atomically (layout in the module docstring);
    ``model/`` also gets a copy of the starting model's non-weight files. Reads only the
    snapshot, so it may run in a thread while training goes on. The checkpoint is durable
    (fsynced and renamed) when this returns; it counts only once the caller commits its
    pointer in Redis."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if snap.adapter_config is not None:
        from weights.lora import write_adapter_files

        write_adapter_files(tmp / "adapter", snap.model_state, snap.adapter_config)
    else:
        snap.model.save_pretrained(
            str(tmp / "model"), state_dict=snap.model_state, safe_serialization=True
        )
        copy_model_files(snap.model_files, tmp / "model")
    if crash_hook is not None:
        crash_hook("mid_checkpoint")
    save_file(snap.optimizer, str(tmp / "optimizer.safetensors"))
    save_file(snap.rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(snap.state, indent=1, allow_nan=False))
    fsync_dir(tmp)
    fsync_dir(tmp / ("adapter" if snap.adapter_config is not None else "model"))
    replace_dir(tmp, dest)
    return dest


def save_checkpoint(
    dest: str | Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    crash_hook: Callable[[str], None] | None = None,
    model_files: Iterable[Path] = (),
) -> Path:
    """``snapshot_checkpoint`` then ``write_checkpoint``, in the caller's thread."""
    snap = snapshot_checkpoint(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        model_files=model_files,
    )
    return write_checkpoint(snap, dest, crash_hook)


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "state.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} has no state.json (incomplete or not a checkpoint)"
        )
    data: dict[str, Any] = json.loads(p.read_text())
    if data.get("format") != STATE_FORMAT:
        raise ValueError(f"checkpoint {path}: unknown format {data.get('format')!r}")
    return data


def restore_training_state(
    path: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    place: Callable[[dict[str, Any], torch.optim.Optimizer], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Load optimizer, scheduler and RNG states of checkpoint ``path`` (the model is loaded
    from ``path/model`` by the caller); returns its ``state.json``. ``place`` maps the full
    optimizer state dict to what ``optimizer`` takes (``trainer.fsdp.place_optimizer_state``:
    this rank's shards)."""
    path = Path(path)
    data = read_checkpoint_state(path)
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_sd = unflatten_optimizer(tensors, data["optimizer"])
    optimizer.load_state_dict(place(opt_sd, optimizer) if place is not None else opt_sd)
    if scheduler is not None and data.get("scheduler") is not None:
        scheduler.load_state_dict(data["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    py = data["python_random"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return data
