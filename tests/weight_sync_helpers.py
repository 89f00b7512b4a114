"""What the weight-sync integration tests (disk catch-up, distributed, ipc) ask of a live CPU
server: wait for a condition, read its version label, compare its weights with a model's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import torch


async def until(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def server_version(url: str) -> str | None:
    try:
        async with aiohttp.ClientSession() as s, s.get(url + "/model_info") as r:
            return str((await r.json())["weight_version"])
    except aiohttp.ClientError:
        return None


async def server_params_differ(url: str, model: Any) -> list[str]:
    """Names of the parameters whose value on the server differs from ``model``'s (exactly)."""
    bad = []
    async with aiohttp.ClientSession() as s:
        for name, p in model.named_parameters():
            body = {"name": name, "truncate_size": 10**6}
            async with s.post(url + "/get_weights_by_name", json=body) as r:
                assert r.status == 200, name
                value = torch.tensor(await r.json(), dtype=p.dtype)
            if not torch.equal(value, p.detach()):
                bad.append(name)
    return bad
