"""Model directories on disk: the safetensors weights a trainer publishes as ``weights/v{N}``.

Every directory is written under a temporary name in the same parent, fsynced, and renamed
into place, so a reader (a rollout worker loading ``weights/v{N}``, a resuming trainer) sees
either the complete directory or none: a crash before the rename leaves no ``v{N}`` at all
(``tests/unit/weights/test_weights_disk.py``). ``prune`` keeps the newest numbered
directories. The trainer's checkpoints (``trainer.checkpoint``) use the same helpers.

A published directory is servable and loadable as is: besides the weights and ``config.json``
that ``save_pretrained`` writes, it carries the starting model directory's other files
(tokenizer, generation config, chat template, ...: ``model_files``), copied byte for byte
into the temporary directory before the rename (``tests/unit/weights/test_weights_disk.py``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".npz",
)
"""Files that hold weights (any format): never copied by ``model_files``."""
MODEL_FILE_MAX_BYTES = 256 * 1024 * 1024
"""A larger non-weight file is left out (it is most likely weights in a format we do not know)."""


def model_files(model_dir: str | Path | None) -> list[Path]:
    """The files of a model directory that are not weights: tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``, vocab/merges, ``tokenizer.model``),
    ``generation_config.json``, ``chat_template.*``, ``config.json``, README, ... Every regular
    top-level file except dotfiles, weights (``WEIGHT_SUFFIXES``), weight indexes
    (``*.index.json``) and files over ``MODEL_FILE_MAX_BYTES``; sorted by name. ``[]`` when
    ``model_dir`` is None or not a directory."""
    if model_dir is None:
        return []
    d = Path(model_dir)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir()):
        name = p.name
        if name.startswith(".") or not p.is_file():
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        if p.stat().st_size > MODEL_FILE_MAX_BYTES:
            continue
        out.append(p)
    return out


def copy_model_files(files: Iterable[Path], dest: Path) -> list[Path]:
    """Copy ``files`` (``model_files`` of the starting model) into the directory ``dest``,
    byte for byte, leaving alone every name ``dest`` already has (what ``save_pretrained``
    wrote, e.g. ``config.json``, describes the weights beside it). Returns the copies made."""
    copied = []
    for src in files:
        target = dest / src.name
        if target.exists():
            continue
        shutil.copyfile(src, target)
        copied.append(target)
    return copied


def write_model_dir(
    model: Any,
    dest: str | Path,
    crash_hook: Callable[[str], None] | None = None,
    files: Iterable[Path] = (),
    dtype: Any = None,
) -> Path:
    """Write ``model`` (unwrapped HF causal LM) as an HF directory at ``dest``, atomically,
    with a copy of ``files`` (``model_files`` of the starting model: tokenizer, generation
    config, ...) that ``save_pretrained`` did not write. ``dtype`` (a torch dtype) writes the
    weights in that dtype and says so in ``config.json`` (the model itself is not changed);
    None writes them as they are.

    If ``dest`` exists it is replaced (only a directory that was never published can be in the
    way: versions only increase). Returns ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    raw = model.module if hasattr(model, "module") else model
    if dtype is None:
        raw.save_pretrained(str(tmp), safe_serialization=True)
    else:
        state = {k: v.detach().to(dtype) for k, v in raw.state_dict().items()}
        raw.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        del state
        _set_config_dtype(tmp / "config.json", str(dtype).removeprefix("torch."))
    copy_model_files(files, tmp)
    fsync_dir(tmp)
    if crash_hook is not None:
        crash_hook("mid_publish")
    replace_dir(tmp, dest)
    return dest


def _set_config_dtype(config: Path, name: str) -> None:
    """Record the dtype of the weights written beside ``config``: the config as saved names
    the in-memory model's (float32 for an fp32 master copy)."""
    import json

    cfg = json.loads(config.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def replace_dir(tmp: Path, dest: Path) -> None:
    """Rename the finished directory ``tmp`` to ``dest`` (replacing it), then fsync the parent."""
    if dest.exists():
        trash = dest.parent / f".trash-{dest.name}-{os.getpid()}"
        os.rename(dest, trash)
        os.rename(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    fsync_dir(dest.parent)


def fsync_dir(d: Path) -> None:
    """fsync every file directly in ``d`` and ``d`` itself."""
    for p in [*d.iterdir(), d] if d.is_dir() else [d]:
        if p.is_file() or p == d:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def numbered_dirs(parent: Path, prefix: str) -> list[tuple[int, Path]]:
    """``[(n, path)]`` of ``parent/{prefix}{n}`` directories, sorted by ``n``."""
    if not parent.is_dir():
        return []
    pat = re.compile(re.escape(prefix) + r"(\d+)$")
    out = []
    for p in parent.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune(parent: Path, prefix: str, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` numbered directories (never ``protect``)."""
    dirs = numbered_dirs(parent, prefix)
    removed = []
    for _, p in dirs[: max(0, len(dirs) - keep)]:
        if protect is not None and p.resolve() == protect.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
