# ruff: noqa: F811  (pytest fixtures imported from cpu_server_fixture are parameters)
"""The CPU server's LoRA adapters (inference/cpu_server/lora.py) through the worker's client:
SGLang's endpoints and request field, mixed adapters in one batch, and every log-prob equal to
the trainer's own (peft) recomputation with the adapter the request named."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from cpu_server_fixture import cpu_server_factory, tiny_model  # noqa: F401
from lora_helpers import make_adapter

from inference.client import SGLangClient
from inference.lora import adapter_name
from inference.models import load_model
from inference.protocol import InferenceError, SamplingParams
from weights.ipc import Handover
from weights.lora import adapter_config, adapter_tensors, write_adapter_dir


def reference(model: Any, prompt: list[int], out: list[int], temp: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + out])).logits[0].float()
    step = logits[len(prompt) - 1 : len(prompt) - 1 + len(out)]
    return torch.log_softmax(step / temp, dim=-1).gather(1, torch.tensor(out)[:, None])[:, 0]


@pytest.mark.timeout(180)
async def test_adapters_load_switch_unload_and_match_the_trainer(
    cpu_server_factory: Any, tiny_model: Path, tmp_path: Path
) -> None:
    srv = cpu_server_factory(tiny_model, "--enable-lora", "--max-lora-rank", "8")
    a1, a2 = (
        make_adapter(tiny_model, 4, 1),
        make_adapter(tiny_model, 8, 2, ["q_proj", "down_proj", "lm_head"]),
    )
    d1 = write_adapter_dir(a1, tmp_path / "v1")
    base = load_model(tiny_model)
    client = SGLangClient(srv.url)
    try:
        ok = await client.load_lora_adapter(adapter_name(1), str(d1))
        assert ok["success"] is True and ok["error_message"] is None
        assert ok["loaded_adapters"] == {adapter_name(1): str(d1)}
        with pytest.raises(InferenceError, match="already exists"):
            await client.load_lora_adapter(adapter_name(1), str(d1))
        # v2 handed over in memory (/load_lora_adapter_from_tensors)
        h = Handover(sorted(adapter_tensors(a2).items()))
        try:
            ok = await client.load_lora_adapter_from_tensors(
                adapter_name(2), adapter_config(a2), [h.payload]
            )
        finally:
            h.close()
        assert ok["loaded_adapters"][adapter_name(2)] == "__tensor__"

        # Concurrent, staggered requests on base, v1 and v2 share the running batch.
        cases = [
            (list(range(3, 3 + n)), lora, 12 + n)
            for n, lora in [(2, 1), (5, None), (3, 2), (7, 1), (4, 2), (6, None)]
        ]

        async def one(i: int, ids: list[int], lora: int | None, n: int) -> Any:
            await asyncio.sleep(0.02 * i)
            sp = SamplingParams(max_new_tokens=n, temperature=1.0, ignore_eos=True, sampling_seed=i)
            name = None if lora is None else adapter_name(lora)
            return await client.generate(ids, sp, lora_path=name)

        results = await asyncio.gather(*(one(i, *c) for i, c in enumerate(cases)))
        models = {None: base, 1: a1, 2: a2}
        for (ids, lora, n), res in zip(cases, results, strict=True):
            out = res.output_ids.tolist()
            assert len(out) == n
            want = reference(models[lora], ids, out, 1.0)
            got = torch.from_numpy(res.logprobs)
            assert (got - want).abs().max().item() <= 1e-4, lora
            # labelled with the adapter's version (the base: the server's own label)
            assert res.token_versions is not None
            assert res.token_versions.tolist() == [lora or 0] * n
            if lora is not None:  # the adapter really changed the distribution
                assert (reference(base, ids, out, 1.0) - want).abs().max().item() > 1e-3

        # Refusals: an unknown name, a rank above --max-lora-rank, a bad directory.
        sp = SamplingParams(max_new_tokens=3)
        with pytest.raises(InferenceError, match="not loaded") as e:
            await client.generate([3, 4], sp, lora_path=adapter_name(9))
        assert e.value.status == 400
        big = write_adapter_dir(make_adapter(tiny_model, 16, 3), tmp_path / "v3")
        with pytest.raises(InferenceError, match="max-lora-rank"):
            await client.load_lora_adapter(adapter_name(3), str(big))
        with pytest.raises(InferenceError, match="not a LoRA adapter directory"):
            await client.load_lora_adapter(adapter_name(4), str(tmp_path))

        ok = await client.unload_lora_adapter(adapter_name(1))
        assert ok["loaded_adapters"] == {adapter_name(2): "__tensor__"}
        with pytest.raises(InferenceError, match="not loaded"):
            await client.generate([3, 4], sp, lora_path=adapter_name(1))
        with pytest.raises(InferenceError, match="not loaded"):
            await client.unload_lora_adapter(adapter_name(1))
    finally:
        await client.close()


@pytest.mark.timeout(60)
async def test_server_without_lora_refuses_adapters(
    cpu_server_factory: Any, tiny_model: Path, tmp_path: Path
) -> None:
    srv = cpu_server_factory(tiny_model)
    d = write_adapter_dir(make_adapter(tiny_model, 4, 1), tmp_path / "v1")
    client = SGLangClient(srv.url)
    try:
        with pytest.raises(InferenceError, match="--enable-lora"):
            await client.load_lora_adapter(adapter_name(1), str(d))
        with pytest.raises(InferenceError, match="--enable-lora"):
            await client.generate(
                [3, 4], SamplingParams(max_new_tokens=2), lora_path=adapter_name(1)
            )
    finally:
        await client.close()
