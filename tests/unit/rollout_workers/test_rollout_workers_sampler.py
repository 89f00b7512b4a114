"""rollout_workers.sampler: segments across aborts and dead servers, seeds, rewards."""

from __future__ import annotations

import asyncio

import pytest
from rollout_fakes import answer, client_of, server

from inference.protocol import InferenceError, ServerDead
from rollout_workers.config import RolloutConfig
from rollout_workers.metrics import Counters
from rollout_workers.pool import ServerPool, ServerState, Shutdown
from rollout_workers.rewards import RewardRunner
from rollout_workers.sampler import (
    GroupRejected,
    Sampler,
    all_or_nothing,
    seed_for,
)
from rollout_workers.tasks.base import Prompt

pytestmark = pytest.mark.timeout(10)

PROMPT = Prompt("p0", [1, 7, 8], answer=None)


def make(
    pool: ServerPool, *, n_samples: int = 1, max_new_tokens: int = 6, reward: float = 0.5
) -> tuple[Sampler, Counters, list[int]]:
    counters, interrupted = Counters(), list[int]()
    rewards = RewardRunner(lambda p, out: reward, timeout_s=5.0, threads=1)
    sampler = Sampler(
        pool,
        RolloutConfig(n_samples=n_samples, temperature=0.7),
        rewards,
        counters,
        seed=3,
        eos_token_id=2,
        max_new_tokens=max_new_tokens,
        on_interrupted=interrupted.append,
    )
    return sampler, counters, interrupted


async def test_an_aborted_sample_is_resubmitted_as_prompt_plus_partial() -> None:
    s = server(version=0)
    c = client_of(s)
    c.answers = [
        answer([10, 11], [0, 0], "abort", [-0.1, -0.2]),  # a weight update interrupts it
        answer([12, 2], [1, 1], "stop", [-0.3, -0.4]),
    ]
    sampler, counters, interrupted = make(ServerPool([s]))
    out = await sampler.sample([1, 7, 8], ("k",), 0.7)
    assert c.requests[0].input_ids == [1, 7, 8]
    assert c.requests[1].input_ids == [1, 7, 8, 10, 11]  # prompt + partial
    assert [r.sampling.max_new_tokens for r in c.requests] == [6, 4]  # the remaining budget
    assert c.requests[0].sampling.sampling_seed != c.requests[1].sampling.sampling_seed
    assert out.output_ids == [10, 11, 12, 2]
    assert out.logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert out.versions == [0, 0, 1, 1]  # the server's labels, segment by segment
    assert (out.finish_reason, out.segments) == ("stop", 1)
    assert (counters.interrupted_samples, counters.reprefill_tokens) == (1, 5)
    assert interrupted == [5]
    sampler.rewards.close()


async def test_the_budget_ends_a_sample_that_was_aborted_at_its_last_token() -> None:
    s = server()
    client_of(s).answers = [answer([10, 11, 12], [0, 0, 0], "abort")]
    sampler, _, _ = make(ServerPool([s]), max_new_tokens=3)
    out = await sampler.sample([1], ("k",), 1.0)
    assert (out.output_ids, out.finish_reason, out.segments) == ([10, 11, 12], "length", 1)
    assert len(client_of(s).requests) == 1
    sampler.rewards.close()


async def test_a_dead_server_is_marked_and_the_sample_goes_to_another() -> None:
    a, b = server("http://a"), server("http://b")
    b.track("busy")  # a is chosen first
    client_of(a).answers = [ServerDead("connection reset")]
    pool = ServerPool([a, b])
    sampler, counters, _ = make(pool)
    out = await sampler.sample([1, 7], ("k",), 1.0)
    assert a.state is ServerState.DEAD and counters.resubmitted_dead == 1
    assert client_of(b).requests[0].input_ids == [1, 7] and out.output_ids == [5, 2]
    sampler.rewards.close()


async def test_tokens_without_versions_fail_the_group() -> None:
    s = server()
    client_of(s).answers = [answer([10], None)]
    sampler, _, _ = make(ServerPool([s]))
    with pytest.raises(GroupRejected) as e:
        await sampler.sample([1], ("k",), 1.0)
    assert e.value.reason == "no_token_versions"
    sampler.rewards.close()


async def test_server_errors_are_retried_three_times() -> None:
    s = server()
    client_of(s).answers = [InferenceError(500, "boom", "/generate")] * 4
    sampler, _, _ = make(ServerPool([s]))
    with pytest.raises(InferenceError):
        await sampler.sample([1], ("k",), 1.0)
    assert len(client_of(s).requests) == 4
    client_of(s).answers = [InferenceError(400, "bad", "/generate")]
    with pytest.raises(InferenceError):
        await sampler.sample([1], ("k",), 1.0)
    sampler.rewards.close()


async def test_an_abort_after_the_pool_closed_gives_the_sample_up() -> None:
    s = server()
    pool = ServerPool([s])
    client_of(s).answers = [answer([10], [0], "abort")]
    sampler, _, _ = make(pool)
    pool.close()
    with pytest.raises(Shutdown):
        await sampler.sample([1], ("k",), 1.0)
    sampler.rewards.close()


async def test_a_group_samples_with_distinct_seeds_on_new_enough_weights() -> None:
    old, new = server("http://old", version=0), server("http://new", version=1)
    sampler, _, _ = make(ServerPool([old, new]), n_samples=3, reward=0.25)
    outs, rewards = await sampler.group(PROMPT, "g1", admission_version=1)
    assert len(outs) == 3 and rewards == [0.25] * 3
    assert client_of(old).requests == []  # admitted at v1: never generated on v0
    seeds = [r.sampling.sampling_seed for r in client_of(new).requests]
    assert len(set(seeds)) == 3
    assert seeds[0] == seed_for(3, "g1", 0, 0, 0)  # run seed, group, sample, segment, attempt
    sampler.rewards.close()


async def test_a_failed_reward_rejects_the_group_with_its_reason() -> None:
    def bad(p: Prompt, out: list[int]) -> float:
        raise KeyError("x")

    s = server()
    sampler, _, _ = make(ServerPool([s]))
    sampler.rewards = RewardRunner(bad, timeout_s=5.0, threads=1)
    with pytest.raises(GroupRejected) as e:
        await sampler.group(PROMPT, "g", 0)
    assert e.value.reason == "reward_error"
    sampler.rewards.close()


async def test_all_or_nothing_cancels_the_rest_on_the_first_error() -> None:
    cancelled = asyncio.Event()

    async def slow() -> int:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    async def fail() -> int:
        raise ValueError("first")

    with pytest.raises(ValueError, match="first"):
        await all_or_nothing([slow(), fail()])
    assert cancelled.is_set()

    async def value(v: int) -> int:
        return v

    assert await all_or_nothing([value(1), value(2)]) == [1, 2]
