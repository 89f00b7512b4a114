# ruff: noqa: F811  (pytest fixtures imported from cpu_server_fixture are parameters)
"""The CPU reference server, as real processes over HTTP (aiohttp, no client library)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from cpu_server_fixture import cpu_server, cpu_server_factory, make_model, tiny_model  # noqa: F401

from inference.models import load_model
from procs import free_port

ADMIN = "s3cret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


async def post(
    s: aiohttp.ClientSession, url: str, body: Any = None, *, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with s.post(url, json=body, headers=headers) as r:
        text = await r.text()
        try:
            import json

            return r.status, json.loads(text) if text else None
        except ValueError:
            return r.status, text


def gen_body(ids: list[int], **sp: Any) -> dict[str, Any]:
    return {"input_ids": ids, "sampling_params": sp, "return_logprob": True}


def reference_logprobs(model: Any, prompt: list[int], out: list[int], temp: float) -> torch.Tensor:
    """log_softmax(logits / T) of an unbatched transformers forward, at each output token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0].float()
    step = logits[len(prompt) - 1 : len(prompt) - 1 + len(out)]
    t = temp if temp > 0 else 1.0
    return torch.log_softmax(step / t, dim=-1).gather(1, torch.tensor(out)[:, None])[:, 0]


@pytest.mark.timeout(120)
async def test_logprobs_match_transformers_forward(cpu_server: Any, tiny_model: Path) -> None:
    """Concurrent, staggered requests of different lengths: batched, left-padded, joined
    mid-decode; every reported log-prob equals an unbatched forward's to 1e-4."""
    url = cpu_server.url
    cases = [
        (list(range(3, 3 + n)), temp, 20 + 3 * n)
        for n, temp in [(1, 1.0), (5, 0.7), (9, 1.0), (2, 0.7), (12, 0.0), (7, 1.0), (4, 0.7)]
    ]

    async with aiohttp.ClientSession() as s:

        async def one(i: int, ids: list[int], temp: float, n: int) -> Any:
            await asyncio.sleep(0.02 * i)  # later ones join a running batch
            status, body = await post(
                s,
                url + "/generate",
                gen_body(ids, max_new_tokens=n, temperature=temp, ignore_eos=True, sampling_seed=i),
            )
            assert status == 200, body
            return body

        results = await asyncio.gather(*(one(i, *c) for i, c in enumerate(cases)))
    model = load_model(tiny_model)
    for (ids, temp, n), res in zip(cases, results, strict=True):
        meta = res["meta_info"]
        out = res["output_ids"]
        assert len(out) == n and meta["finish_reason"] == {"type": "length", "length": n}
        assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == n
        assert [t for _, t, _ in meta["output_token_logprobs"]] == out
        got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
        want = reference_logprobs(model, ids, out, temp)
        assert (got - want).abs().max().item() <= 1e-4, (temp, ids)
        assert meta["weight_version"] == "0"
        assert meta["weight_versions"] == [{"version": "0", "start": 0, "end": n}]
        if temp == 0:  # greedy: every token is the argmax of the reference
            with torch.no_grad():
                logits = model(torch.tensor([ids + out])).logits[0]
            assert logits[len(ids) - 1 : -1].argmax(-1).tolist() == out


@pytest.mark.timeout(60)
async def test_seed_reproduces_and_stop_tokens(cpu_server: Any) -> None:
    url = cpu_server.url
    async with aiohttp.ClientSession() as s:
        body = gen_body(
            [5, 6, 7], max_new_tokens=30, temperature=1.0, ignore_eos=True, sampling_seed=11
        )
        (_, a), (_, b) = await asyncio.gather(
            post(s, url + "/generate", body), post(s, url + "/generate", body)
        )
        assert a["output_ids"] == b["output_ids"]
        # Stop on a token id: the first output token of `a` becomes a stop id.
        stop = a["output_ids"][0]
        body = gen_body(
            [5, 6, 7], max_new_tokens=30, temperature=1.0, sampling_seed=11, stop_token_ids=[stop]
        )
        _, c = await post(s, url + "/generate", body)
        assert c["output_ids"] == [stop]
        assert c["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        # ignore_eos disables stop ids too (SGLang's rule).
        body["sampling_params"]["ignore_eos"] = True
        _, d = await post(s, url + "/generate", body)
        assert d["output_ids"] == a["output_ids"]
        # top_k=1 is greedy.
        _, g0 = await post(
            s,
            url + "/generate",
            gen_body([9, 9], max_new_tokens=10, temperature=0, ignore_eos=True),
        )
        _, g1 = await post(
            s, url + "/generate", gen_body([9, 9], max_new_tokens=10, top_k=1, ignore_eos=True)
        )
        assert g0["output_ids"] == g1["output_ids"]


@pytest.mark.timeout(120)
async def test_32_concurrent_at_least_4x_faster_than_sequential(cpu_server: Any) -> None:
    url = cpu_server.url
    bodies = [
        gen_body([3 + i % 50, 4, 5], max_new_tokens=64, temperature=1.0, ignore_eos=True)
        for i in range(32)
    ]
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        for b in bodies:
            status, _ = await post(s, url + "/generate", b)
            assert status == 200
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = await asyncio.gather(*(post(s, url + "/generate", b) for b in bodies))
        concurrent = time.perf_counter() - t0
    assert all(st == 200 and len(r["output_ids"]) == 64 for st, r in res)
    assert sequential / concurrent >= 4.0, (sequential, concurrent)


BAD = [
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4, "bogus_key": 1}}, "bogus_key"),
    ({"input_ids": [], "sampling_params": {"max_new_tokens": 4}}, "empty"),
    ({"input_ids": [1, 128], "sampling_params": {"max_new_tokens": 4}}, "vocabulary"),
    ({"input_ids": [1, -1], "sampling_params": {"max_new_tokens": 4}}, "vocabulary"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": -1}}, "temperature"),
    ({"sampling_params": {"max_new_tokens": 4}}, "input_ids"),
    ({"text": "hello", "sampling_params": {"max_new_tokens": 4}}, "text"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "top_p"),
    ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "top_k"),
    ({"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [999]}}, "stop_token_ids"),
    ({"input_ids": [1, "x"]}, "input_ids[1]"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**6}}, "context length"),
    ({"input_ids": [1, 2], "stream": True}, "stream"),
    ({"input_ids": [1, 2], "foo": 1}, "foo"),
]


@pytest.mark.timeout(60)
async def test_bad_requests_get_400_and_server_keeps_serving(cpu_server: Any) -> None:
    url = cpu_server.url
    good = gen_body([1, 2, 3], max_new_tokens=3, ignore_eos=True)
    async with aiohttp.ClientSession() as s:
        for body, word in BAD:
            status, err = await post(s, url + "/generate", body)
            assert status == 400, (body, err)
            assert word in err["error"]["message"], (word, err)
            status, ok = await post(s, url + "/generate", good)
            assert status == 200 and len(ok["output_ids"]) == 3
        async with s.post(
            url + "/generate", data=b"{not json", headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
        status, zero = await post(
            s, url + "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}}
        )
        assert status == 200 and zero["output_ids"] == []
        assert zero["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
        # A duplicate rid among in-flight requests is refused; the first one is unaffected.
        long = gen_body([4, 5], max_new_tokens=3000, ignore_eos=True) | {"rid": "dup-rid"}
        first = asyncio.ensure_future(post(s, url + "/generate", long))
        await asyncio.sleep(0.2)
        status, err = await post(s, url + "/generate", long)
        assert status == 400 and "Duplicate" in err["error"]["message"]
        assert not first.done()
        status, _ = await post(s, url + "/abort_request", {"abort_all": True})
        assert status == 200
        status, res = await first
        assert status == 200 and 0 < len(res["output_ids"]) < 3000
        assert res["meta_info"]["finish_reason"]["type"] == "abort"
        status, err = await post(s, url + "/pause_generation", {"mode": "retract"})
        assert status == 400 and "retract" in err["error"]["message"]
        async with s.get(url + "/model_info") as r:
            info = await r.json()
        assert info["vocab_size"] == 128 and info["architectures"] == ["LlamaForCausalLM"]
        async with s.get(url + "/health_generate") as r:
            assert r.status == 200


@pytest.mark.timeout(120)
async def test_pause_abort_resume_and_update(cpu_server_factory: Any, tmp_path: Path) -> None:
    """pause(abort) returns partials; prompt + partial completes; an update with
    abort_all_requests returns partials labelled with the old version, then the new weights
    and version apply; in_place pause + update gives two version spans."""
    v0 = make_model(tmp_path / "v0", seed=1)
    v1 = make_model(tmp_path / "v1", seed=2)
    srv = cpu_server_factory(v0, "--admin-api-key", ADMIN)
    url = srv.url
    prompt = [7, 8, 9]
    budget = 600
    async with aiohttp.ClientSession() as s:
        status, _ = await post(s, url + "/pause_generation", {"mode": "abort"})
        assert status == 401
        # Uninterrupted greedy reference.
        _, full = await post(
            s,
            url + "/generate",
            gen_body(prompt, max_new_tokens=budget, temperature=0, ignore_eos=True),
        )
        assert len(full["output_ids"]) == budget

        # pause(abort) mid-generation -> partial; resubmit prompt + partial -> the rest.
        task = asyncio.ensure_future(
            post(
                s,
                url + "/generate",
                gen_body(prompt, max_new_tokens=budget, temperature=0, ignore_eos=True),
            )
        )
        await asyncio.sleep(0.3)
        status, body = await post(s, url + "/pause_generation", {"mode": "abort"}, headers=AUTH)
        assert status == 200 and body["status"] == "ok"
        _, part = await task
        partial = part["output_ids"]
        assert part["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < len(partial) < budget
        assert len(part["meta_info"]["output_token_logprobs"]) == len(partial)
        # New requests are held while paused, not rejected.
        held = asyncio.ensure_future(
            post(
                s,
                url + "/generate",
                gen_body(
                    prompt + partial,
                    max_new_tokens=budget - len(partial),
                    temperature=0,
                    ignore_eos=True,
                ),
            )
        )
        await asyncio.sleep(0.3)
        assert not held.done()
        status, _ = await post(s, url + "/continue_generation", {}, headers=AUTH)
        assert status == 200
        _, rest = await held
        assert rest["meta_info"]["finish_reason"] == {
            "type": "length",
            "length": budget - len(partial),
        }
        assert partial + rest["output_ids"] == full["output_ids"]

        # update_weights_from_disk with abort_all_requests mid-generation.
        tasks = [
            asyncio.ensure_future(
                post(
                    s,
                    url + "/generate",
                    gen_body([7 + i, 8, 9], max_new_tokens=budget, temperature=0, ignore_eos=True),
                )
            )
            for i in range(4)
        ]
        await asyncio.sleep(0.4)
        upd = {
            "model_path": str(v1),
            "weight_version": "1",
            "flush_cache": True,
            "abort_all_requests": True,
        }
        status, body = await post(s, url + "/update_weights_from_disk", upd, headers=AUTH)
        assert status == 200 and body["success"], body
        for t in tasks:
            _, r = await t
            assert r["meta_info"]["finish_reason"]["type"] == "abort"
            assert r["meta_info"]["weight_version"] == "0"
            assert {sp["version"] for sp in r["meta_info"]["weight_versions"]} == {"0"}
        async with s.get(url + "/model_info") as r:
            info = await r.json()
        assert info["weight_version"] == "1" and info["model_path"] == str(v1)
        _, after = await post(
            s,
            url + "/generate",
            gen_body(prompt, max_new_tokens=20, temperature=0, ignore_eos=True),
        )
        assert after["meta_info"]["weight_version"] == "1"
        assert after["meta_info"]["weight_versions"] == [{"version": "1", "start": 0, "end": 20}]
        assert after["output_ids"] != full["output_ids"][:20]
        # Reported log-probs are the new model's.
        want = reference_logprobs(load_model(v1), prompt, after["output_ids"], 1.0)
        got = torch.tensor([lp for lp, _, _ in after["meta_info"]["output_token_logprobs"]])
        assert (got - want).abs().max().item() <= 1e-4

        # Without abort_all_requests and not paused: the update waits for in-flight requests.
        running = asyncio.ensure_future(
            post(s, url + "/generate", gen_body(prompt, max_new_tokens=200, ignore_eos=True))
        )
        await asyncio.sleep(0.1)
        upd = {"model_path": str(v0), "weight_version": "2", "abort_all_requests": False}
        status, body = await post(s, url + "/update_weights_from_disk", upd, headers=AUTH)
        assert status == 200 and body["success"]
        assert running.done()
        _, r = await running
        assert (
            r["meta_info"]["finish_reason"]["type"] == "length"
            and r["meta_info"]["weight_version"] == "1"
        )

        # in_place pause + update + continue: tokens before/after carry their versions.
        running = asyncio.ensure_future(
            post(s, url + "/generate", gen_body(prompt, max_new_tokens=budget, ignore_eos=True))
        )
        await asyncio.sleep(0.3)
        await post(s, url + "/pause_generation", {"mode": "in_place"}, headers=AUTH)
        upd = {"model_path": str(v1), "weight_version": "3", "flush_cache": False}
        status, body = await post(s, url + "/update_weights_from_disk", upd, headers=AUTH)
        assert status == 200 and body["success"]
        await post(s, url + "/continue_generation", {}, headers=AUTH)
        _, r = await running
        spans = r["meta_info"]["weight_versions"]
        assert [sp["version"] for sp in spans] == ["2", "3"], spans
        assert (
            spans[0]["start"] == 0
            and spans[0]["end"] == spans[1]["start"]
            and spans[1]["end"] == budget
        )
        assert r["meta_info"]["weight_version"] == "3"

        # abort_request by rid prefix; a bad update leaves the weights alone.
        running = asyncio.ensure_future(
            post(
                s,
                url + "/generate",
                gen_body(prompt, max_new_tokens=budget, ignore_eos=True) | {"rid": "abc-123"},
            )
        )
        await asyncio.sleep(0.2)
        status, body = await post(s, url + "/abort_request", {"rid": "abc-"}, headers=AUTH)
        assert status == 200 and body is None
        _, r = await running
        assert (
            r["meta_info"]["finish_reason"]["type"] == "abort" and 0 < len(r["output_ids"]) < budget
        )
        status, body = await post(
            s,
            url + "/update_weights_from_disk",
            {"model_path": str(tmp_path / "nope"), "weight_version": "9"},
            headers=AUTH,
        )
        assert status == 400 and not body["success"] and "nope" in body["message"]
        async with s.get(url + "/model_info") as resp:
            assert (await resp.json())["weight_version"] == "3"


@pytest.mark.timeout(120)
async def test_distributed_update_matches_sender(cpu_server_factory: Any, tmp_path: Path) -> None:
    """Rank 0 (this test) broadcasts another model's weights over gloo; the server's weights
    then equal the sender's exactly, and it reports the new version."""
    import torch.distributed as dist

    srv = cpu_server_factory(make_model(tmp_path / "v0", seed=1))
    sender = load_model(make_model(tmp_path / "v1", seed=5))
    state = {k: v.detach().contiguous() for k, v in sender.named_parameters()}
    port = free_port()
    group: dict[str, Any] = {}

    def rank0() -> None:
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=60))
        group["store"] = store
        group["pg"] = dist.ProcessGroupGloo(
            dist.PrefixStore("weights/", store), 0, 2, timedelta(seconds=60)
        )

    def broadcast(names: list[str]) -> None:
        for n in names:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            group["pg"].broadcast([state[n]], opts).wait()

    async with aiohttp.ClientSession() as s:
        th = threading.Thread(target=rank0)
        th.start()
        init = {
            "master_address": "127.0.0.1",
            "master_port": port,
            "rank_offset": 1,
            "world_size": 2,
            "group_name": "weights",
            "backend": "gloo",
        }
        status, body = await post(s, srv.url + "/init_weights_update_group", init)
        th.join(30)
        assert status == 200 and body["success"], body
        names = list(state)
        half = len(names) // 2
        for bucket, version in ((names[:half], None), (names[half:], "7")):
            th = threading.Thread(target=broadcast, args=(bucket,))
            th.start()
            req = {
                "names": bucket,
                "dtypes": ["float32"] * len(bucket),
                "shapes": [list(state[n].shape) for n in bucket],
                "group_name": "weights",
                "flush_cache": True,
            } | ({"weight_version": version} if version else {})
            status, body = await post(s, srv.url + "/update_weights_from_distributed", req)
            th.join(30)
            assert status == 200 and body["success"], body
        for n in names:
            status, value = await post(
                s, srv.url + "/get_weights_by_name", {"name": n, "truncate_size": 10**6}
            )
            assert status == 200
            assert torch.equal(torch.tensor(value, dtype=torch.float32), state[n]), n
        async with s.get(srv.url + "/model_info") as r:
            assert (await r.json())["weight_version"] == "7"


@pytest.mark.timeout(120)
async def test_model_info_counts_busy_time_and_requests(
    cpu_server_factory: Any, tiny_model: Path
) -> None:
    """``busy_s`` grows only with engine steps and stays within ``uptime_s``; ``requests``
    counts /generate calls (the pipeline benchmark's server idle fraction reads these)."""
    srv = cpu_server_factory(tiny_model)
    async with aiohttp.ClientSession() as s:
        async with s.get(srv.url + "/model_info") as r:
            before = await r.json()
        assert before["requests"] == 0 and before["engine_steps"] == 0 and before["busy_s"] == 0
        body = gen_body([5, 6, 7], max_new_tokens=20, temperature=1.0, ignore_eos=True)
        outs = await asyncio.gather(*(post(s, srv.url + "/generate", body) for _ in range(3)))
        assert all(st == 200 for st, _ in outs)
        await asyncio.sleep(0.2)  # idle time: uptime grows, busy time does not
        async with s.get(srv.url + "/model_info") as r:
            mid = await r.json()
        await asyncio.sleep(0.3)
        async with s.get(srv.url + "/model_info") as r:
            after = await r.json()
    assert mid["requests"] == 3
    # 20 tokens each: at least 20 steps (prefill gives the first token, joins may add one).
    assert 20 <= mid["engine_steps"] <= 3 * 21
    assert 0 < mid["busy_s"] < mid["uptime_s"]
    assert after["busy_s"] == mid["busy_s"] and after["engine_steps"] == mid["engine_steps"]
    assert after["uptime_s"] >= mid["uptime_s"] + 0.25
