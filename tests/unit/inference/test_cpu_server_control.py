"""inference/cpu_server/{scheduler,control,app}.py over a fake engine (no model, no process):
the app runs in-process on aiohttp's test server, so every request takes the real HTTP path.

The same rules with a real model, as a process, are in tests/integration/test_cpu_server.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
import pytest_asyncio
from aiohttp import test_utils

from inference.cpu_server.app import ADMIN_PATHS, CPUServer
from inference.cpu_server.engine import Engine
from inference.cpu_server.sampling import Req

pytestmark = pytest.mark.timeout(30)

LONG = 100_000  # max_new_tokens of a request that runs until it is aborted


class FakeEngine:
    """``Engine``'s surface for the scheduler: each step adds token 1 to every running row and
    prefills the admitted ones, stamping the live weight version, as ``Engine.step`` does."""

    def __init__(self) -> None:
        self.rows: list[Req] = []
        self.max_batch = 8
        self.weight_version = "0"
        self.vocab_size = 16
        self.max_positions = 1 << 30
        self.eos_ids: frozenset[int] = frozenset()
        self.model_path = "fake"
        self.config = SimpleNamespace(model_type="fake", architectures=["Fake"])
        self.fail_next_step = False
        self.loads: list[tuple[str, int]] = []  # (path, rows running at the load)

    def step(self, admitted: list[Req]) -> list[Req]:
        time.sleep(0.001)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        self.rows += admitted
        finished = []
        for r in self.rows:
            r.output_ids.append(1)
            r.logprobs.append(-0.5)
            r.versions.append(self.weight_version)
            if len(r.output_ids) >= r.sampling.max_new_tokens:
                r.finish_reason = {"type": "length", "length": len(r.output_ids)}
                r.weight_version = self.weight_version
                finished.append(r)
        self.remove(set(finished))
        return finished

    def remove(self, reqs: set[Req]) -> None:
        self.rows = [r for r in self.rows if r not in reqs]

    def load_from_disk(self, path: str) -> None:
        if path == "bad":
            raise ValueError("bad weights")
        self.loads.append((path, len(self.rows)))
        self.model_path = path


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[test_utils.TestClient[Any, Any], FakeEngine]]:
    engine = FakeEngine()
    server = CPUServer(cast(Engine, engine), admin_api_key="k")
    async with test_utils.TestClient(test_utils.TestServer(server.app())) as client:
        yield client, engine


AUTH = {"Authorization": "Bearer k"}


async def generate(
    client: test_utils.TestClient[Any, Any], n: int, rid: str | None = None
) -> tuple[int, Any]:
    body: dict[str, Any] = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": n}}
    if rid is not None:
        body["rid"] = rid
    async with client.post("/generate", json=body) as r:
        return r.status, await r.json()


async def until_running(engine: FakeEngine, count: int = 1) -> None:
    while len(engine.rows) < count:
        await asyncio.sleep(0.001)


async def test_failed_step_answers_500_and_keeps_serving(served: Any) -> None:
    client, engine = served
    running = asyncio.create_task(generate(client, LONG))
    await until_running(engine)
    engine.fail_next_step = True
    status, body = await running
    assert status == 500 and "engine step failed: RuntimeError('boom')" in body["error"]["message"]
    assert engine.rows == []  # the running batch is dropped with its torn cache
    status, body = await generate(client, 3)
    assert status == 200 and body["output_ids"] == [1, 1, 1]


async def test_update_with_abort_all_returns_partial_with_old_version(served: Any) -> None:
    client, engine = served
    running = asyncio.create_task(generate(client, LONG, rid="long"))
    await until_running(engine)
    upd = {"model_path": "v1", "weight_version": "1", "abort_all_requests": True}
    async with client.post("/update_weights_from_disk", json=upd, headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["success"] is True
    assert engine.loads == [("v1", 0)]  # aborted before the load
    status, body = await running
    meta = body["meta_info"]
    assert status == 200 and meta["finish_reason"]["type"] == "abort"
    assert meta["weight_version"] == "0" and {s["version"] for s in meta["weight_versions"]} == {
        "0"
    }
    _, after = await generate(client, 2)
    assert after["meta_info"]["weight_versions"] == [{"version": "1", "start": 0, "end": 2}]


async def test_update_waits_for_inflight_and_holds_new_requests(served: Any) -> None:
    client, engine = served
    first = asyncio.create_task(generate(client, 200))
    await until_running(engine)
    upd = {"model_path": "v1", "weight_version": "1"}
    update = asyncio.create_task(client.post("/update_weights_from_disk", json=upd, headers=AUTH))
    await asyncio.sleep(0.02)
    held = asyncio.create_task(generate(client, 2))  # arrives while the update waits
    _, done = await first
    assert done["meta_info"]["finish_reason"]["type"] == "length"
    assert [s["version"] for s in done["meta_info"]["weight_versions"]] == ["0"]
    async with await update as r:
        assert r.status == 200
    assert engine.loads == [("v1", 0)]
    _, later = await held
    assert later["meta_info"]["weight_versions"] == [{"version": "1", "start": 0, "end": 2}]


async def test_failed_load_answers_400_and_keeps_the_version(served: Any) -> None:
    client, _ = served
    upd = {"model_path": "bad", "weight_version": "9"}
    async with client.post("/update_weights_from_disk", json=upd, headers=AUTH) as r:
        assert r.status == 400
        assert await r.json() == {
            "success": False,
            "message": "Failed to update weights: bad weights",
        }
    async with client.get("/model_info") as r:
        info = await r.json()
    assert info["weight_version"] == "0" and info["model_path"] == "fake"
    status, _ = await generate(client, 1)  # admission is open again
    assert status == 200


async def test_flush_cache_refused_while_requests_are_pending(served: Any) -> None:
    client, engine = served
    async with client.post("/flush_cache", headers=AUTH) as r:
        assert (r.status, await r.text()) == (200, "Cache flushed.\n")
    running = asyncio.create_task(generate(client, LONG))
    await until_running(engine)
    async with client.post("/flush_cache", headers=AUTH) as r:
        assert r.status == 400 and "running or waiting" in await r.text()
    async with client.post("/abort_request", json={"abort_all": True}, headers=AUTH) as r:
        assert r.status == 200
    status, body = await running
    assert status == 200 and body["meta_info"]["finish_reason"]["type"] == "abort"


async def test_in_place_pause_keeps_rows_until_continue(served: Any) -> None:
    client, engine = served
    running = asyncio.create_task(generate(client, 50))
    await until_running(engine)
    for mode, status in (("retract", 400), ("bogus", 400), ("in_place", 200)):
        async with client.post("/pause_generation", json={"mode": mode}, headers=AUTH) as r:
            assert r.status == status, mode
    async with client.get("/ready") as r:
        assert r.status == 503
    steps = len(engine.rows[0].output_ids)
    await asyncio.sleep(0.05)
    assert len(engine.rows[0].output_ids) == steps and not running.done()
    async with client.post("/continue_generation", json={}, headers=AUTH) as r:
        assert r.status == 200
    _, body = await running
    assert body["meta_info"]["finish_reason"]["type"] == "length"


async def test_admin_paths_need_the_key_and_duplicate_rids_are_refused(served: Any) -> None:
    client, engine = served
    for path in sorted(ADMIN_PATHS):
        async with client.post(path, json={}) as r:
            assert r.status == 401, path
            assert "Unauthorized" in (await r.json())["error"]["message"]
    running = asyncio.create_task(generate(client, LONG, rid="same"))
    await until_running(engine)
    status, body = await generate(client, 1, rid="same")
    assert (status, body["error"]["message"]) == (400, "Duplicate request ID: same")
    async with client.post("/abort_request", json={"rid": "sa"}, headers=AUTH) as r:
        assert r.status == 200
    _, body = await running
    assert body["meta_info"]["finish_reason"]["type"] == "abort"
    async with client.get("/model_info") as r:
        assert (await r.json())["requests"] == 1  # the duplicate was not counted
