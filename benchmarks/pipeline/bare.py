"""Bare decode: the server driven without sluice, at the worker's concurrency, for the
generation ceiling's ``worker_vs_bare`` ratio.

A closed loop of ``concurrency`` requests (each finished request is replaced at once, as the
worker replaces finished samples), the workload's own prompts and fixed output lengths
(``Task.output_length``: ``ignore_eos`` + ``max_new_tokens``), and the request body the
worker's client sends (``return_logprob``, ``logprob_start_len = -1``), over plain ``aiohttp``:
no Redis, no gate, no rewards, no grouping. Tokens/s = output tokens of the requests that
finished inside the measured window (after ``warm_s``) / the window, the accounting of the
generation ceiling (groups finished between two marks).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from inference.protocol import SamplingParams


@dataclass(frozen=True)
class BareSpec:
    """What the bare loop sends: the worker's prompts, lengths and concurrency."""

    task: Any
    """The workload's task (``rollout_workers.tasks``): prompts and ``output_length``."""
    n_samples: int
    concurrency: int
    temperature: float = 1.0
    max_new_tokens: int = 512
    """Cap for a task without fixed lengths (the worker's cap as well)."""
    warm_s: float = 3.0
    measure_s: float = 20.0


def _requests(spec: BareSpec) -> itertools.cycle[tuple[list[int], int]]:
    """(prompt ids, max_new_tokens) of every sample of every train prompt, in order."""
    out = []
    for p in spec.task.prompts("train"):
        for j in range(spec.n_samples):
            n = spec.task.output_length(p, j)
            out.append((list(p.input_ids), min(n, spec.max_new_tokens) if n else 0))
    return itertools.cycle(out)


async def _loop(url: str, spec: BareSpec) -> dict[str, Any]:
    import aiohttp

    reqs = _requests(spec)
    rng = random.Random(0)
    done: list[tuple[float, int]] = []  # (finish time, output tokens)
    short = 0  # fixed-length requests answered with another length than asked
    t_start = time.monotonic()
    t_end = t_start + spec.warm_s + spec.measure_s
    fixed = spec.task.output_length(spec.task.prompts("train")[0], 0) is not None

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal short
        while time.monotonic() < t_end:
            ids, n = next(reqs)
            sp = SamplingParams(
                max_new_tokens=n if fixed else spec.max_new_tokens,
                temperature=spec.temperature,
                stop_token_ids=() if fixed else (spec.task.eos_token_id,),
                ignore_eos=fixed,
                sampling_seed=rng.getrandbits(62),
            )
            body = {
                "rid": uuid.uuid4().hex,
                "input_ids": ids,
                "sampling_params": sp.to_dict(),
                "return_logprob": True,
                "logprob_start_len": -1,
                "stream": False,
            }
            async with s.post(url + "/generate", json=body) as r:
                r.raise_for_status()
                out = await r.json()
            got = len(out["output_ids"])
            short += fixed and got != n
            done.append((time.monotonic(), got))

    conn = aiohttp.TCPConnector(limit=spec.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        await asyncio.gather(*(client(s) for _ in range(spec.concurrency)))
    w0 = t_start + spec.warm_s
    window = [n for t, n in done if w0 <= t <= t_end]
    return {
        "tokens_per_s": sum(window) / spec.measure_s,
        "requests": len(window),
        "tokens": sum(window),
        "concurrency": spec.concurrency,
        "warm_s": spec.warm_s,
        "measure_s": spec.measure_s,
        "fixed_lengths": fixed,
        "length_mismatches": short,
    }


def bare_decode(url: str, spec: BareSpec) -> dict[str, Any]:
    """Run the closed loop against the server at ``url``; its result (see the module doc)."""
    return asyncio.run(_loop(url, spec))
