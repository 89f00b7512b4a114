"""rollout_workers.episodes and openai_api: the pure parts (versions of appended tokens, chat
request parsing, resolving rollout.episode). The episode runner itself is tested with a real
worker, CPU server and Redis in tests/integration/test_episodes.py."""

from __future__ import annotations

from typing import Any

import pytest

from rollout_workers.episodes import fill_versions, resolve_episode_fn
from rollout_workers.openai_api import ConversationError, parse_request
from rollout_workers.tasks.base import TaskError


@pytest.mark.parametrize(
    ("versions", "want"),
    [
        ([3, None, None, 4, None], [3, 3, 3, 4, 4]),  # the previous sampled token's
        ([None, None, 5, 6], [5, 5, 5, 6]),  # none before: the first sampled one after
        ([None, None], [7, 7]),  # nothing sampled: the default (admission version)
        ([], []),
    ],
)
def test_appended_tokens_never_lower_the_oldest_sampled_version(
    versions: list[int | None], want: list[int]
) -> None:
    got = fill_versions(versions, 7)
    assert got == want
    sampled = [v for v in versions if v is not None]
    if sampled:
        assert min(got) == min(sampled)


def test_parse_request_reads_messages_and_budget() -> None:
    body = {
        "model": "x",
        "messages": [
            {"role": "user", "content": "7*8"},
            {"role": "assistant", "content": [{"type": "text", "text": "7*"}, {"text": "8"}]},
        ],
        "max_completion_tokens": 3,
        "temperature": 0.3,  # ignored: the rollout's temperature is used
    }
    assert parse_request(body) == (
        [{"role": "user", "content": "7*8"}, {"role": "assistant", "content": "7*8"}],
        3,
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"content": "a"}]}, r"messages\[0\] must be an object with a role"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content"),
        ({"messages": [{"role": "user", "content": "a"}], "stream": True}, "stream"),
        ({"messages": [{"role": "user", "content": "a"}], "n": 2}, "n must be 1"),
        ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_parse_request_names_what_is_wrong(body: object, message: str) -> None:
    with pytest.raises(ConversationError, match=message):
        parse_request(body)


def test_resolve_episode_fn_names_the_field() -> None:
    with pytest.raises(TaskError, match=r"rollout\.episode: .*no module 'no_such_mod'"):
        resolve_episode_fn("no_such_mod:episode")
    with pytest.raises(TaskError, match="must be an async def"):
        resolve_episode_fn("json:dumps")
    assert resolve_episode_fn("episode_fns:two_turns").__name__ == "two_turns"


def test_evals_are_refused_with_episodes() -> None:
    from rollout_workers.config import RolloutConfig
    from rollout_workers.episodes import episode_runner

    rc = RolloutConfig(episode="episode_fns:two_turns", eval_every=5)
    with pytest.raises(TaskError, match=r"rollout\.eval_every: .* set it to 0"):
        episode_runner(None, rc, None)  # type: ignore[arg-type]


class _Ctx:
    """What EpisodeRunner._episode reads of a context: a finished two-turn episode."""

    internal_error = None
    finish_reason = "stop"
    turns = 2
    prompt = type("P", (), {"id": "row-1"})()

    def sample_out(self) -> Any:
        from rollout_workers.sampler import SampleOut

        return SampleOut(output_ids=[1, 2], logprobs=[0.0, 0.0], versions=[0, 0])


def _runner(result: Any) -> Any:
    from rollout_workers.episodes import EpisodeRunner

    async def episode(ctx: Any, row: Any) -> Any:
        return result

    return EpisodeRunner.__new__(EpisodeRunner), episode


@pytest.mark.parametrize(
    ("result", "reward", "per_turn"),
    [(0.75, 0.75, None), ([0.5, 0.25], 0.75, [0.5, 0.25]), ((1, 0.0), 1.0, [1.0, 0.0])],
)
async def test_an_episode_returns_one_reward_or_one_per_turn(
    result: Any, reward: float, per_turn: list[float] | None
) -> None:
    runner, fn = _runner(result)
    runner.fn, runner.timeout_s = fn, 5.0
    out, r = await runner._episode(_Ctx())
    assert r == reward and out.turn_rewards == per_turn


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([0.5], r"per-turn rewards must be 2 finite numbers"),
        ([0.5, float("nan")], "must be 2 finite numbers"),
        ([0.5, True], "must be 2 finite numbers"),
        ("1.0", "not a reward"),
    ],
)
async def test_a_bad_return_value_is_an_episode_error(result: Any, message: str) -> None:
    from rollout_workers.sampler import GroupRejected

    runner, fn = _runner(result)
    runner.fn, runner.timeout_s = fn, 5.0
    with pytest.raises(GroupRejected, match=message) as e:
        await runner._episode(_Ctx())
    assert e.value.reason == "episode_error"
