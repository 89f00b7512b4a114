"""A user task from a JSONL file and a reward function given as ``module:function``.

Each non-blank line is an object with ``prompt_ids`` (or ``prompt``): a non-empty list of
token ids; optional ``answer`` (any JSON), ``id`` (string, unique; default ``<split>-<line>``)
and ``split`` ("train" default, or "eval"). The reward function is called as
``fn(prompt: Prompt, output_ids: list[int]) -> float`` and must return a number in [0, 1]
(else ``ValueError`` naming the function). Text prompts are refused: sluice is tokenizer-free
(token ids in, token ids out). Every malformed line raises ``ValueError("FILE:LINE: ...")``.
Parquet is not supported (JSONL only).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from rollout_workers.tasks.base import Prompt, Split, Task, check_split


def load_reward_fn(spec: str) -> Callable[[Prompt, list[int]], float]:
    """Import ``module:function``; ``ValueError`` naming the spec when it cannot."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"reward must be 'module:function', got {spec!r}")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module!r}: {e}") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {module} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


class JsonlTask(Task):
    name = "jsonl"

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
        self.eos_token_id = eos_token_id
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self._splits = self._read()
        max_id = max(
            [eos_token_id, bos_token_id, pad_token_id]
            + [t for ps in self._splits.values() for p in ps for t in p.input_ids]
        )
        if vocab_size is None:
            vocab_size = max_id + 1
        elif max_id >= vocab_size:
            raise ValueError(f"{self.path}: token id {max_id} is outside vocab_size {vocab_size}")
        self.vocab_size = vocab_size

    def _read(self) -> dict[str, list[Prompt]]:
        if not self.path.is_file():
            raise FileNotFoundError(f"task file {self.path} does not exist")
        splits: dict[str, list[Prompt]] = {"train": [], "eval": []}
        ids_seen: set[str] = set()
        with self.path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                key = "prompt_ids" if "prompt_ids" in obj else "prompt"
                ids = obj.get(key)
                if ids is None:
                    raise ValueError(f"{where}: missing 'prompt_ids' (a list of token ids)")
                if isinstance(ids, str):
                    raise ValueError(
                        f"{where}: '{key}' is text; sluice is tokenizer-free, give token ids"
                    )
                if (
                    not isinstance(ids, list)
                    or not ids
                    or not all(
                        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
                    )
                ):
                    raise ValueError(f"{where}: '{key}' must be a non-empty list of token ids >= 0")
                split = obj.get("split", "train")
                if split not in splits:
                    raise ValueError(f"{where}: split must be 'train' or 'eval', got {split!r}")
                pid = obj.get("id", f"{split}-{lineno}")
                if not isinstance(pid, str) or pid in ids_seen:
                    raise ValueError(f"{where}: id {pid!r} is not a string or is a duplicate")
                ids_seen.add(pid)
                splits[split].append(Prompt(id=pid, input_ids=list(ids), answer=obj.get("answer")))
        if not splits["train"] and not splits["eval"]:
            raise ValueError(f"{self.path}: no prompts")
        return splits

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
