"""rollout_workers.sampler with fixed output lengths (``Task.output_length``): the request
fields, the budget kept across aborts and dead servers, the cap by ``max_new_tokens``."""

from __future__ import annotations

import pytest
from rollout_fakes import answer, client_of, server

from inference.protocol import ServerDead
from rollout_workers.config import RolloutConfig
from rollout_workers.metrics import Counters
from rollout_workers.pool import ServerPool
from rollout_workers.rewards import RewardRunner
from rollout_workers.sampler import Sampler
from rollout_workers.tasks import get_task
from rollout_workers.tasks.base import Prompt

pytestmark = pytest.mark.timeout(10)

PROMPT = Prompt("p0", [1, 7, 8], answer=None)


def make(
    pool: ServerPool,
    lengths: dict[int, int | None],
    *,
    n_samples: int = 1,
    max_new_tokens: int = 64,
) -> Sampler:
    return Sampler(
        pool,
        RolloutConfig(n_samples=n_samples, temperature=0.7),
        RewardRunner(lambda p, out: 0.5, timeout_s=5.0, threads=1),
        Counters(),
        seed=3,
        eos_token_id=2,
        max_new_tokens=max_new_tokens,
        output_length=lambda prompt, i: lengths[i],
    )


async def test_each_sample_asks_for_its_own_length_with_ignore_eos_and_no_stop_ids() -> None:
    s = server()
    c = client_of(s)
    c.answers = [
        answer([5] * 3, [0] * 3, "length"),
        answer([5, 2, 5, 5, 2, 5, 5], [0] * 7, "length"),  # EOS inside: ignored
        answer([5, 2], [0, 0], "stop"),  # the policy decides
    ]
    sampler = make(ServerPool([s]), {0: 3, 1: 7, 2: None}, n_samples=3)
    outs, _ = await sampler.group(PROMPT, "g", 0)
    by_budget = {r.sampling.max_new_tokens: r.sampling for r in c.requests}
    assert sorted(by_budget) == [3, 7, 64]
    for n in (3, 7):
        assert by_budget[n].ignore_eos is True
        assert by_budget[n].stop_token_ids == ()
        assert "stop_token_ids" not in by_budget[n].to_dict()
        assert by_budget[n].to_dict()["ignore_eos"] is True
    assert by_budget[64].ignore_eos is False and by_budget[64].stop_token_ids == (2,)
    assert sorted(len(o.output_ids) for o in outs) == [2, 3, 7]
    sampler.rewards.close()


async def test_a_resubmission_asks_for_the_rest_and_ends_at_exactly_the_length() -> None:
    a, b = server("http://a", version=0), server("http://b", version=0)
    b.track("busy")  # a first
    client_of(a).answers = [
        answer([5, 6, 2], [0, 0, 0], "abort"),  # a weight update interrupts it
        answer([7, 8], [1, 1], "abort"),  # and another
        ServerDead("connection reset"),  # then the server dies
    ]
    client_of(b).answers = [answer([9, 2, 9, 9, 9], [1] * 5, "length")]
    sampler = make(ServerPool([a, b]), {0: 10})
    out = await sampler.group(PROMPT, "g", 0)
    o = out[0][0]
    reqs = client_of(a).requests + client_of(b).requests
    assert [r.sampling.max_new_tokens for r in reqs] == [10, 7, 5, 5]
    assert all(r.sampling.ignore_eos and r.sampling.stop_token_ids == () for r in reqs)
    assert reqs[-1].input_ids == [1, 7, 8, 5, 6, 2, 7, 8]  # prompt + partial, EOS kept
    assert len(o.output_ids) == 10 and o.output_ids == [5, 6, 2, 7, 8, 9, 2, 9, 9, 9]
    assert len(o.logprobs) == len(o.versions) == 10
    assert (o.segments, o.finish_reason) == (2, "length")
    sampler.rewards.close()


async def test_the_length_is_capped_by_max_new_tokens_and_an_abort_at_it_ends_the_sample() -> None:
    s = server()
    client_of(s).answers = [answer([5] * 4, [0] * 4, "abort")]
    sampler = make(ServerPool([s]), {0: 100}, max_new_tokens=4)
    outs, _ = await sampler.group(PROMPT, "g", 0)
    assert [r.sampling.max_new_tokens for r in client_of(s).requests] == [4]
    assert (len(outs[0].output_ids), outs[0].finish_reason) == (4, "length")
    sampler.rewards.close()


async def test_a_length_below_one_is_refused() -> None:
    sampler = make(ServerPool([server()]), {0: 0})
    with pytest.raises(ValueError, match="fixed output length"):
        await sampler.group(PROMPT, "g", 0)
    sampler.rewards.close()


async def test_long_tail_lengths_reach_the_requests() -> None:
    task = get_task("long-tail", median=16, sigma=1.0, min_len=4, max_len=128, fixed_lengths=True)
    prompt = task.prompts("train")[5]
    s = server()
    c = client_of(s)
    sampler = Sampler(
        ServerPool([s]),
        RolloutConfig(n_samples=8, temperature=1.0),
        RewardRunner(task.reward, timeout_s=5.0, threads=1),
        Counters(),
        seed=0,
        eos_token_id=task.eos_token_id,
        max_new_tokens=task.max_new_tokens,
        output_length=task.output_length,
    )
    await sampler.group(prompt, "g", 0)
    asked = sorted(r.sampling.max_new_tokens for r in c.requests)
    assert asked == sorted(task.output_length(prompt, i) or 0 for i in range(8))
    assert all(r.sampling.ignore_eos for r in c.requests)
    sampler.rewards.close()
