"""A user task from a JSONL file and a reward function given as ``module:function``.

Each non-blank line is an object with ``prompt_ids`` (or ``prompt``): a non-empty list of
token ids; optional ``answer`` (any JSON), ``id`` (string, unique; default ``<split>-<line>``)
and ``split`` ("train" default, or "eval"). The reward function is called as
``fn(prompt: Prompt, output_ids: list[int]) -> float`` and must return a number in [0, 1]
(else ``ValueError`` naming the function). Text prompts are refused: this task is
tokenizer-free (token ids in, token ids out); the ``text`` task takes text. Every problem with
the file raises ``TaskError`` naming it: ``FILE:LINE: ...`` for a malformed line or a token id outside ``vocab_size``, and the file for
one that is missing, a directory, Parquet or otherwise not UTF-8 text (JSONL only).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from rollout_workers.tasks.base import Prompt, Split, Task, TaskError, check_split

PARQUET_MAGIC = b"PAR1"


def load_reward_fn(spec: str) -> Callable[[Prompt, list[int]], float]:
    """Import ``module:function``; ``TaskError`` naming the spec when it cannot. ``sluice``
    commands find a module beside the run config or in the current directory
    (``sluice.config.add_module_dirs``), as well as on ``sys.path``."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise TaskError(f"reward must be 'module:function', got {spec!r}")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            raise TaskError(
                f"reward {spec!r}: no module {module!r}: put {module.split('.')[0]}.py beside "
                "the run config or in the current directory, or add its directory to PYTHONPATH"
            ) from e
        raise TaskError(f"reward {spec!r}: importing {module!r} failed: {e}") from e
    except ImportError as e:
        raise TaskError(f"reward {spec!r}: importing {module!r} failed: {e}") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise TaskError(f"reward {spec!r}: {module} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


def _token_id(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TaskError(f"{name} must be a token id (an int >= 0), got {value!r}")
    return value


class JsonlTask(Task):
    name = "jsonl"
    option_help: ClassVar[dict[str, str]] = {
        "path": "the JSONL file: one object per line with prompt_ids (token ids), optional "
        "answer, id and split (train|eval); UTF-8, not Parquet",
        "reward": "the reward, 'module:function' called as fn(prompt, output_ids) -> [0, 1]; "
        "the module is found beside the run config, in the current directory or on PYTHONPATH",
        "eos_token_id": "the model's end-of-sequence id (generation stops there)",
        "vocab_size": "the model's vocabulary size; every token id must be below it "
        "(default: the largest id in the file + 1)",
        "max_new_tokens": "output budget per sample (rollout.max_new_tokens overrides it)",
        "bos_token_id": "the model's beginning-of-sequence id",
        "pad_token_id": "the model's padding id",
    }

    def __init__(
        self,
        path: str | Path,
        reward: str,
        eos_token_id: int,
        vocab_size: int | None = None,
        max_new_tokens: int = 256,
        bos_token_id: int = 1,
        pad_token_id: int = 0,
    ) -> None:
        self.path = Path(path)
        self.reward_spec = reward
        self._reward = load_reward_fn(reward)
        self.eos_token_id = _token_id("eos_token_id", eos_token_id)
        self.bos_token_id = _token_id("bos_token_id", bos_token_id)
        self.pad_token_id = _token_id("pad_token_id", pad_token_id)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise TaskError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self._splits, max_id, max_where = self._read()
        if vocab_size is None:
            vocab_size = max(max_id, eos_token_id, bos_token_id, pad_token_id) + 1
        elif not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise TaskError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if max_id >= vocab_size:
            raise TaskError(
                f"{max_where}: token id {max_id} is outside vocab_size {vocab_size} (ids must "
                "be < vocab_size: fix the line, or task.options.vocab_size if the model's "
                "vocabulary is larger)"
            )
        for opt in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if getattr(self, opt) >= vocab_size:
                raise TaskError(
                    f"{opt}={getattr(self, opt)} is outside vocab_size {vocab_size} "
                    f"(task.options.{opt} or task.options.vocab_size)"
                )
        self.vocab_size = vocab_size

    def _lines(self) -> list[tuple[int, str]]:
        """``(line number, text)`` of every line of the file, decoded as UTF-8."""
        p = self.path
        if not p.exists():
            raise TaskError(f"task file {p} (task.options.path) does not exist")
        if p.is_dir():
            raise TaskError(
                f"task file {p} (task.options.path) is a directory; give the JSONL file itself"
            )
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise TaskError(
                f"task file {p} (task.options.path): cannot read it: {e.strerror}"
            ) from None
        if raw.startswith(PARQUET_MAGIC):
            raise TaskError(
                f"task file {p} is a Parquet file, not UTF-8 JSONL; convert it, e.g. "
                "pandas.read_parquet(IN).to_json(OUT, orient='records', lines=True)"
            )
        out = []
        for lineno, line in enumerate(raw.split(b"\n"), 1):
            try:
                out.append((lineno, line.decode("utf-8")))
            except UnicodeDecodeError as e:
                raise TaskError(
                    f"{p}:{lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                    f"{e.start + 1}); the jsonl task reads UTF-8 JSONL, one JSON object per line"
                ) from None
        return out

    def _read(self) -> tuple[dict[str, list[Prompt]], int, str]:
        """The prompts by split, the largest token id and the ``FILE:LINE`` it is on."""
        splits: dict[str, list[Prompt]] = {"train": [], "eval": []}
        ids_seen: set[str] = set()
        max_id, max_where = -1, str(self.path)
        for lineno, line in self._lines():
            if not line.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise TaskError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            key = "prompt_ids" if "prompt_ids" in obj else "prompt"
            ids = obj.get(key)
            if ids is None:
                raise TaskError(f"{where}: missing 'prompt_ids' (a list of token ids)")
            if isinstance(ids, str):
                raise TaskError(
                    f"{where}: '{key}' is text; the jsonl task is tokenizer-free, give token ids "
                    "(or use task.name=text: the model's tokenizer and chat template)"
                )
            if (
                not isinstance(ids, list)
                or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
            ):
                raise TaskError(f"{where}: '{key}' must be a non-empty list of token ids >= 0")
            split = obj.get("split", "train")
            if split not in splits:
                raise TaskError(f"{where}: split must be 'train' or 'eval', got {split!r}")
            pid = obj.get("id", f"{split}-{lineno}")
            if not isinstance(pid, str) or pid in ids_seen:
                raise TaskError(f"{where}: id {pid!r} is not a string or is a duplicate")
            ids_seen.add(pid)
            if max(ids) > max_id:
                max_id, max_where = max(ids), where
            splits[split].append(Prompt(id=pid, input_ids=list(ids), answer=obj.get("answer")))
        if not splits["train"] and not splits["eval"]:
            raise TaskError(f"task file {self.path}: no prompts")
        return splits, max_id, max_where

    def prompts(self, split: Split) -> Sequence[Prompt]:
        check_split(split)
        return self._splits[split]

    def reward(self, prompt: Prompt, output_ids: list[int]) -> float:
        value = self._reward(prompt, output_ids)
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not 0.0 <= value <= 1.0
        ):
            raise ValueError(
                f"reward {self.reward_spec} returned {value!r}, not a number in [0, 1]"
            )
        return float(value)
