"""Episode functions for the episode tests (``rollout.episode: episode_fns:NAME``); they record
what each episode saw in ``SEEN`` (the tests run the worker in-process)."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

SEEN: list[dict[str, Any]] = []
BETWEEN: asyncio.Event | None = None
"""When set by a test: ``two_turns`` waits on it between its turns (counted in ``WAITING``)."""
WAITING: list[str] = []
APPENDED = [5, 6, 7]  # "tool output" token ids (the reverse task's vocabulary)


async def two_turns(ctx: Any, row: Any) -> float:
    """Turn, three appended tokens, turn; the reward is the second turn's length parity."""
    first = await ctx.generate()
    if BETWEEN is not None:
        WAITING.append(row.id)
        await BETWEEN.wait()
    appended = ctx.append(APPENDED)
    second = await ctx.generate()
    SEEN.append(
        {
            "row": row.id,
            "first": first.ids,
            "appended": appended,
            "second": second.ids,
            "versions": first.versions + second.versions,
        }
    )
    return float(len(second.ids) % 2)


async def misbehaving(ctx: Any, row: Any) -> Any:
    """By the row id: a third crash after one turn, a third hang, a third are one-turn
    episodes."""
    kind = zlib.crc32(row.id.encode()) % 3
    if kind == 0:
        await ctx.generate()
        raise RuntimeError(f"tool crashed on {row.id}")
    if kind == 1:
        await asyncio.sleep(3600)
    turn = await ctx.generate()
    return [float(len(turn.ids) > 2)]  # scored per turn (one turn)


async def greedy_turns(ctx: Any, row: Any) -> float:
    """Generates until the turn cap stops it (EpisodeLimit ends the episode)."""
    while True:
        await ctx.generate(max_new_tokens=2)
        ctx.append([5])
