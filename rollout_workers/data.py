"""Dataset rows from a local file or directory: JSONL, Parquet, or a ``datasets`` dataset saved
with ``save_to_disk``. Nothing is downloaded: a path that does not exist is an error.

``read_rows(path)`` returns the rows as ``Row(where, data)``, ``where`` being ``FILE:LINE`` for
JSONL (1-based line), ``FILE:ROW`` for Parquet and saved datasets (0-based row, as pandas and
``datasets`` index them), so a task can fail a bad row with ``f"{row.where}: reason"``.
A saved ``DatasetDict`` is read by split: ``read_splits`` returns ``{split name: rows}``.

Formats are told apart by content, not by name: a directory is a saved dataset
(``dataset_info.json`` / ``state.json`` / ``dataset_dict.json``), a file that starts with
``PAR1`` is Parquet, anything else is read as UTF-8 JSONL (one object per non-blank line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout_workers.tasks.base import TaskError

PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class Row:
    where: str
    """``FILE:LINE`` (JSONL) or ``FILE:ROW`` (Parquet, saved datasets) of this row."""
    data: dict[str, Any]


def dataset_format(path: Path) -> str:
    """``jsonl`` | ``parquet`` | ``saved`` (``datasets.save_to_disk``); ``TaskError`` naming
    the path when it does not exist or is a directory that is not a saved dataset."""
    if not path.exists():
        raise TaskError(f"dataset {path} does not exist (nothing is downloaded: give a local path)")
    if path.is_dir():
        marks = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any((path / m).is_file() for m in marks):
            return "saved"
        raise TaskError(
            f"dataset {path} is a directory but not a dataset saved with "
            "datasets.save_to_disk (no dataset_info.json, state.json or dataset_dict.json)"
        )
    with path.open("rb") as f:
        head = f.read(4)
    return "parquet" if head == PARQUET_MAGIC else "jsonl"


def _jsonl(path: Path) -> list[Row]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TaskError(f"dataset {path}: cannot read it: {e.strerror}") from None
    rows = []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskError(
                f"{where}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})"
            ) from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise TaskError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        rows.append(Row(where, obj))
    return rows


def _parquet(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise TaskError(f"dataset {path}: not a readable Parquet file ({e})") from None
    return [Row(f"{path}:{i}", r) for i, r in enumerate(table.to_pylist())]


def _saved(path: Path) -> dict[str, list[Row]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as e:
        raise TaskError(f"dataset {path}: datasets.load_from_disk failed ({e})") from None
    parts = dict(ds.items()) if isinstance(ds, datasets.DatasetDict) else {"": ds}
    out: dict[str, list[Row]] = {}
    for split, d in parts.items():
        label = f"{path}[{split}]" if split else str(path)
        out[split] = [Row(f"{label}:{i}", dict(r)) for i, r in enumerate(d)]
    return out


def read_splits(path: str | Path) -> dict[str, list[Row]]:
    """The rows of ``path`` by split: a saved ``DatasetDict`` gives its splits, anything else
    one split named ``""``."""
    p = Path(path)
    fmt = dataset_format(p)
    if fmt == "saved":
        return _saved(p)
    return {"": _parquet(p) if fmt == "parquet" else _jsonl(p)}


def read_rows(path: str | Path) -> list[Row]:
    """Every row of ``path`` (a saved ``DatasetDict``'s splits one after the other)."""
    return [r for rows in read_splits(path).values() for r in rows]
