"""Generating one group: ``n`` samples of one prompt at once, each with its own sampling seed,
across weight updates and dead servers, then scored.

A sample is generated in segments. When the server answers ``abort`` (a weight update
interrupted it) or dies, the sampler resubmits ``prompt + partial output`` with the remaining
budget, to a server at least as new as the group's admission version; the sample's tokens,
log-probs and per-token versions are its segments' concatenated. A task may fix a sample's
output length (``Task.output_length``, e.g. ``long-tail`` with ``fixed_lengths``): the sample is
then generated with ``ignore_eos`` and ``max_new_tokens`` = that length (capped by the rollout's
``max_new_tokens``), and a resubmission asks for the length minus the tokens already generated,
so it ends at exactly that length however often it is interrupted. A sample resubmitted more
than ``MAX_SEGMENTS`` times fails its group. Sampling seeds are ``seed_for(run seed, group id,
sample, segment, attempt)``: distinct per sample, reproducible per run.

Invariant (tests/integration/test_rollout_worker.py::test_weight_update_mid_generation_logprobs_match_recorded_versions,
tests/unit/rollout_workers/test_rollout_workers_sampler.py): per-token versions come only from
the server's answers (``GenerateResult.token_versions``), never from the worker's view; a
segment with tokens and without versions fails its group (``no_token_versions``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from buffer.schema import Sample, TrajectoryGroup
from inference.protocol import InferenceError, SamplingParams, ServerDead
from rollout_workers.config import RolloutConfig
from rollout_workers.metrics import Counters
from rollout_workers.pool import ServerPool, Shutdown
from rollout_workers.prompts import Lease
from rollout_workers.rewards import RewardFailure, RewardRunner
from rollout_workers.tasks.base import Prompt

log = logging.getLogger("sluice.rollout")

T = TypeVar("T")

MAX_SEGMENTS = 1000
"""A sample resubmitted more often than this (aborted again and again) fails its group."""
SERVER_ERROR_RETRIES = 3
"""A generate answered with HTTP 5xx is retried this often before the group fails."""


class GroupRejected(Exception):
    """The group cannot be pushed; ``reason`` is the tag its slot is handed back with."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class SampleOut:
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    segments: int = 0
    """Times the sample was interrupted by an abort and resubmitted."""
    loss_mask: list[int] | None = None
    """An episode's (``rollout_workers.episodes``): 1 sampled, 0 appended; None = all 1."""
    turn_starts: list[int] | None = None
    """An episode's model-turn offsets; None = one turn."""
    turn_rewards: list[float] | None = None
    """An episode's per-turn rewards when it scored its turns (summing to its reward)."""


def seed_for(*parts: object) -> int:
    """A 62-bit sampling seed from ``parts`` (run seed, group id, sample, segment)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


async def all_or_nothing(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently; on the first exception cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled():
                exc = t.exception()
                if exc is not None:
                    raise exc
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Sampler:
    """Generates samples on the pool's servers and scores them."""

    def __init__(
        self,
        pool: ServerPool,
        rc: RolloutConfig,
        rewards: RewardRunner,
        counters: Counters,
        *,
        seed: int,
        eos_token_id: int,
        max_new_tokens: int,
        on_interrupted: Callable[[int], None] = lambda reprefill: None,
        output_length: Callable[[Prompt, int], int | None] = lambda prompt, sample: None,
        stop_token_ids: tuple[int, ...] | None = None,
    ) -> None:
        self.pool = pool
        self.rc = rc
        self.rewards = rewards
        self.counters = counters
        self.seed = seed
        self.eos_token_id = eos_token_id
        self.stop_token_ids = tuple(stop_token_ids) if stop_token_ids else (eos_token_id,)
        """Sent as ``stop_token_ids`` (``Task.stop_token_ids``: a text task's tokenizer EOS and
        its generation-config EOS ids), except for fixed-length samples."""
        self.max_new_tokens = max_new_tokens
        self.on_interrupted = on_interrupted
        """Called with the tokens to prefill again each time a sample is interrupted."""
        self.output_length = output_length
        """The task's fixed output length of sample ``i`` of a prompt, or None (``Task.
        output_length``)."""

    async def group(
        self,
        prompt: Prompt,
        group_id: str,
        admission_version: int,
        *,
        tally: list[int] | None = None,
    ) -> tuple[list[SampleOut], list[float]]:
        """``rollout.n_samples`` samples of ``prompt`` on weights at least
        ``admission_version``, and their rewards; ``GroupRejected`` if scoring fails.
        ``tally[0]`` grows by every token the servers return for the group, as they return it
        (what is lost if the group is cancelled)."""
        ids = list(prompt.input_ids)
        outs = await all_or_nothing(
            [
                self.sample(
                    ids,
                    (self.seed, group_id, i),
                    self.rc.temperature,
                    min_version=admission_version,
                    length=self.output_length(prompt, i),
                    tally=tally,
                )
                for i in range(self.rc.n_samples)
            ]
        )
        try:
            rewards = await all_or_nothing([self.rewards.score(prompt, o.output_ids) for o in outs])
        except RewardFailure as e:
            raise GroupRejected(e.reason, e.detail) from None
        return outs, rewards

    def _params(
        self, remaining: int, temperature: float, seed: int, *, fixed: bool = False
    ) -> SamplingParams:
        """A fixed-length request sends ``ignore_eos`` and no stop ids (the request shape whose
        answer was recorded from SGLang: exactly ``max_new_tokens`` tokens, tests/fixtures)."""
        return SamplingParams(
            max_new_tokens=remaining,
            temperature=temperature,
            top_p=self.rc.top_p,
            top_k=self.rc.top_k,
            stop_token_ids=() if fixed else self.stop_token_ids,
            ignore_eos=fixed or self.rc.ignore_eos,
            sampling_seed=seed,
        )

    async def sample(
        self,
        prompt_ids: list[int],
        seed_key: tuple[object, ...],
        temperature: float,
        *,
        min_version: int = 0,
        length: int | None = None,
        tally: list[int] | None = None,
        max_new_tokens: int | None = None,
    ) -> SampleOut:
        """One sample, resubmitted as ``prompt + partial`` after every abort or dead server;
        with ``length`` exactly ``min(length, max_new_tokens)`` tokens, EOS ignored;
        ``max_new_tokens`` overrides the rollout's budget (an episode's turn)."""
        if length is not None and length < 1:
            raise ValueError(f"a fixed output length must be >= 1, got {length}")
        cap = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        budget = cap if length is None else min(length, cap)
        out = SampleOut()
        attempt = 0
        while True:
            remaining = budget - len(out.output_ids)
            if remaining <= 0:
                out.finish_reason = "length"
                return out
            if out.segments + attempt >= MAX_SEGMENTS:
                raise GroupRejected("inference_error", f"sample resubmitted {MAX_SEGMENTS} times")
            s = await self.pool.acquire(min_version)
            sp = self._params(
                remaining,
                temperature,
                seed_for(*seed_key, out.segments, attempt),
                fixed=length is not None,
            )
            rid = uuid.uuid4().hex
            s.track(rid)
            lora = s.use_adapter()
            try:
                if lora is None:
                    res = await s.client.generate(prompt_ids + out.output_ids, sp, rid)
                else:  # every token is labelled with the adapter's version (inference.lora)
                    res = await s.client.generate(
                        prompt_ids + out.output_ids, sp, rid, lora_path=lora
                    )
            except ServerDead as e:
                attempt += 1
                self.counters.resubmitted_dead += 1
                log.warning("sample on %s lost (%s); resubmitting elsewhere", s.url, e)
                self.pool.mark_dead(s)
                continue
            except InferenceError as e:
                if e.status >= 500 and attempt < SERVER_ERROR_RETRIES:
                    attempt += 1
                    log.warning("generate on %s failed (%s); retrying", s.url, e)
                    await asyncio.sleep(0.1 * attempt)
                    continue
                raise
            finally:
                s.untrack(rid)
                s.release_adapter(lora)
            if res.num_tokens and res.token_versions is None:
                raise GroupRejected(
                    "no_token_versions",
                    f"server {s.url} reported no weight version for its tokens: start it with "
                    "--weight-version (per-token versions must come from the server)",
                )
            if tally is not None:
                tally[0] += res.num_tokens
            out.output_ids += res.output_ids.tolist()
            out.logprobs += res.logprobs.tolist()
            if res.token_versions is not None:
                out.versions += res.token_versions.tolist()
            if not res.aborted:
                out.finish_reason = res.finish_reason
                return out
            if self.pool.closed:
                raise Shutdown()
            out.segments += 1
            reprefill = len(prompt_ids) + len(out.output_ids)
            self.counters.interrupted_samples += 1
            self.counters.reprefill_tokens += reprefill
            self.on_interrupted(reprefill)


def trajectory_group(
    *,
    run: str,
    worker_id: str,
    task: str,
    lease: Lease,
    group_id: str,
    admission_version: int,
    admitted_at: float,
    outs: list[SampleOut],
    rewards: list[float],
) -> TrajectoryGroup:
    """The wire record of one generated group (``buffer.schema``)."""
    return TrajectoryGroup(
        run_id=run,
        prompt_id=lease.prompt.id,
        prompt_ids=np.asarray(list(lease.prompt.input_ids), dtype=np.int32),
        samples=[
            Sample(
                output_ids=np.asarray(o.output_ids, dtype=np.int32),
                behaviour_logp=np.asarray(o.logprobs, dtype=np.float32),
                token_versions=np.asarray(o.versions, dtype=np.int32),
                reward=r,
                finish_reason=o.finish_reason,
                index=i,
                loss_mask=None if o.loss_mask is None else np.asarray(o.loss_mask, np.int32),
                turn_starts=None if o.turn_starts is None else np.asarray(o.turn_starts, np.int32),
                turn_rewards=(
                    None if o.turn_rewards is None else np.asarray(o.turn_rewards, np.float32)
                ),
            )
            for i, (o, r) in enumerate(zip(outs, rewards, strict=True))
        ],
        worker_id=worker_id,
        admission_version=admission_version,
        group_id=group_id,
        created_at=admitted_at,
        finished_at=time.time(),
        metadata={
            "task": task,
            "prompt_epoch": lease.epoch,
            "prompt_pos": lease.pos,
            "lease_source": lease.source,
            "segments": sum(o.segments for o in outs),
        },
    )
