"""``SGLangClient`` against a real CPU reference server (``sluice serve``, started by pid):
generation, abort mid-generation and resubmission of prompt + partial, the fast weight swap
(``update_weights_from_disk`` with ``abort_all_requests``), model_info, error mapping, and a
killed server seen as ``ServerDead``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inference.client import SGLangClient
from inference.launch import ServerHandle, launch_cpu_server
from inference.protocol import (
    GenerateResult,
    InferenceError,
    InvalidInputError,
    SamplingParams,
    ServerDead,
)

pytestmark = pytest.mark.timeout(90)

VOCAB = 64
KEY = "admin-k3y"
LONG = 3000  # tokens: seconds of decoding for the tiny model, so there is time to interrupt
PROMPT = [1, 7, 9, 11]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny models of the same shape with different random weights."""
    from inference.models import init_tiny_model

    root = tmp_path_factory.mktemp("models")
    kw = {"vocab": VOCAB, "layers": 1, "hidden": 32, "max_positions": 4096}
    return init_tiny_model(root / "v0", seed=0, **kw), init_tiny_model(root / "v1", seed=1, **kw)


@pytest.fixture(scope="module")
def server(
    models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    log = tmp_path_factory.mktemp("logs") / "cpu.log"
    handle = launch_cpu_server(models[0], admin_api_key=KEY, log_path=log, timeout=120)
    yield handle
    handle.stop()


def long_sampling() -> SamplingParams:
    return SamplingParams(LONG, ignore_eos=True, sampling_seed=5)


_pace: list[float] = []


async def started(task: asyncio.Task[GenerateResult], client: SGLangClient) -> None:
    """Let a long generate get about a quarter of the way (timed from this machine's decode
    speed, measured once) and check it did not finish or fail early."""
    if not _pace:
        probe = await client.generate([1, 2], SamplingParams(200, ignore_eos=True))
        assert probe.e2e_latency is not None
        _pace.append(probe.e2e_latency / 200)
    await asyncio.sleep(min(2.0, max(0.2, 0.25 * LONG * _pace[0])))
    assert not task.done(), "the long generate ended before it could be interrupted"


async def test_generate_and_model_info(server: ServerHandle) -> None:
    async with SGLangClient(server.url) as c:  # vocab from the server's model_info
        info = await c.model_info()
        assert info["vocab_size"] == VOCAB and await c.vocab_size() == VOCAB
        version = await c.weight_version()
        assert version is not None
        greedy = SamplingParams(12, temperature=0.0, ignore_eos=True)
        a = await c.generate(np.array(PROMPT), greedy)
        b = await c.generate(PROMPT, greedy)
        assert a.rid != b.rid
        assert a.finish_reason == "length" and a.num_tokens == 12 == a.completion_tokens
        assert a.prompt_tokens == len(PROMPT)
        assert a.output_ids.tolist() == b.output_ids.tolist()
        assert np.all(a.logprobs <= 0) and np.all(np.isfinite(a.logprobs))
        assert a.weight_version == version and a.token_versions.tolist() == [version] * 12  # type: ignore[union-attr]
        with pytest.raises(InvalidInputError, match="vocab_size 64"):
            await c.generate([1, VOCAB], greedy)


async def test_pause_abort_then_resubmit_completes(server: ServerHandle) -> None:
    async with server.client() as c:
        gen = asyncio.create_task(c.generate(PROMPT, long_sampling()))
        await started(gen, c)
        await c.pause("abort")
        try:
            part = await asyncio.wait_for(gen, 10)
            assert part.aborted and 0 < part.num_tokens < LONG
            assert part.token_versions is not None and len(part.token_versions) == part.num_tokens
        finally:
            await c.resume()
        rest = await c.generate(
            PROMPT + part.output_ids.tolist(),
            long_sampling().replace(max_new_tokens=LONG - part.num_tokens),
        )
    assert rest.finish_reason == "length"
    assert part.num_tokens + rest.num_tokens == LONG
    assert rest.prompt_tokens == len(PROMPT) + part.num_tokens


async def test_abort_by_rid_returns_partial(server: ServerHandle) -> None:
    async with server.client() as c:
        gen = asyncio.create_task(c.generate(PROMPT, long_sampling(), rid="abort-me-1"))
        await started(gen, c)
        await c.abort("abort-me-1")
        part = await asyncio.wait_for(gen, 10)
    assert part.aborted and part.rid == "abort-me-1" and 0 < part.num_tokens < LONG


async def test_update_weights_with_abort_all_changes_version(
    server: ServerHandle, models: tuple[Path, Path]
) -> None:
    async with server.client() as c:
        old = await c.weight_version()
        assert old is not None
        new = old + 1
        target = models[1] if (await c.model_info())["model_path"] == str(models[0]) else models[0]
        gens = [asyncio.create_task(c.generate(PROMPT, long_sampling())) for _ in range(2)]
        await started(gens[0], c)
        resp = await c.update_weights_from_disk(str(target), new, abort_all_requests=True)
        assert resp["success"] is True
        parts = await asyncio.wait_for(asyncio.gather(*gens), 10)
        for p in parts:  # came back partial, labelled with the version that generated them
            assert p.aborted and p.num_tokens < LONG
            assert p.weight_version == old and set(p.token_versions.tolist()) <= {old}  # type: ignore[union-attr]
        info = await c.model_info()
        assert info["model_path"] == str(target) and await c.weight_version() == new
        after = await c.generate(PROMPT, SamplingParams(4, ignore_eos=True))
        assert after.weight_version == new and after.token_versions.tolist() == [new] * 4  # type: ignore[union-attr]
        with pytest.raises(InferenceError) as ei:
            await c.update_weights_from_disk(str(target.parent / "missing"), new + 1)
        assert await c.weight_version() == new  # a failed update changes nothing
    assert "missing" in ei.value.message


async def test_bad_requests_map_to_inference_error(server: ServerHandle) -> None:
    async with server.client(validate_ids=False) as c:
        cases = [
            ([1, 2], {"max_new_tokens": 4, "bogus_key": 1}, "bogus_key"),
            ([1, 2], {"max_new_tokens": 4, "temperature": -1}, "temperature"),
            ([1, VOCAB + 5], {"max_new_tokens": 4}, str(VOCAB + 5)),
        ]
        for ids, sp, word in cases:
            with pytest.raises(InferenceError) as ei:
                await c.generate(ids, sp)
            assert ei.value.status == 400 and ei.value.path == "/generate"
            assert word in ei.value.message
        assert await c.health()  # the server survived all of them
        assert (await c.generate([1, 2], SamplingParams(2))).num_tokens == 2


async def test_control_calls_need_the_admin_key(server: ServerHandle) -> None:
    async with SGLangClient(server.url, vocab_size=VOCAB) as c:
        with pytest.raises(InferenceError) as ei:
            await c.pause("abort")
        assert ei.value.status == 401
        assert (await c.generate([1, 2], SamplingParams(2))).num_tokens == 2  # not paused


async def test_killed_server_is_server_dead(models: tuple[Path, Path], tmp_path: Path) -> None:
    handle = launch_cpu_server(models[0], log_path=tmp_path / "cpu.log")
    try:
        async with handle.client(connect_retries=1, backoff=0.01) as c:
            gen = asyncio.create_task(c.generate(PROMPT, long_sampling()))
            await started(gen, c)
            handle.kill()
            with pytest.raises(ServerDead, match="connection dropped"):
                await asyncio.wait_for(gen, 10)
            with pytest.raises(ServerDead, match="cannot connect"):
                await c.health()
    finally:
        handle.stop()
