"""The trainer loop with fakes for Redis, the publisher and the model (no Redis, no server):
which groups are dropped and why, what reaches the optimizer, what the ledger records and
commits, and ``staleness_max_trained`` derived from the trained groups' own token versions.
The same loop on real Redis: ``tests/integration/test_trainer.py``, ``tests/integration/test_trainer_crash.py``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import torch

from buffer import Delivered, Sample, TrajectoryGroup
from trainer.config import TrainerArgs, TrainerConfig
from trainer.data import GroupReader, drop_reason
from trainer.ledger import Covered, StepBatch
from trainer.loop import StopRequest, Trainer
from trainer.metrics import RedisClock
from trainer.model import build_optimizer
from trainer.parts import TrainerParts
from trainer.resume import Restored, TrainState
from trainer.step import DistInfo

VOCAB = 16


class _TinyLM(torch.nn.Module):
    """Answers like an HF causal LM: ``model(input_ids=...).logits``, ``save_pretrained``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.out = torch.nn.Linear(8, VOCAB)
        self.config = SimpleNamespace(pad_token_id=None)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.out(self.emb(input_ids)))

    def save_pretrained(
        self,
        path: str,
        safe_serialization: bool,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file(state_dict or self.state_dict(), str(Path(path) / "model.safetensors"))


class _Buffer:
    def __init__(self, batches: list[list[Delivered]], stop: StopRequest) -> None:
        self.queue = [d for b in batches for d in b]
        self.stop = stop
        self.acked: list[str] = []
        self.dead_lettered = 0

    async def get_batch(self, n: int, block_ms: int) -> list[Delivered]:
        if not self.queue:
            self.stop.request()
        got, self.queue = self.queue[:n], self.queue[n:]
        return got

    async def ack(self, ids: list[str], also: Any = None) -> int:
        self.acked += ids
        return len(ids)

    async def close(self) -> None:
        pass


class _VM:
    def __init__(self) -> None:
        self.drops: list[tuple[int, str]] = []
        self.finished: list[int | None] = []
        """The run's finished mark, in order: the step marked, None for a clear."""

    async def clear_finished(self) -> None:
        self.finished.append(None)

    async def mark_finished(self, step: int) -> None:
        self.finished.append(step)

    async def drop(self, n: int = 1, reason: str = "stale") -> int:
        self.drops.append((n, reason))
        return n

    async def reap(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        pass


class _Ledger:
    def __init__(self, eta: int) -> None:
        self.recs: dict[int, dict[str, Any]] = {}
        self._eta = eta
        self.commits: list[tuple[Covered, int, int]] = []

    async def record(self, n: int, batch: StepBatch, dropped: list[str] | None = None) -> None:
        rec: dict[str, Any] = {
            "version": batch.version,
            "entries": [[d.entry_id, d.group.group_id] for d in batch.delivered],
        }
        if dropped is not None:
            rec["dropped"] = dropped
        self.recs[n] = rec

    async def records(self, rank: int) -> dict[int, dict[str, Any]]:
        return dict(self.recs)

    async def forget(self, n: int) -> None:
        del self.recs[n]

    async def eta(self) -> int:
        return self._eta

    async def commit(self, covered: Covered, *, path: str, step: int, version: int) -> None:
        self.commits.append((covered, step, version))
        for f in covered.fields[0]:
            del self.recs[int(f)]


class _Publisher:
    def __init__(self) -> None:
        self.versions: list[int] = []

    async def publish(self, version: int, model: torch.nn.Module) -> None:
        self.versions.append(version)


def _group(gid: str, *token_versions: list[int]) -> Delivered:
    rng = np.random.default_rng(len(gid))
    samples = [
        Sample(
            output_ids=rng.integers(3, VOCAB, size=len(v)).astype(np.int32),
            behaviour_logp=np.full(len(v), -np.log(VOCAB), dtype=np.float32),
            token_versions=np.array(v, dtype=np.int32),
            reward=float(i % 2),
            finish_reason="stop",
            index=i,
        )
        for i, v in enumerate(token_versions)
    ]
    g = TrajectoryGroup(
        run_id="u",
        prompt_id="p",
        prompt_ids=np.array([1, 2], dtype=np.int32),
        samples=samples,
        worker_id="w",
        admission_version=min(min(v) for v in token_versions),
        group_id=gid,
    )
    return Delivered(f"{len(gid)}-{gid}", g)


def test_drop_reason() -> None:
    assert [drop_reason(s, 1) for s in (-1, 0, 1, 2)] == ["future_version", None, None, "stale"]


def test_loop_drops_trains_commits_and_reports_trained_staleness(tmp_path: Path) -> None:
    # eta 1, 3 groups a step, the trainer at version 3 (publishing every step):
    # step 1 at v3: a (oldest token v3: 0 old), b (v2: 1), c (v0: 3 -> stale)
    # then a read at v4 where every group is stale (v0: 4 old): no update, its record forgotten
    # step 2 at v4: d (v4: 0), e (v5: -1 -> future_version), f (v2: 2 -> stale)
    batches = [
        [_group("a", [3, 3], [3]), _group("b", [2, 3], [3, 3]), _group("c", [0, 1], [1])],
        [_group("g", [0]), _group("h", [0, 0]), _group("i", [0])],
        [_group("d", [4, 4], [4]), _group("e", [5], [5]), _group("f", [2], [3])],
    ]
    stop = StopRequest()
    buf, vm, ledger, pub = _Buffer(batches, stop), _VM(), _Ledger(eta=1), _Publisher()
    tc = TrainerConfig(max_steps=2, checkpoint_every=10, micro_batch_tokens=64, device="cpu")
    args = TrainerArgs("u", tmp_path, 0, "redis://unused", "", 3, 1, 1.0)
    model = _TinyLM()
    optimizer, scheduler = build_optimizer(model, tc)
    state = TrainState(version=3, weights_version=3)
    clock = RedisClock()
    fake_buf, fake_vm = cast(Any, buf), cast(Any, vm)
    reader = GroupReader(
        fake_buf, fake_vm, clock, state, share=3, wait_log_s=30.0, stopped=lambda: stop.requested
    )
    parts = TrainerParts(
        vm=fake_vm,
        buf=fake_buf,
        ledger=cast(Any, ledger),
        reader=reader,
        publisher=pub,
        restored=Restored(model, optimizer, scheduler, state),
        device=torch.device("cpu"),
        clock=clock,
        crash_at=None,
    )
    trainer = Trainer(tc, args, parts, max_steps=None, dist=DistInfo(), stop=stop)
    assert asyncio.run(trainer.run()) == 2

    assert vm.drops == [(1, "stale")] + [(1, "stale")] * 3 + [(1, "future_version"), (1, "stale")]
    assert vm.finished == [None, 2]  # cleared at start, marked at max_steps: the workers exit
    assert pub.versions == [4, 5] and (state.step, state.version, state.ckpt_step) == (2, 5, 2)
    (covered, step, version) = ledger.commits[0]
    assert (step, version) == (2, 5) and ledger.recs == {}  # the forgotten step left nothing
    assert covered.groups == ["a", "b", "d"]
    assert sorted(covered.entries) == sorted(f"1-{x}" for x in "abcdef")
    assert state.dropped_total == 6  # c; g, h, i; e, f

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["group_ids"] for r in rows] == [["a", "b"], ["d"]]
    assert [r["dropped_group_ids"] for r in rows] == [["c"], ["e", "f"]]
    by_id = {d.group.group_id: d.group for b in batches for d in b}
    for r, judged_at in zip(rows, (3, 4), strict=True):
        # derived from the trained groups' own tokens: version minus the oldest token
        want = max(judged_at - by_id[g].min_version() for g in r["group_ids"])
        assert r["staleness_max_trained"] == want
    assert [r["staleness_max_trained"] for r in rows] == [1, 0]
    assert [r["staleness_max"] for r in rows] == [3, 2]  # what arrived, dropped groups included
    assert rows[1]["staleness_hist"] == {"-1": 1, "0": 1, "2": 1}
