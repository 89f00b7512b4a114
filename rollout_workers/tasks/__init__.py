"""Tasks: vocabulary, prompts and reward, looked up by name with ``get_task(name, **options)``.

Built in: ``reverse`` (the demo: reverse N digits, partial credit), ``long-tail`` (long outputs
with heavy-tailed lengths, for throughput benchmarks), ``jsonl`` (a user JSONL file of token ids
plus a ``module:function`` reward) and ``text`` (a text dataset, the model's tokenizer and chat
template, a reward on the decoded answer). ``register_task`` adds more.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from rollout_workers.tasks.base import Prompt, Split, Task, TaskError, TaskOption
from rollout_workers.tasks.jsonl import JsonlTask
from rollout_workers.tasks.long_tail import LongTailTask
from rollout_workers.tasks.reverse import ReverseTask
from rollout_workers.tasks.text import TextTask

TASKS: dict[str, Callable[..., Task]] = {
    "reverse": ReverseTask,
    "long-tail": LongTailTask,
    "jsonl": JsonlTask,
    "text": TextTask,
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``get_task(name, **options)`` call ``factory(**options)``."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = factory


def task_options(name: str) -> list[TaskOption] | None:
    """The options of task ``name`` (its factory's keyword arguments, with the defaults of its
    signature and the help of its ``option_help``); None for an unknown task or one that takes
    ``**options`` (any name goes)."""
    factory = TASKS.get(name)
    if factory is None:
        return None
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    helps: Mapping[str, str] = getattr(factory, "option_help", {})
    return [
        TaskOption(
            name=p.name,
            default=None if p.default is p.empty else p.default,
            required=p.default is p.empty,
            help=helps.get(p.name, ""),
        )
        for p in params.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def get_task(name: str, **options: Any) -> Task:
    """The task ``name`` built with ``options``; ``TaskError`` naming a bad name, an unknown or
    missing option (with the task's options) or a bad value (what the task says)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, sorted(TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TaskError(f"unknown task {name!r} (task.name){hint} known: {sorted(TASKS)}")
    opts = task_options(name)
    if opts is not None:
        names = [o.name for o in opts]
        listing = (
            ", ".join(o.short() for o in opts)
            + f" (`sluice config show --set task.name={name}` says what each means)"
        )
        unknown = sorted(set(options) - set(names))
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TaskError(
                f"task {name!r} has no option(s) {unknown}{hint}; its options: {listing}"
            )
        missing = [o.name for o in opts if o.required and o.name not in options]
        if missing:
            raise TaskError(
                f"task {name!r} needs option(s) {', '.join(missing)}: set them in task.options "
                f"(e.g. --set task.options.{missing[0]}=...); its options: {listing}"
            )
    try:
        return TASKS[name](**options)
    except TaskError:
        raise
    except (ValueError, TypeError) as e:  # a bad option value, said by the task
        raise TaskError(f"task {name!r}: {e}") from e


__all__ = [
    "TASKS",
    "JsonlTask",
    "LongTailTask",
    "Prompt",
    "ReverseTask",
    "Split",
    "Task",
    "TaskError",
    "TaskOption",
    "TextTask",
    "get_task",
    "register_task",
    "task_options",
]
