"""long-tail ``fixed_lengths``: the per-sample output length draw (deterministic per task seed,
prompt id and sample; the clipped lognormal's bounds and median), off by default, and a reward
that stays defined and meaningful on fixed-length outputs."""

from __future__ import annotations

import statistics

import pytest

from rollout_workers.tasks import TaskError, get_task, task_options
from rollout_workers.tasks.base import EOS, Prompt
from rollout_workers.tasks.long_tail import DIGIT0
from rollout_workers.tasks.reverse import ReverseTask


def test_off_by_default_and_for_other_tasks() -> None:
    t = get_task("long-tail")
    p = t.prompts("train")[0]
    assert t.output_length(p, 0) is None
    assert ReverseTask().output_length(ReverseTask().prompts("train")[0], 0) is None
    opts = {o.name: o for o in task_options("long-tail") or []}
    assert opts["fixed_lengths"].default is False and "ignoring EOS" in opts["fixed_lengths"].help


def test_the_draw_is_deterministic_per_seed_prompt_and_sample() -> None:
    kw = {"median": 16, "sigma": 1.0, "min_len": 4, "max_len": 128, "fixed_lengths": True}
    a, b = get_task("long-tail", **kw), get_task("long-tail", **kw)
    ps = a.prompts("train")[:50]
    la = [[a.output_length(p, i) for i in range(8)] for p in ps]
    # Another instance (another process), another call order: the same lengths.
    lb = [[b.output_length(p, i) for i in reversed(range(8))][::-1] for p in ps]
    assert la == lb
    flat = [x for row in la for x in row]
    assert len(set(flat)) > 20  # samples of one prompt differ, and prompts differ
    assert any(len(set(row)) > 1 for row in la)
    # Keyed by the prompt id, not its position in a list.
    same_id = Prompt(ps[3].id, [1, 2, 3], answer=[9, 9])
    assert [a.output_length(same_id, i) for i in range(8)] == la[3]
    c = get_task("long-tail", **{**kw, "seed": 1})
    assert [c.output_length(p, i) for p in ps for i in range(8)] != flat


def test_the_draw_follows_the_clipped_lognormal() -> None:
    t = get_task(
        "long-tail", median=16, sigma=1.0, min_len=4, max_len=128, n_train=1000, fixed_lengths=True
    )
    lengths = [t.output_length(p, i) or 0 for p in t.prompts("train") for i in range(8)]
    # L + 1 tokens (the L digits of an answer and its EOS), L in [min_len, max_len].
    assert min(lengths) == 4 + 1 and max(lengths) == 128 + 1 == t.max_new_tokens
    assert abs(statistics.median(lengths) - 17) <= 1.5  # median 16, + 1
    clipped_low = sum(x == 5 for x in lengths) / len(lengths)
    assert 0.05 < clipped_low < 0.12  # P(lognormal(ln 16, 1) < 4.5) = 0.103
    assert sum(x > 64 for x in lengths) / len(lengths) > 0.05  # a heavy tail: P(L > 64) = 0.08
    flat = get_task("long-tail", median=20, sigma=0.0, fixed_lengths=True)
    assert {flat.output_length(p, i) for p in flat.prompts("train")[:30] for i in range(4)} == {21}


def test_a_bad_fixed_lengths_value_is_named() -> None:
    with pytest.raises(TaskError, match="fixed_lengths must be true or false"):
        get_task("long-tail", fixed_lengths="yes")


def test_the_reward_on_fixed_length_outputs() -> None:
    t = get_task("long-tail", fixed_lengths=True)
    p = Prompt("x", [], answer=[5, 3])
    right = [DIGIT0 + (3 + i) % 10 for i in range(5)]
    # Longer than the answer: EOS after n digits scores 1, the tokens after it are ignored.
    assert t.reward(p, [*right, EOS, *right, EOS, 7, 7]) == 1.0
    assert t.reward(p, [*right, *right]) == 0.5  # no EOS: overlong costs
    # Shorter than the answer: at most L / n.
    assert t.reward(p, right[:3]) == pytest.approx(3 / 5)
    for out in ([EOS] * 9, [99] * 40, [], right[:1]):
        assert 0.0 <= t.reward(p, out) <= 1.0
