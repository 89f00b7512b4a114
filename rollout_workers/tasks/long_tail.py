"""``long-tail``: long outputs with heavy-tailed target lengths, for throughput benchmarks.

A "count on" task written like a reasoning trace: the prompt gives a length n (decimal
digits) and a start digit s; the right output is ``s, s+1, s+2, ... (mod 10)`` — n digits —
then EOS. The target lengths n are lognormal (``median`` and ``sigma``), clipped to
``[min_len, max_len]``, so most outputs are short and a few are very long: the length mix
that makes synchronous RL wait on stragglers.

Vocabulary (16 ids): PAD=0, BOS=1, EOS=2, SEP=3, digit d = 4 + d, LEN=14, START=15.
Prompt ``[BOS, LEN, <digits of n>, START, s, SEP]``.
Reward = (positions i < n with the right digit) / max(n, length of the output before EOS):
partial credit, and writing past n costs as much as stopping short.

``fixed_lengths`` (off by default; on in the pipeline bench's long-tail workloads): every sample
is generated to a fixed length instead of until EOS, so a group costs the same whatever the
policy has learnt. Sample ``j`` of prompt ``p`` draws ``L`` from the same clipped lognormal
with an RNG seeded by ``(seed, p.id, j)`` and generates exactly ``L + 1`` tokens (as long as a
right answer to a length-``L`` prompt with its EOS) with ``ignore_eos``; a resubmission after
an abort keeps that budget. Lengths are independent of the prompt's own ``n``: the reward is
unchanged (it reads the output up to its first EOS and ignores the rest), so a sample with
``L >= n`` can still score 1 by writing EOS after ``n`` digits, and one with ``L < n`` at most
``L / n``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, ClassVar

from rollout_workers.tasks.base import BOS, EOS, Prompt, Split, Task, check_split, until_eos

SEP, DIGIT0, LEN, START = 3, 4, 14, 15


class LongTailTask(Task):
    name = "long-tail"
    vocab_size = 16
    eos_token_id = EOS
    option_help: ClassVar[dict[str, str]] = {
        "median": "median target output length (tokens before EOS)",
        "sigma": "lognormal sigma of the target lengths (0 = all equal to median)",
        "min_len": "shortest target length",
        "max_len": "longest target length (max_new_tokens is max_len + 1)",
        "n_train": "train prompts",
        "n_eval": "held-out eval prompts",
        "seed": "prompt generation seed",
        "fixed_lengths": "generate each sample to a fixed length drawn from the same lognormal "
        "(per prompt id and sample, seeded), ignoring EOS: the cost of a group does not drift "
        "with the policy (benchmarks)",
    }

    def __init__(
        self,
        median: float = 64.0,
        sigma: float = 1.0,
        min_len: int = 4,
        max_len: int = 1024,
        n_train: int = 1024,
        n_eval: int = 128,
        seed: int = 0,
        fixed_lengths: bool = False,
    ) -> None:
        if not (median > 0 and sigma >= 0 and 1 <= min_len <= max_len):
            raise ValueError(
                f"need median > 0, sigma >= 0, 1 <= min_len <= max_len; got {median}, {sigma}, "
                f"{min_len}, {max_len}"
            )
        if n_train < 1 or n_eval < 0:
            raise ValueError(f"need n_train >= 1 and n_eval >= 0, got {n_train}, {n_eval}")
        self.median, self.sigma = float(median), float(sigma)
        self.min_len, self.max_len = min_len, max_len
        if not isinstance(fixed_lengths, bool):
            raise ValueError(f"fixed_lengths must be true or false, got {fixed_lengths!r}")
        self.n_train, self.n_eval, self.seed = n_train, n_eval, seed
        self.fixed_lengths = fixed_lengths
        self.max_new_tokens = max_len + 1
        self._cache: dict[str, list[Prompt]] = {}

    def target_length(self, rng: random.Random) -> int:
        n = round(math.exp(math.log(self.median) + self.sigma * rng.gauss(0.0, 1.0)))
        return max(self.min_len, min(self.max_len, n))

    def output_length(self, prompt: Prompt, sample: int) -> int | None:
        """With ``fixed_lengths``: ``L + 1`` tokens, ``L`` drawn like a target length by an RNG
        seeded with ``(seed, prompt id, sample)``; in ``[min_len + 1, max_new_tokens]``."""
        if not self.fixed_lengths:
            return None
        rng = random.Random(f"long-tail/output-length/{self.seed}/{prompt.id}/{sample}")
        return self.target_length(rng) + 1

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fixed_lengths": self.fixed_lengths}

    def prompts(self, split: Split) -> Sequence[Prompt]:
        check_split(split)
        if split not in self._cache:
            count = self.n_train if split == "train" else self.n_eval
            rng = random.Random(f"long-tail/{split}/{self.seed}")
            out = []
            for i in range(count):
                n, s = self.target_length(rng), rng.randrange(10)
                ids = [BOS, LEN, *(DIGIT0 + int(c) for c in str(n)), START, DIGIT0 + s, SEP]
                out.append(Prompt(id=f"long-tail-{split}-{i}", input_ids=ids, answer=[n, s]))
            self._cache[split] = out
        return self._cache[split]

    def reward(self, prompt: Prompt, output_ids: list[int]) -> float:
        n, s = int(prompt.answer[0]), int(prompt.answer[1])
        out, _ = until_eos(output_ids, EOS)
        right = sum(1 for i in range(min(n, len(out))) if out[i] == DIGIT0 + (s + i) % 10)
        return right / max(n, len(out))
