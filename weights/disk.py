"""Model directories on disk: the safetensors weights a trainer publishes as ``weights/v{N}``.

Every directory is written under a temporary name in the same parent, fsynced, and renamed
into place, so a reader (a rollout worker loading ``weights/v{N}``, a resuming trainer) sees
either the complete directory or none: a crash before the rename leaves no ``v{N}`` at all
(``tests/unit/weights/test_weights_disk.py``). ``prune`` keeps the newest numbered
directories. The trainer's checkpoints (``trainer.checkpoint``) use the same helpers.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_model_dir(
    model: Any, dest: str | Path, crash_hook: Callable[[str], None] | None = None
) -> Path:
    """Write ``model`` (unwrapped HF causal LM) as an HF directory at ``dest``, atomically.

    If ``dest`` exists it is replaced (only a directory that was never published can be in the
    way: versions only increase). Returns ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    raw = model.module if hasattr(model, "module") else model
    raw.save_pretrained(str(tmp), safe_serialization=True)
    fsync_dir(tmp)
    if crash_hook is not None:
        crash_hook("mid_publish")
    replace_dir(tmp, dest)
    return dest


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
