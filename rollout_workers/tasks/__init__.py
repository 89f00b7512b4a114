"""Tasks: vocabulary, prompts and reward, looked up by name with ``get_task(name, **options)``.

Built in: ``reverse`` (the demo: reverse N digits, partial credit), ``long-tail`` (long outputs
with heavy-tailed lengths, for throughput benchmarks) and ``jsonl`` (a user JSONL file plus a
``module:function`` reward). ``register_task`` adds more.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from rollout_workers.tasks.base import Prompt, Split, Task
from rollout_workers.tasks.jsonl import JsonlTask
from rollout_workers.tasks.long_tail import LongTailTask
from rollout_workers.tasks.reverse import ReverseTask

TASKS: dict[str, Callable[..., Task]] = {
    "reverse": ReverseTask,
    "long-tail": LongTailTask,
    "jsonl": JsonlTask,
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``get_task(name, **options)`` call ``factory(**options)``."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = factory


def get_task(name: str, **options: Any) -> Task:
    """The task ``name`` built with ``options``; ``ValueError`` naming a bad name or option."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    factory = TASKS[name]
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ValueError(f"task {name!r} has no option(s) {unknown}; options: {sorted(params)}")
    return factory(**options)


__all__ = [
    "TASKS",
    "JsonlTask",
    "LongTailTask",
    "Prompt",
    "ReverseTask",
    "Split",
    "Task",
    "get_task",
    "register_task",
]
