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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from weights.disk import copy_model_files, fsync_dir, replace_dir

STATE_FORMAT = 1


# ---------------------------------------------------------------------- optimizer state
def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors, JSON-able rest). Inverse: ``unflatten_optimizer``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = v.detach().cpu().contiguous()
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
    """Write a checkpoint directory atomically (layout in the module docstring); ``model/``
    also gets a copy of ``model_files`` (``weights.disk.model_files`` of the starting model).

    ``state`` is the JSON part owned by the caller (step, version, group ids, ...). The
    checkpoint is durable (fsynced and renamed) when this returns; it counts only once the
    caller commits its pointer in Redis.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    raw = model.module if hasattr(model, "module") else model
    raw.save_pretrained(str(tmp / "model"), safe_serialization=True)
    copy_model_files(model_files, tmp / "model")
    if crash_hook is not None:
        crash_hook("mid_checkpoint")
    tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    full = {
        "format": STATE_FORMAT,
        **state,
        "optimizer": opt_meta,
        "scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None,
        "python_random": _jsonable(random.getstate()),
    }
    (tmp / "state.json").write_text(json.dumps(full, indent=1, allow_nan=False))
    fsync_dir(tmp)
    fsync_dir(tmp / "model")
    replace_dir(tmp, dest)
    return dest


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
    path: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Load optimizer, scheduler and RNG states of checkpoint ``path`` (the model is loaded
    from ``path/model`` by the caller); returns its ``state.json``."""
    path = Path(path)
    data = read_checkpoint_state(path)
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(unflatten_optimizer(tensors, data["optimizer"]))
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
