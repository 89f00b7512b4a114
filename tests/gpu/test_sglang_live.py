"""Conformance against a live SGLang server on a GPU (marker ``gpu``; skipped without CUDA and
SGLang). ``scripts/gpu/run.sh`` runs these on a lent GPU machine in one call.

The server runs a tiny random-init Llama in bfloat16 (SGLang 0.5.17's RMSNorm kernel has no
float32 path: seen on an H100, 2026-11-25). Reference log-probs come from a float32
transformers forward on the same weights rounded to the server's dtype, so what remains is the
server's bf16 arithmetic; with this sharp random init (init_std 0.3) that is a visible gap, so
the tests check that each token matches the weights of its labelled version far better than the
other version's, and record the gap in ``$SLUICE_GPU_REPORT`` (JSON) when set.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not (torch.cuda.is_available() and importlib.util.find_spec("sglang")):
    pytest.skip("needs CUDA and SGLang", allow_module_level=True)

from buffer.redis_buffer import RedisTrajectoryBuffer  # noqa: E402
from inference.launch import ServerHandle, launch_sglang  # noqa: E402
from inference.models import init_tiny_model, load_model  # noqa: E402
from inference.protocol import InvalidInputError, SamplingParams  # noqa: E402
from rollout_workers.pool import make_servers  # noqa: E402
from sluice.commands.rollout import open_worker  # noqa: E402
from sluice.config import load_config  # noqa: E402
from staleness.version_manager import VersionManager  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

# Flags seen working with SGLang 0.5.17 on an H200, CUDA graphs on (2026-12-01); override with
# SLUICE_SGLANG_ARGS="--flag value ...".
DEFAULT_ARGS = (
    "--attention-backend triton --sampling-backend pytorch "
    "--disable-piecewise-cuda-graph --grammar-backend none"
)
DTYPE = os.environ.get("SLUICE_GPU_TEST_DTYPE", "bfloat16")
# Mean |server - reference| per token allowed (nats) on a short generation: bf16 arithmetic on a
# sharp model (0.14 measured on an H100).
GAP_TOL = {"float16": 0.2, "bfloat16": 0.5}[DTYPE]
SHAPE = dict(vocab=1024, layers=2, hidden=256, heads=4, init_std=0.3)
REPORT: dict[str, Any] = {}


def _report(key: str, value: Any) -> None:
    REPORT[key] = value
    path = os.environ.get("SLUICE_GPU_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpu-models")
    return (
        init_tiny_model(root / "v0", seed=1, **SHAPE),  # type: ignore[arg-type]
        init_tiny_model(root / "v1", seed=2, **SHAPE),
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sglang(
    models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    args = [*os.environ.get("SLUICE_SGLANG_ARGS", DEFAULT_ARGS).split(), "--dtype", DTYPE]
    log = tmp_path_factory.mktemp("sglang") / "sglang.log"
    t0 = time.monotonic()
    handle = launch_sglang(models[0], mem_fraction=0.2, extra_args=args, log_path=log, timeout=600)
    _report("server_start_s", round(time.monotonic() - t0, 1))
    try:
        yield handle
    finally:
        handle.stop()


def forward_logprobs(model_dir: Path, prompt: list[int], output: list[int], t: float) -> np.ndarray:
    # The server's weights: rounded to its dtype; the arithmetic here stays float32.
    model = load_model(model_dir, dtype="float32").to(getattr(torch, DTYPE)).float().cuda()
    ids = torch.tensor([prompt + output], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits / t, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(output) - 1, device="cuda")
    return logp[pos, torch.tensor(output, device="cuda")].cpu().numpy()


async def test_generate_shapes_and_logprobs(
    sglang: ServerHandle, models: tuple[Path, Path]
) -> None:
    async with sglang.client() as c:
        info = await c.model_info()
        assert str(info.get("weight_version")) == "0"
        prompt = [1, 5, 9, 13, 3]
        res = await c.generate(
            prompt,
            SamplingParams(max_new_tokens=64, temperature=0.7, ignore_eos=True, sampling_seed=1),
        )
        assert res.finish_reason == "length" and res.num_tokens == 64
        assert res.logprobs.dtype == np.float32 and len(res.logprobs) == 64
        assert res.weight_version == 0 and res.token_versions is not None
        assert set(res.token_versions.tolist()) == {0}
        ref = forward_logprobs(models[0], prompt, res.output_ids.tolist(), 0.7)
        gap = np.abs(ref - res.logprobs)
        out = res.output_ids.tolist()
        other = np.abs(forward_logprobs(models[1], prompt, out, 0.7) - res.logprobs)
        _report(
            f"logprob_gap_{DTYPE}_server_vs_fp32_forward",
            {
                "mean_abs": float(gap.mean()),
                "max_abs": float(gap.max()),
                "tokens": 64,
                "mean_abs_vs_other_weights": float(other.mean()),
            },
        )
        assert gap.mean() < GAP_TOL, gap.mean()
        assert gap.mean() < 0.25 * other.mean()  # it is these weights, not any weights
        zero = await c.generate(prompt, SamplingParams(max_new_tokens=0))
        assert zero.num_tokens == 0 and zero.finish_reason == "length"


async def test_out_of_vocab_refused_before_sending(sglang: ServerHandle) -> None:
    async with sglang.client() as c:
        with pytest.raises(InvalidInputError):
            await c.generate([1, SHAPE["vocab"]], SamplingParams(max_new_tokens=2))
        assert await c.health()  # the server is alive: nothing reached it


async def test_update_paths_abort_all_and_pause(
    sglang: ServerHandle, models: tuple[Path, Path]
) -> None:
    async with sglang.client() as c:
        long = SamplingParams(max_new_tokens=3000, ignore_eos=True)
        timings: dict[str, list[float]] = {"abort_all": [], "pause": []}
        version = int((await c.model_info())["weight_version"])
        for _trial in range(3):
            for path in ("abort_all", "pause"):
                running = [asyncio.create_task(c.generate([1, 2, 3], long)) for _ in range(8)]
                await asyncio.sleep(0.5)
                version += 1
                target = str(models[version % 2])
                t0 = time.perf_counter()
                if path == "abort_all":
                    await c.update_weights_from_disk(target, version, abort_all_requests=True)
                else:
                    await c.pause("abort")
                    await c.update_weights_from_disk(target, version)
                    await c.resume()
                first = await c.generate([1, 2, 3], SamplingParams(max_new_tokens=1))
                timings[path].append(time.perf_counter() - t0)
                assert first.weight_version == version
                for r in await asyncio.gather(*running):
                    assert r.finish_reason == "abort" and r.weight_version == version - 1
                    assert 0 < r.num_tokens < 3000
        _report("update_to_first_new_token_s", timings)
        assert (await c.model_info())["weight_version"] == str(version)


async def test_worker_update_mid_generation_versions_and_logprobs(
    sglang: ServerHandle, models: tuple[Path, Path], redis_url: str, run_name: str
) -> None:
    """The interruptible-update correctness test on SGLang: samples in flight at a weight
    update span versions 0 and 1 (labelled by the server's responses), and each token's
    log-prob matches a forward pass under the weights of its recorded version."""
    async with sglang.client() as c:  # start from v0 whatever earlier tests loaded
        await c.update_weights_from_disk(str(models[0]), 0)
    cfg = load_config(
        None,
        [
            f"redis.url={redis_url}",
            f"run.name={run_name}",
            f"model.path={models[0]}",
            "task.name=reverse",
            "staleness.eta=100",
            "staleness.batch_groups=2",
            "rollout.n_samples=4",
            "rollout.max_inflight_groups=2",
            "rollout.temperature=0.8",
            "rollout.max_new_tokens=1500",
            "rollout.ignore_eos=true",
            "rollout.update_mode=abort_all",
        ],
    )
    worker = await open_worker(
        cfg, make_servers([sglang.url], vocab_size=SHAPE["vocab"]), worker_id="gpu-w", max_groups=2
    )
    run = asyncio.create_task(worker.run())
    t0 = time.monotonic()
    while worker.inflight_requests() < 8:
        assert not run.done() and time.monotonic() - t0 < 60
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    async with await VersionManager.open(redis_url, run_name) as vm:
        await vm.publish_weights(1, str(models[1]), "safetensors")
    assert await asyncio.wait_for(run, 120) == 2
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="t") as buf:
        groups = [d.group for d in await buf.get_batch(2, block_ms=5000)]
    gaps, wrong, spanning = [], [], 0
    for g in groups:
        for s in g.samples:
            v = s.token_versions
            assert s.num_tokens == 1500 and np.all(np.diff(v) >= 0) and set(v.tolist()) <= {0, 1}
            spanning += int(v[0] == 0 and v[-1] == 1)
            prompt, out = g.prompt_ids.tolist(), s.output_ids.tolist()
            lp0 = forward_logprobs(models[0], prompt, out, 0.8)
            lp1 = forward_logprobs(models[1], prompt, out, 0.8)
            gaps.append(np.abs(np.where(v == 0, lp0, lp1) - s.behaviour_logp))
            wrong.append(np.abs(np.where(v == 0, lp1, lp0) - s.behaviour_logp))  # swapped labels
    gap, swapped = np.concatenate(gaps), np.concatenate(wrong)
    rec = worker.updates[-1]
    _report(
        "worker_update_on_sglang",
        {
            "spanning_samples": spanning,
            "samples": 8,
            "latency_s": rec.latency_s,
            "interrupted": rec.interrupted,
            "reprefill_tokens": rec.reprefill_tokens,
            "logprob_gap_mean_abs": float(gap.mean()),
            "logprob_gap_max_abs": float(gap.max()),
            "logprob_gap_mean_abs_swapped_versions": float(swapped.mean()),
            "dtype": DTYPE,
        },
    )
    assert spanning == 8
    # No absolute bound here: over 1,500 bf16 tokens of a sharp random model the logits reach
    # magnitudes where bf16 spacing is ~0.5, and the gap grew to ~1.9 nats/token on an H100.
    # Each token matches the version it is labelled with, not the other one.
    assert gap.mean() < 0.25 * swapped.mean(), (gap.mean(), swapped.mean())
