"""Agentic episodes: a user coroutine drives a multi-turn, tool-using episode token by token.

``rollout.episode: module:function`` names ``async def episode(ctx, row) -> float``; the worker
runs ``rollout.n_samples`` episodes of each leased row (``row``: the task's ``Prompt``) as one
group and GRPO compares their rewards. The episode's context is the row's prompt ids followed
by every token the episode added, in order:

- ``await ctx.generate()`` continues the context on the inference server through the worker's
  sampler (``Sampler.sample``: weight-update aborts are resubmitted as ``context + partial``,
  per-token versions come from the server); the tokens are *sampled*: trained.
- ``ctx.append(ids_or_text)`` adds environment tokens (tool output, the next user turn,
  template tokens); they are context for what follows and never trained (loss mask 0).
- the return value is the episode's reward (a finite float), or one reward per model turn
  (a list of ``ctx.turns`` finite floats): the episode's reward is then their sum and the
  trainer credits each turn's tokens with the rewards from that turn on
  (``staleness.turn_advantages``).

Token ids are never re-derived from text: the trajectory is exactly the ids sampled and
appended (``buffer.schema``, version 3: ``loss_mask``, ``turn_starts``). A single-turn task is
the one-call case (``await ctx.generate()``, then score).

Caps (``rollout.episode_max_turns``, ``episode_max_tokens``, ``episode_timeout_s``): a
``generate`` past the turn cap or with no token budget left, or an ``append`` past the token
budget, raises ``EpisodeLimit``; an episode that lets it escape ends with reward 0 and
finish reason ``length``. An exception in user code or a timeout rejects the group: its
admission slot is handed back with reason ``episode_error`` / ``episode_timeout`` (counted in
the worker's ``rejected_by``), the other episodes of the group are cancelled, the worker goes
on. The worker's own failures met inside ``ctx.generate`` (shutdown, server errors) pass
through as they are, even if user code catches them.

Invariants (tests/integration/test_episodes.py): sampled tokens' log-probs match a
recomputation under their labelled versions when turns span a weight update; the trained ids
are the sampled and appended ids; a crashing or hanging episode hands its slot back and the
worker goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rollout_workers.chat import ChatFormat
from rollout_workers.openai_api import OpenAIEndpoint
from rollout_workers.sampler import GroupRejected, SampleOut, Sampler, all_or_nothing
from rollout_workers.tasks.base import Prompt, Task, TaskError

EpisodeFn = Callable[["EpisodeContext", Prompt], Awaitable[float | Sequence[float]]]


class EpisodeLimit(Exception):
    """The episode reached a cap (turns or tokens); the message names it."""


@dataclass(frozen=True)
class Turn:
    """What one ``ctx.generate`` sampled."""

    ids: list[int]
    """The sampled token ids (the stop token included when one ended the turn)."""
    logprobs: list[float]
    versions: list[int]
    """Policy version of each token, as the server reported it."""
    finish_reason: str
    text: str | None
    """The decoded text up to the first stop token (None for a task without a tokenizer)."""


@dataclass
class EpisodeLimits:
    max_turns: int
    max_tokens: int
    """Tokens after the prompt, sampled and appended together."""
    max_new_tokens: int
    """Default budget of one ``generate``."""


@dataclass
class _Record:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int | None] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)


class EpisodeContext:
    """One episode's handle (see the module docstring)."""

    def __init__(
        self,
        sampler: Sampler,
        prompt: Prompt,
        limits: EpisodeLimits,
        *,
        seed_key: tuple[object, ...],
        temperature: float,
        min_version: int,
        fmt: ChatFormat | None,
        tally: list[int] | None = None,
    ) -> None:
        self.prompt = prompt
        self._tally = tally
        """``tally[0]`` grows by every token the servers return to this episode (the group's
        waste if it is handed back; ``Sampler.sample``)."""
        self._sampler = sampler
        self._limits = limits
        self._seed_key = seed_key
        self._temperature = temperature
        self._min_version = min_version
        self._fmt = fmt
        self._rec = _Record()
        self.openai_base_url: str | None = None
        """This episode's OpenAI-compatible base URL (``rollout.openai_endpoint``), or None."""
        self.internal_error: BaseException | None = None
        """A worker failure met inside ``generate``; re-raised whatever the user code did."""
        self.finish_reason = "stop"

    # ------------------------------------------------------------------ the conversation
    @property
    def context_ids(self) -> list[int]:
        """The prompt ids and every token added since, in order (what the model sees next)."""
        return list(self.prompt.input_ids) + self._rec.ids

    @property
    def turns(self) -> int:
        """Model turns so far."""
        return len(self._rec.turn_starts)

    @property
    def tokens_left(self) -> int:
        return self._limits.max_tokens - len(self._rec.ids)

    @property
    def tokenizer(self) -> Any:
        """The task's tokenizer (a text task), or None."""
        return self._fmt.tokenizer if self._fmt is not None else None

    def encode(self, text: str) -> list[int]:
        """``text`` as token ids, no special tokens added (a text task only)."""
        if self._fmt is None:
            raise TypeError("ctx.encode needs a task with a tokenizer (the text task)")
        return [int(t) for t in self._fmt.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str | None:
        return self._fmt.decode(ids) if self._fmt is not None else None

    async def generate(self, *, max_new_tokens: int | None = None) -> Turn:
        """Sample one model turn after the context (until a stop token or the budget), at the
        rollout's temperature (the one the trainer takes log-probs at)."""
        if self.turns >= self._limits.max_turns:
            raise EpisodeLimit(f"episode_max_turns={self._limits.max_turns} reached")
        budget = min(max_new_tokens or self._limits.max_new_tokens, self.tokens_left)
        if budget < 1:
            raise EpisodeLimit(f"episode_max_tokens={self._limits.max_tokens} reached")
        try:
            out = await self._sampler.sample(
                self.context_ids,
                (*self._seed_key, self.turns),
                self._temperature,
                min_version=self._min_version,
                max_new_tokens=budget,
                tally=self._tally,
            )
        except Exception as e:  # not CancelledError: a timeout cancels the episode through here
            self.internal_error = e
            raise
        r = self._rec
        if out.output_ids:
            r.turn_starts.append(len(r.ids))
        r.ids += out.output_ids
        r.logprobs += out.logprobs
        r.versions += out.versions
        r.mask += [1] * len(out.output_ids)
        self.finish_reason = out.finish_reason
        return Turn(
            ids=list(out.output_ids),
            logprobs=list(out.logprobs),
            versions=list(out.versions),
            finish_reason=out.finish_reason,
            text=self.decode(out.output_ids),
        )

    def append(self, tokens: Sequence[int] | str) -> list[int]:
        """Add environment tokens (ids, or text encoded with the task's tokenizer) to the
        context; they are never trained. Returns the ids appended."""
        ids = self.encode(tokens) if isinstance(tokens, str) else [int(t) for t in tokens]
        if len(ids) > self.tokens_left:
            raise EpisodeLimit(
                f"episode_max_tokens={self._limits.max_tokens}: appending {len(ids)} tokens "
                f"with {self.tokens_left} left"
            )
        r = self._rec
        r.ids += ids
        r.logprobs += [0.0] * len(ids)
        r.versions += [None] * len(ids)
        r.mask += [0] * len(ids)
        return ids

    async def chat(
        self, messages: Sequence[dict[str, str]], *, max_new_tokens: int | None = None
    ) -> Turn:
        """One model turn for a chat request (``openai_api``): ``messages`` rendered with the
        task's chat template must extend the episode's tokens (decoded); the new text is
        appended (masked), then a turn is generated. ``ConversationError`` when it does not
        extend them."""
        from rollout_workers.openai_api import ConversationError

        if self._fmt is None or not self._fmt.chat_template:
            raise ConversationError("chat requests need a text task with a chat template")
        text = self._fmt.render(messages)
        have = str(self._fmt.tokenizer.decode(self.context_ids, skip_special_tokens=False))
        if not text.startswith(have):
            at = next(
                (i for i, (a, b) in enumerate(zip(have, text, strict=False)) if a != b),
                min(len(have), len(text)),
            )
            raise ConversationError(
                f"the conversation does not extend this episode's tokens: they part at "
                f"character {at} ({have[at : at + 20]!r} recorded, {text[at : at + 20]!r} "
                "sent); send the assistant messages back as they were returned"
            )
        if len(text) > len(have):
            self.append(text[len(have) :])
        return await self.generate(max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------ the record
    def sample_out(self) -> SampleOut:
        """The episode as a trajectory sample (``buffer.schema`` invariants: an appended
        token's version is the last sampled token's before it, else the first after it, else
        the admission version)."""
        r = self._rec
        versions = fill_versions(r.versions, self._min_version)
        return SampleOut(
            output_ids=list(r.ids),
            logprobs=list(r.logprobs),
            versions=versions,
            finish_reason=self.finish_reason,
            loss_mask=list(r.mask),
            turn_starts=list(r.turn_starts),
        )


def _is_reward(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)


def _turn_rewards(rewards: Sequence[Any], ctx: EpisodeContext) -> list[float]:
    """An episode's per-turn rewards, checked: one finite number per model turn."""
    if len(rewards) != ctx.turns or not all(map(_is_reward, rewards)):
        raise GroupRejected(
            "episode_error",
            f"episode of {ctx.prompt.id} returned {list(rewards)!r}: per-turn rewards must be "
            f"{ctx.turns} finite numbers, one per model turn (ctx.turns)",
        )
    return [float(x) for x in rewards]


def fill_versions(versions: Sequence[int | None], default: int) -> list[int]:
    """Versions for appended tokens (None): the previous sampled token's, else the next
    one's, else ``default``. The minimum over the result is the minimum over the sampled
    tokens (``default`` when there are none)."""
    first = next((v for v in versions if v is not None), default)
    out: list[int] = []
    last: int = first
    for v in versions:
        if v is not None:
            last = v
        out.append(last)
    return out


def resolve_episode_fn(spec: str) -> EpisodeFn:
    """Import ``module:function`` (``rollout.episode``); ``TaskError`` naming the field when
    it cannot be imported or is not an ``async def``."""
    from rollout_workers.tasks.jsonl import load_reward_fn

    try:
        fn = load_reward_fn(spec)
    except TaskError as e:
        raise TaskError(f"rollout.episode: {str(e).replace('reward ', '', 1)}") from e
    if not inspect.iscoroutinefunction(fn):
        raise TaskError(f"rollout.episode: {spec!r} must be an async def episode(ctx, row)")
    return fn  # type: ignore[return-value]


class EpisodeRunner:
    """Runs a group of episodes of one row; the worker's ``Sampler.group`` for episode tasks."""

    def __init__(
        self,
        fn: EpisodeFn,
        sampler: Sampler,
        task: Task,
        limits: EpisodeLimits,
        *,
        timeout_s: float,
        n_samples: int,
        temperature: float,
        endpoint: OpenAIEndpoint | None = None,
    ) -> None:
        self.endpoint = endpoint
        """The OpenAI-compatible endpoint each episode is served on, or None."""
        self.fn = fn
        self.sampler = sampler
        self.limits = limits
        self.timeout_s = timeout_s
        self.n_samples = n_samples
        self.temperature = temperature
        self.fmt: ChatFormat | None = getattr(task, "fmt", None)

    def context(
        self,
        prompt: Prompt,
        group_id: str,
        i: int,
        admission_version: int,
        tally: list[int] | None = None,
    ) -> EpisodeContext:
        return EpisodeContext(
            self.sampler,
            prompt,
            self.limits,
            seed_key=(self.sampler.seed, group_id, i),
            temperature=self.temperature,
            min_version=admission_version,
            fmt=self.fmt,
            tally=tally,
        )

    async def episode(self, ctx: EpisodeContext) -> tuple[SampleOut, float]:
        """One episode, capped in time; ``GroupRejected`` on a user error or timeout."""
        if self.endpoint is None:
            return await self._episode(ctx)
        await self.endpoint.start()
        ctx.openai_base_url = self.endpoint.register(ctx)
        try:
            return await self._episode(ctx)
        finally:
            self.endpoint.unregister(ctx.openai_base_url)

    async def close(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.close()

    async def _episode(self, ctx: EpisodeContext) -> tuple[SampleOut, float]:
        try:
            reward: Any = await asyncio.wait_for(self.fn(ctx, ctx.prompt), self.timeout_s)
        except EpisodeLimit:
            if ctx.internal_error is not None:
                raise ctx.internal_error from None
            ctx.finish_reason = "length"
            reward = 0.0
        except TimeoutError:
            if ctx.internal_error is not None:
                raise ctx.internal_error from None
            raise GroupRejected(
                "episode_timeout", f"episode of {ctx.prompt.id} ran past {self.timeout_s} s"
            ) from None
        except Exception as e:
            if ctx.internal_error is not None:
                raise ctx.internal_error from None
            raise GroupRejected("episode_error", f"episode of {ctx.prompt.id}: {e!r}") from None
        if ctx.internal_error is not None:
            raise ctx.internal_error
        out = ctx.sample_out()
        if isinstance(reward, list | tuple):
            out.turn_rewards = _turn_rewards(reward, ctx)
            return out, math.fsum(out.turn_rewards)
        if not _is_reward(reward):
            raise GroupRejected(
                "episode_error", f"episode of {ctx.prompt.id} returned {reward!r}, not a reward"
            )
        return out, float(reward)

    async def group(
        self,
        prompt: Prompt,
        group_id: str,
        admission_version: int,
        tally: list[int] | None = None,
    ) -> tuple[list[SampleOut], list[float]]:
        """``n_samples`` episodes of ``prompt`` and their rewards (``Sampler.group``'s
        contract, ``tally`` included: the tokens the episodes sampled, counted as they come)."""
        done = await all_or_nothing(
            [
                self.episode(self.context(prompt, group_id, i, admission_version, tally))
                for i in range(self.n_samples)
            ]
        )
        return [o for o, _ in done], [r for _, r in done]


def episode_runner(task: Task, rc: Any, sampler: Sampler) -> EpisodeRunner | None:
    """The worker's runner for ``rollout.episode`` (``rc``: the ``rollout`` section), or None
    when the run has no episode function."""
    if not rc.episode:
        return None
    if rc.eval_every:
        raise TaskError(
            "rollout.eval_every: held-out evals are single-turn and do not run episodes yet; "
            "set it to 0 with rollout.episode"
        )
    return EpisodeRunner(
        resolve_episode_fn(rc.episode),
        sampler,
        task,
        EpisodeLimits(
            max_turns=rc.episode_max_turns,
            max_tokens=rc.episode_max_tokens,
            max_new_tokens=sampler.max_new_tokens,
        ),
        timeout_s=rc.episode_timeout_s,
        n_samples=rc.n_samples,
        temperature=rc.temperature,
        endpoint=OpenAIEndpoint(rc.openai_host, rc.openai_port) if rc.openai_endpoint else None,
    )
