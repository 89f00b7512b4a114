"""The task contract: a vocabulary of token ids, a deterministic prompt set, a reward in [0, 1].

Tasks need no tokenizer: prompts are token ids and the reward reads token ids. Every built-in
task uses the same special ids as ``inference.models.init_tiny_model``'s defaults
(``PAD=0, BOS=1, EOS=2``), so ``sluice model init DIR --task NAME`` makes a matching model.

Invariants (tests/unit/rollout_workers/test_rollout_workers_tasks.py):
- ``prompts(split)`` depends only on the task's options (seed included): two instances built
  with the same options return equal prompts, and prompt ids are unique within a split.
- ``reward(prompt, output_ids)`` is a float in [0, 1] for any list of ints, however malformed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = ("train", "eval")

PAD, BOS, EOS = 0, 1, 2


class TaskError(ValueError):
    """A task's name, options or data are wrong; the message names the option (``task.options.
    NAME``), the file or ``FILE:LINE``, and what to do (``sluice`` exits 2 with it)."""


@dataclass(frozen=True)
class TaskOption:
    """One option of a task (``task.options.NAME``): its default, or ``required``, and help."""

    name: str
    default: Any
    required: bool
    help: str

    def short(self) -> str:
        """``name (required)`` or ``name=default``."""
        return f"{self.name} (required)" if self.required else f"{self.name}={self.default!r}"

    def describe(self) -> str:
        """``name (required): help`` or ``name = default: help``."""
        head = f"{self.name} (required)" if self.required else f"{self.name} = {self.default!r}"
        return f"{head}: {self.help}" if self.help else head


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``id`` unique within its split, ``input_ids`` (token ids, BOS first for the
    built-in tasks), ``answer`` (JSON-able, what the reward compares against)."""

    id: str
    input_ids: list[int]
    answer: Any
    text: str | None = None
    """The prompt as the user wrote it (a text task's prompt field, or its last user message);
    None for token-id tasks."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """A text task's metadata fields of the row (JSON-able), for the reward."""


class Task(ABC):
    """A task owns its vocabulary, prompt generator and reward function."""

    name: str
    vocab_size: int
    eos_token_id: int
    bos_token_id: int = BOS
    pad_token_id: int = PAD
    max_new_tokens: int
    option_help: ClassVar[dict[str, str]] = {}
    """What each constructor argument (``task.options.NAME``) means; defaults come from the
    signature (``rollout_workers.tasks.task_options``)."""

    @abstractmethod
    def prompts(self, split: Split) -> Sequence[Prompt]:
        """The prompts of ``split`` ("train" or "eval"), deterministic from the task's seed."""

    @abstractmethod
    def reward(self, prompt: Prompt, output_ids: list[int]) -> float:
        """Score ``output_ids`` (the generated tokens, EOS included if any) in [0, 1]."""

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids generation stops on (a text task: the tokenizer's EOS and the model's
        generation-config EOS ids); the default is ``(eos_token_id,)``."""
        return (self.eos_token_id,)

    def decode(self, output_ids: list[int]) -> str | None:
        """The text of ``output_ids`` (a text task: decoded up to the first stop token, special
        tokens skipped), or None for a task without a tokenizer. When it is a string, the
        reward is called as ``fn(prompt, output_ids, text)``."""
        return None

    def output_length(self, prompt: Prompt, sample: int) -> int | None:
        """The fixed output length of sample ``sample`` (0-based) of a group of ``prompt``, or
        None (the default): the policy decides, the sample ends at EOS or ``max_new_tokens``.

        A task that returns a length makes the sampler generate exactly that many tokens
        (``ignore_eos`` and ``max_new_tokens`` = the length, capped by the rollout's
        ``max_new_tokens``), so a group's cost does not drift with the policy: benchmarks.
        It must depend only on the task's options, the prompt id and ``sample`` (every worker
        and every run of a benchmark sees the same lengths)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Summary for logs and reports."""
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "max_new_tokens": self.max_new_tokens,
        }


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def until_eos(output_ids: list[int], eos: int) -> tuple[list[int], bool]:
    """The tokens before the first ``eos`` and whether an ``eos`` was present."""
    if eos in output_ids:
        return list(output_ids[: output_ids.index(eos)]), True
    return list(output_ids), False
