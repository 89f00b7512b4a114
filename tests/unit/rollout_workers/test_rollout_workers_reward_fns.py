"""Built-in rewards on known cases (math-verify on LaTeX and boxed answers), and the reward
runner: the decoded text is passed, async rewards run on the loop, a process pool runs plain
ones, failures become the reasons the worker hands slots back with."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rollout_workers.reward_fns import exact, last_number, math_verify_reward, numeric
from rollout_workers.rewards import RewardFailure, RewardRunner
from rollout_workers.tasks.base import Prompt

pytestmark = pytest.mark.timeout(60)


def P(answer: Any) -> Prompt:
    return Prompt("p", [1], answer)


@pytest.mark.parametrize(
    ("text", "answer", "want"),
    [
        ("Paris", "Paris", 1.0),
        ("  Paris \n", "Paris", 1.0),
        ("New   York", "New York", 1.0),
        ("paris", "Paris", 0.0),
        ("Paris.", "Paris", 0.0),
        ("b", ["a", "b"], 1.0),
    ],
)
def test_exact(text: str, answer: Any, want: float) -> None:
    assert exact(P(answer), [], text) == want


@pytest.mark.parametrize(
    ("text", "answer", "want"),
    [
        ("The answer is 72.", "72", 1.0),
        ("so 1,234 apples", 1234, 1.0),
        ("she pays $18.", "Janet pays 16 - 3 - 4 = 9 ... #### 18", 1.0),  # GSM8K's #### form
        ("x = 0.5", "1/2", 1.0),
        ("-3", -3, 1.0),
        ("72 or 73", "72", 0.0),  # the last number counts
        ("no number", "72", 0.0),
        ("7", 7.0000001, 1.0),
    ],
)
def test_numeric(text: str, answer: Any, want: float) -> None:
    assert numeric(P(answer), [], text) == want


def test_last_number() -> None:
    assert last_number("a 3, then -2.5 and 7/2.") == pytest.approx(3.5)
    assert last_number("none") is None


@pytest.mark.parametrize(
    ("text", "answer", "want"),
    [
        ("The answer is $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", 1.0),
        ("so \\boxed{0.5}", "$\\frac{1}{2}$", 1.0),
        ("\\boxed{\\dfrac{2}{4}}", "1/2", 1.0),
        ("We get $x = \\sqrt{4}$, so $2$", "2", 1.0),
        ("\\boxed{3}", "\\frac{1}{2}", 0.0),
        ("\\boxed{(1, 2)}", "(1,2)", 1.0),
        ("I cannot solve it", "2", 0.0),
    ],
)
def test_math_verify_on_latex_and_boxed_answers(text: str, answer: str, want: float) -> None:
    assert math_verify_reward(P(answer), [], text) == want


def _decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


async def test_the_runner_passes_the_decoded_text() -> None:
    seen: list[tuple[Any, ...]] = []

    def fn(prompt: Prompt, ids: list[int], text: str) -> float:
        seen.append((prompt.id, ids, text))
        return 0.25

    r = RewardRunner(fn, timeout_s=5, decode=_decode)
    assert await r.score(P("x"), [0, 1, 2]) == 0.25
    assert seen == [("p", [0, 1, 2], "abc")]
    token_only = RewardRunner(lambda p, ids: float(len(ids)), timeout_s=5)
    assert await token_only.score(P("x"), [4, 5]) == 2.0  # no decode: (prompt, ids)
    r.close()
    token_only.close()


async def test_an_async_reward_runs_on_the_loop_with_the_timeout() -> None:
    async def fn(prompt: Prompt, ids: list[int], text: str) -> float:
        await asyncio.sleep(0.01 if text == "a" else 10)
        return 1.0

    r = RewardRunner(fn, timeout_s=0.3, decode=_decode)
    assert await r.score(P("x"), [0]) == 1.0
    with pytest.raises(RewardFailure) as e:
        await r.score(P("x"), [1])
    assert e.value.reason == "reward_timeout"
    r.close()


async def test_a_process_pool_runs_the_builtin_verifier() -> None:
    r = RewardRunner(math_verify_reward, timeout_s=60, processes=1, decode=lambda ids: "\\boxed{4}")
    try:
        assert await r.score(P("4"), [1]) == 1.0
        assert await r.score(P("5"), [1]) == 0.0
    finally:
        r.close()


async def test_reward_failures_carry_their_reason() -> None:
    def boom(prompt: Prompt, ids: list[int], text: str) -> float:
        raise ValueError("bad")

    for fn, reason in [
        (boom, "reward_error"),
        (lambda p, i, t: "x", "reward_error"),
        (lambda p, i, t: float("nan"), "reward_nonfinite"),
    ]:
        r = RewardRunner(fn, timeout_s=5, decode=_decode)
        with pytest.raises(RewardFailure) as e:
            await r.score(P("x"), [0])
        assert e.value.reason == reason
        r.close()
