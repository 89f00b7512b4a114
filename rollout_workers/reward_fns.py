"""Built-in rewards on decoded text: ``exact``, ``numeric`` and ``math`` (``math-verify``).

Each is a module-level function ``fn(prompt, output_ids, text) -> float`` (1.0 right, 0.0
wrong), comparing ``text`` (the decoded answer, stop token excluded) with ``prompt.answer`` (the
dataset's answer field: a string or a number; a list means any of them is right). Module-level
so a process pool can run them (``rollout.reward_processes``). Named in a config as
``task.options.reward: exact`` (or ``rollout.reward_fn: math``); tested on known cases in
tests/unit/rollout_workers/test_rollout_workers_reward_fns.py.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from rollout_workers.tasks.base import Prompt

_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _golds(answer: Any) -> list[Any]:
    return list(answer) if isinstance(answer, list | tuple) else [answer]


def normalize_text(s: str) -> str:
    """Whitespace collapsed and stripped; case kept (``Paris`` is not ``paris``)."""
    return _WS.sub(" ", s).strip()


def exact(prompt: Prompt, output_ids: list[int], text: str) -> float:
    """1.0 when the answer, whitespace-normalized, equals a gold answer."""
    got = normalize_text(text)
    return float(any(got == normalize_text(str(g)) for g in _golds(prompt.answer) if g is not None))


def parse_number(s: str) -> Fraction | None:
    """The number ``s`` writes (``1,234``, ``-3.5``, ``7/2``), exactly; None if it is not one."""
    s = s.strip().replace(",", "").rstrip(".")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(int(num), int(den)) if int(den) else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number written in ``text`` (GSM8K's ``#### 72`` reads as 72)."""
    for m in reversed(_NUMBER.findall(text)):
        n = parse_number(m)
        if n is not None:
            return n
    return None


def numeric(prompt: Prompt, output_ids: list[int], text: str) -> float:
    """1.0 when the last number of the answer equals a gold number (relative tolerance 1e-6;
    a gold given as text is read by its last number too)."""
    got = last_number(text)
    if got is None:
        return 0.0
    for g in _golds(prompt.answer):
        want = (
            Fraction(g)
            if isinstance(g, int | float) and not isinstance(g, bool) and math.isfinite(g)
            else last_number(str(g))
        )
        if want is not None and math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-9):
            return 1.0
    return 0.0


def math_verify_reward(prompt: Prompt, output_ids: list[int], text: str) -> float:
    """1.0 when ``math_verify.verify`` finds the answer's expression (``\\boxed{...}`` first,
    else LaTeX or a plain expression) equal to a gold one (LaTeX, with or without ``$``).

    math-verify's own timeouts use ``SIGALRM``, which works only in a main thread: in a
    process pool (``rollout.reward_processes``, the recommended way) they bound each parse and
    comparison; in the thread pool only ``rollout.reward_timeout_s`` does."""
    from math_verify import parse, verify

    t = 5 if threading.current_thread() is threading.main_thread() else None
    pred = parse(text, parsing_timeout=t)
    if not pred:
        return 0.0
    for g in _golds(prompt.answer):
        if g is None:
            continue
        gs = str(g)
        gold = parse(gs if "$" in gs or "\\" in gs else f"${gs}$", parsing_timeout=t)
        if gold and verify(gold, pred, timeout_seconds=t):
            return 1.0
    return 0.0


BUILTIN_REWARDS: dict[str, Callable[[Prompt, list[int], str], float]] = {
    "exact": exact,
    "numeric": numeric,
    "math": math_verify_reward,
}
"""Built-in rewards by the name a config gives them."""
