"""rollout_workers.updater + weights.receive.LoraReceiver + the pool's adapter counts: a LoRA
publication is loaded, requests switch to it, in-flight ones are interrupted, the old adapter is
unloaded only once no request names it, and a server whose load failed gets no request of that
version (fake servers, fake version source)."""

from __future__ import annotations

import asyncio

import pytest
from rollout_fakes import client_of, server
from test_rollout_workers_updater import ev, make, until

from inference.lora import adapter_name
from inference.protocol import InferenceError
from rollout_workers.pool import ServerState
from weights.plan import FMT_LORA

pytestmark = pytest.mark.timeout(10)

V1, V2 = adapter_name(1), adapter_name(2)


async def test_lora_update_switches_requests_and_unloads_the_old_adapter_when_unused() -> None:
    s = server(version=0)
    c = client_of(s)
    up, _, _, _, _, _ = make([s])
    await up.apply(ev(1, FMT_LORA, "/w/v1"), 0.0)
    # interrupt the in-flight requests (abort all), then load and switch
    assert c.calls == ["abort:None", f"load_lora:{V1}"]
    assert s.adapter == V1 and s.version == 1 and s.state is ServerState.UP
    assert c.loras == {V1: "/w/v1"} and c.version == 0  # the base is never reloaded

    name = s.use_adapter()  # a request naming v1 is still running
    assert name == V1
    await up.apply(ev(2, FMT_LORA, "/w/v2"), 0.0)
    assert s.adapter == V2 and s.version == 2
    for _ in range(5):
        await asyncio.sleep(0)
    assert V1 in c.loras  # still named by a running request: kept
    assert s.use_adapter() == V2  # new requests name v2
    s.release_adapter(V1)  # the old request ends
    await until(lambda: V1 not in c.loras)
    assert c.calls[-1] == f"unload_lora:{V1}" and s.adapters == {V2}
    s.release_adapter(V2)
    await asyncio.sleep(0)
    assert c.loras == {V2: "/w/v2"}  # the current adapter is never unloaded


async def test_a_server_that_failed_to_load_gets_no_request_of_that_version() -> None:
    good, bad = server("http://good", version=0), server("http://bad", version=0)
    client_of(bad).fail_load = InferenceError(400, "rank 16 above --max-lora-rank 8")
    up, _, _, _, _, _ = make([good, bad])
    rec = await up.apply(ev(1, FMT_LORA, "/w/v1"), 0.0)
    assert rec.failed == 1
    assert good.version == 1 and good.state is ServerState.UP
    assert bad.state is ServerState.NEEDS_LOAD and bad.version == 0 and bad.adapter is None
    # a group admitted at v1 only runs on the server that holds the adapter
    for _ in range(5):
        s = await up.pool.acquire(min_version=1)
        assert s is good
    # the health loop's bring-up loads it (unload-then-load: a restart may have lost it)
    await up.bring_up(bad)
    assert bad.state is ServerState.UP and bad.version == 1 and bad.adapter == V1
    assert client_of(bad).calls[-3:] == [f"unload_lora:{V1}", "abort:None", f"load_lora:{V1}"]


async def test_sampler_names_the_current_adapter_and_counts_its_use() -> None:
    """The sampler sends ``lora_path`` = the server's current adapter while the request runs
    (its use is counted), and a resubmission after an interrupt names the new one."""
    from test_rollout_workers_sampler import make as make_sampler

    s = server(version=0)
    c = client_of(s)
    up, _, _, _, _, _ = make([s])
    await up.apply(ev(1, FMT_LORA, "/w/v1"), 0.0)
    c.generate_gate = asyncio.Event()
    sampler, _, _ = make_sampler(up.pool, max_new_tokens=4)
    task = asyncio.create_task(sampler.sample([1, 7], ("k",), 0.7))
    await until(lambda: len(c.lora_requests) == 1)
    assert c.lora_requests == [V1] and s.adapter_uses == {V1: 1}
    await up.apply(ev(2, FMT_LORA, "/w/v2"), 0.0)
    c.generate_gate.set()
    out = await task
    assert c.lora_requests == [V1] and out.versions == [1, 1] and s.adapter_uses == {}
    await until(lambda: V1 not in c.loras)  # unused now: unloaded
    c.generate_gate = None
    out = await sampler.sample([1, 7], ("k2",), 0.7)
    assert c.lora_requests[-1] == V2 and out.versions == [2, 2]
