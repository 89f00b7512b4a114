"""The trainer's progress: ``step N/max_steps`` log lines, the progress record rank 0 writes
after every step (for ``sluice status``), and eval results copied into ``metrics.jsonl`` as
event lines, once each. The loop runs with fakes (``test_trainer_loop``'s); the Redis side of
``RunRecords``: ``tests/integration/test_run_records.py``."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from test_trainer_loop import _VM, _Buffer, _group, _Ledger, _Publisher, _TinyLM

from trainer.config import TrainerArgs, TrainerConfig
from trainer.data import GroupReader
from trainer.loop import StopRequest, Trainer
from trainer.metrics import (
    RedisClock,
    eval_event,
    is_step_row,
    logged_eval_versions,
    progress_record,
    steps_text,
    write_event,
)
from trainer.model import build_optimizer
from trainer.parts import TrainerParts
from trainer.resume import Restored, TrainState
from trainer.step import DistInfo


class _Records:
    """Fake ``RunRecords``: what the trainer wrote, and eval records handed out per call."""

    def __init__(self, evals: list[list[dict[str, Any]]]) -> None:
        self.progress: list[dict[str, Any]] = []
        self.evals = evals

    async def write_progress(self, record: dict[str, Any]) -> None:
        self.progress.append(record)

    async def new_evals(self) -> list[dict[str, Any]]:
        return self.evals.pop(0) if self.evals else []

    async def filtered_totals(self) -> tuple[float, float, float]:
        return (0.0, 0.0, 0.0)  # no worker filtered a group


def _trainer(tmp_path: Path, records: _Records | None, max_steps: int) -> tuple[Trainer, Any]:
    batches = [[_group(f"g{i}", [0, 0], [0])] for i in range(4)]
    stop = StopRequest()
    buf = _Buffer(batches, stop)
    tc = TrainerConfig(max_steps=max_steps, checkpoint_every=10, micro_batch_tokens=64)
    tc.device = "cpu"
    args = TrainerArgs("u", tmp_path, 0, "redis://unused", "", 1, 100, 1.0)
    model = _TinyLM()
    optimizer, scheduler = build_optimizer(model, tc)
    state = TrainState(version=0, weights_version=0)
    clock = RedisClock()
    fake_buf, fake_vm = cast(Any, buf), cast(Any, _VM())
    reader = GroupReader(
        fake_buf, fake_vm, clock, state, share=1, wait_log_s=30.0, stopped=lambda: stop.requested
    )
    parts = TrainerParts(
        vm=fake_vm,
        buf=fake_buf,
        ledger=cast(Any, _Ledger(eta=100)),
        reader=reader,
        publisher=_Publisher(),
        restored=Restored(model, optimizer, scheduler, state),
        device=torch.device("cpu"),
        clock=clock,
        crash_at=None,
        records=cast(Any, records),
    )
    return Trainer(tc, args, parts, max_steps=None, dist=DistInfo(), stop=stop), stop


def test_progress_records_log_lines_and_eval_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ev1 = {"version": 1, "greedy_reward": 0.25, "sampled_reward": 0.5, "prompts": 4, "time": 1.0}
    ev2 = {"version": 2, "greedy_reward": 0.75, "sampled_reward": 0.5, "prompts": 4, "time": 2.0}
    # no eval yet at step 1; v1's at step 2; v2's only at the end of the run
    records = _Records([[], [ev1], [], [ev2]])
    trainer, _ = _trainer(tmp_path, records, max_steps=3)
    with caplog.at_level(logging.INFO, logger="sluice.trainer"):
        assert asyncio.run(trainer.run()) == 3

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if is_step_row(r)]
    events = [r for r in lines if not is_step_row(r)]
    assert [r["step"] for r in steps] == [1, 2, 3] and {r["max_steps"] for r in steps} == {3}
    assert events == [
        {"event": "eval", **ev1, "trainer_step": 2},
        {"event": "eval", **ev2, "trainer_step": 3},
    ]
    assert [x["event"] for x in lines if "event" in x] == ["eval", "eval"]
    assert lines.index(events[0]) == 2  # appended after step 2's row, when it was seen

    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [m.split()[1] for m in logged] == ["1/3", "2/3", "3/3"]

    p = records.progress
    assert [(r["state"], r["step"]) for r in p] == [
        ("running", 0),
        ("running", 1),
        ("running", 2),
        ("running", 3),
        ("finished", 3),
    ]
    assert p[0]["reward_mean"] is None  # nothing trained yet by this process
    for rec, row in zip(p[1:4], steps, strict=True):
        assert rec["max_steps"] == 3 and rec["version"] == row["version"]
        assert (rec["reward_mean"], rec["loss"]) == (row["reward_mean"], row["loss"])
        assert rec["tokens_per_s"] == row["tokens_per_s"] and rec["step_time"] == row["time"]
    assert p[-1]["reward_mean"] == steps[-1]["reward_mean"]


def test_a_stopped_trainer_says_stopped(tmp_path: Path) -> None:
    records = _Records([])
    trainer, stop = _trainer(tmp_path, records, max_steps=100)  # the fake buffer runs dry
    asyncio.run(trainer.run())
    assert stop.requested
    last = records.progress[-1]
    assert (last["state"], last["step"], last["max_steps"]) == ("stopped", 4, 100)


def test_no_records_on_other_ranks_or_without_redis(tmp_path: Path) -> None:
    trainer, _ = _trainer(tmp_path, None, max_steps=2)
    assert asyncio.run(trainer.run()) == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("event" not in json.loads(x) for x in lines)


def test_steps_text_events_and_logged_versions(tmp_path: Path) -> None:
    assert steps_text(12, 200) == "12/200" and steps_text(12, None) == "12/∞"
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward_mean": 0.1}\n')
    write_event(path, eval_event({"version": 3, "greedy_reward": 0.5, "step": 99}, 7))
    write_event(path, eval_event({"version": 5, "greedy_reward": float("nan")}, 8))
    with path.open("a") as f:
        f.write('{"event": "eval", "vers')  # torn by a crash
    rows = [json.loads(x) for x in path.read_text().splitlines()[:3]]
    assert [is_step_row(r) for r in rows] == [True, False, False]
    assert rows[1] == {"event": "eval", "version": 3, "greedy_reward": 0.5, "trainer_step": 7}
    assert rows[2]["greedy_reward"] is None  # NaN written as null
    assert logged_eval_versions(path) == {3, 5}
    assert logged_eval_versions(tmp_path / "none.jsonl") == set()
    with pytest.raises(ValueError, match="event"):
        write_event(path, {"step": 3, "event": "eval"})


def test_progress_record_before_and_after_a_step() -> None:
    rec = progress_record("running", 4, None, 4, None)
    assert (rec["step"], rec["max_steps"], rec["reward_mean"], rec["loss"]) == (4, None, None, None)
    row = {"reward_mean": 0.5, "reward_std": 0.1, "loss": float("inf"), "tokens_per_s": 9.0}
    rec = progress_record("finished", 5, 5, 5, row)
    assert (rec["state"], rec["reward_mean"], rec["loss"]) == ("finished", 0.5, None)
    json.dumps(rec, allow_nan=False)
