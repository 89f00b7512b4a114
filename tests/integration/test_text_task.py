"""The text path through a real worker, a real CPU server and Redis: dataset rows -> chat
template -> token ids -> server (stopping on the tokenizer's EOS) -> decoded text -> reward;
the tokens pushed for training are the server's own, and dynamic sampling's accounting
balances (every admitted slot finished or handed back; filtered groups counted in the worker,
the gate and the run's totals)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import rollout_reward_fns
from cpu_server_fixture import cpu_server_factory  # noqa: F401

from buffer import keys
from buffer.redis_buffer import RedisTrajectoryBuffer
from buffer.schema import TrajectoryGroup
from inference.launch import ServerHandle
from inference.models import init_tiny_text_model
from rollout_workers.pool import make_servers
from sluice.commands.rollout import open_worker
from sluice.config import build_task, load_config
from staleness.version_manager import VersionManager

ROWS = [{"id": f"q{i}", "prompt": f"reverse {i}{i + 1}", "answer": f"{i + 1}{i}"} for i in range(6)]


def config(redis_url: str, run: str, model: Path, data: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        [
            f"redis.url={redis_url}",
            f"run.name={run}",
            f"model.path={model}",
            "task.name=text",
            f"task.options.path={data}",
            "task.options.id_field=id",
            "task.options.max_new_tokens=6",
            "staleness.eta=100",
            "staleness.batch_groups=2",
            "rollout.n_samples=4",
            "rollout.max_inflight_groups=2",
            *extra,
        ],
    )


@pytest.mark.timeout(120)
async def test_the_text_path_end_to_end(
    redis_url: str,
    run_name: str,
    tmp_path: Path,
    cpu_server_factory: Callable[..., ServerHandle],  # noqa: F811
) -> None:
    model = init_tiny_text_model(tmp_path / "m", alphabet="0123456789 erv", layers=1, hidden=32)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    srv = cpu_server_factory(model)
    cfg = config(
        redis_url,
        run_name,
        model,
        data,
        "task.options.reward=rollout_reward_fns:text_length",
        "rollout.dynamic_sampling=false",
    )
    worker = await open_worker(cfg, make_servers([srv.url]), worker_id="w-text", max_groups=3)
    assert await asyncio.wait_for(worker.run(), 90) == 3
    groups: list[TrajectoryGroup] = []
    async with await RedisTrajectoryBuffer.open(redis_url, run_name, consumer="t") as buf:
        while len(groups) < 3:
            groups += [d.group for d in await buf.get_batch(3 - len(groups), block_ms=1000)]
    task = build_task(cfg)
    tok = task.fmt.tokenizer
    by_id = {p.id: p for p in task.prompts("train")}
    stops = 0
    for g in groups:
        p = by_id[g.prompt_id]
        msgs = [{"role": "user", "content": p.text}]
        want = tok.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert g.prompt_ids.tolist() == list(want)  # the chat template's ids, sent as they are
        for s in g.samples:
            ids = s.output_ids.tolist()
            assert len(ids) == len(s.behaviour_logp) == len(s.token_versions) >= 1
            if s.finish_reason == "stop":  # ended on the tokenizer's EOS, kept in the tokens
                stops += 1
                assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
            else:  # the budget: an EOS as the last token counts as length (as in SGLang)
                assert len(ids) == 6 and tok.eos_token_id not in ids[:-1]
            text = task.decode(ids)
            assert "<|im_end|>" not in text
            assert s.reward == rollout_reward_fns.text_length(p, ids, text)
    assert stops >= 1  # a random-init model ends some of its 12 answers on EOS

    # Dynamic sampling: a constant reward makes every group zero-variance: none is pushed.
    run2 = run_name + "-ds"
    cfg2 = config(
        redis_url,
        run2,
        model,
        data,
        "task.options.reward=rollout_reward_fns:text_constant",
        "rollout.dynamic_sampling=true",
    )
    worker2 = await open_worker(cfg2, make_servers([srv.url]), worker_id="w-ds")
    run = asyncio.create_task(worker2.run())
    t0 = time.monotonic()
    while worker2.counters.filtered_groups < 3:
        assert not run.done() and time.monotonic() - t0 < 60
        await asyncio.sleep(0.05)
    worker2.request_stop()
    assert await asyncio.wait_for(run, 40) == 0
    async with await VersionManager.open(redis_url, run2) as vm:
        snap = (await vm.snapshot()).as_dict()
        totals = await vm.redis.hgetall(keys.filtered(run2))
    c = worker2.counters
    assert snap["finished"] == 0 and snap["inflight"] == 0
    assert snap["admitted"] == snap["rejected"] == c.groups_rejected
    assert snap["rejected_by"]["zero_variance"] == c.filtered_groups >= 3
    assert int(totals[b"groups"]) == c.filtered_groups
    assert int(totals[b"samples"]) == 4 * c.filtered_groups
    assert float(totals[b"reward_sum"]) == pytest.approx(0.5 * 4 * c.filtered_groups)
