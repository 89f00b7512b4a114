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
from staleness.auto_eta import AutoEtaSettings
from staleness.version_manager import Waste
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
        self.arrivals = [list(b) for b in batches]
        self.stop = stop
        self.acked: list[str] = []
        self.dead_lettered = 0

    async def get_batch(self, n: int, block_ms: int) -> list[Delivered]:
        # One arrival (the next of the test's batches) per read, at most n of it.
        if not self.arrivals:
            self.stop.request()
            return []
        got, rest = self.arrivals[0][:n], self.arrivals[0][n:]
        self.arrivals = ([rest] if rest else []) + self.arrivals[1:]
        return got

    async def ack(self, ids: list[str], also: Any = None) -> int:
        self.acked += ids
        return len(ids)

    async def close(self) -> None:
        pass


class _VM:
    def __init__(self) -> None:
        self.drops: list[tuple[int, str]] = []
        self.dropped_tokens = 0
        self.eta_calls: list[tuple[int, dict[str, Any] | None]] = []
        self.auto_settings: dict[str, Any] | None = None
        self.ledger: Any = None
        self.finished: list[int | None] = []
        """The run's finished mark, in order: the step marked, None for a clear."""

    async def clear_finished(self) -> None:
        self.finished.append(None)

    async def mark_finished(self, step: int) -> None:
        self.finished.append(step)

    async def drop(self, n: int = 1, reason: str = "stale", *, tokens: int = 0) -> int:
        self.drops.append((n, reason))
        self.dropped_tokens += tokens
        return n

    async def inflight_by_version(self) -> dict[int, int]:
        return {}

    async def set_eta(self, eta: int, *, why: dict[str, Any] | None = None) -> int:
        self.eta_calls.append((eta, why))
        if self.ledger is not None:
            self.ledger._eta = eta
        return 0

    async def set_eta_auto(self, settings: dict[str, Any] | None) -> None:
        self.auto_settings = settings

    async def narrow_admission(self, eta: int, *, why: dict[str, Any] | None = None) -> None:
        self.eta_calls.append((-eta, why))

    async def waste(self) -> Waste:
        return Waste(tokens={"pushed": 100, "dropped:stale": self.dropped_tokens}, groups={})

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
    # eta 1, 3 groups a step, the trainer at version 3 (publishing every step). Arrivals:
    # [a (oldest token v3), b (v2), c (v0: 3 old -> stale)], then [g, h, i] (v0: stale), then
    # [d (v4), e (v5: newer than the trainer), f (v2)], then [j (v4)].
    # Step 1 at v3 takes the earliest-expiring groups it has, not stream order: b and f (expire
    # after v3), then a; it drops c, g, h, i. In stream order f would have been read at v4,
    # 2 old, and dropped. Step 2 at v4: d, j, e (-1 -> future_version, dropped).
    batches = [
        [_group("a", [3, 3], [3]), _group("b", [2, 3], [3, 3]), _group("c", [0, 1], [1])],
        [_group("g", [0]), _group("h", [0, 0]), _group("i", [0])],
        [_group("d", [4, 4], [4]), _group("e", [5], [5]), _group("f", [2], [3])],
        [_group("j", [4])],
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

    assert vm.drops == [(1, "stale")] * 4 + [(1, "future_version")]
    assert vm.finished == [None, 2]  # cleared at start, marked at max_steps: the workers exit
    assert pub.versions == [4, 5] and (state.step, state.version, state.ckpt_step) == (2, 5, 2)
    (covered, step, version) = ledger.commits[0]
    assert (step, version) == (2, 5) and ledger.recs == {}
    assert covered.groups == ["b", "f", "a", "d", "j"]
    # the pooled groups past eta were dropped and acked as soon as they were read, outside any
    # step's record (their slots back at once); the checkpoint acks the rest
    assert sorted(covered.entries) == sorted(f"1-{x}" for x in "abdefj")
    assert sorted(buf.acked) == sorted(f"1-{x}" for x in "cghie")  # every drop, at once
    assert state.dropped_total == 5  # c, g, h, i; e

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["group_ids"] for r in rows] == [["b", "f", "a"], ["d", "j"]]
    assert [r["dropped_group_ids"] for r in rows] == [["c", "g", "h", "i"], ["e"]]
    by_id = {d.group.group_id: d.group for b in batches for d in b}
    for r, judged_at in zip(rows, (3, 4), strict=True):
        # derived from the trained groups' own tokens: version minus the oldest token
        want = max(judged_at - by_id[g].min_version() for g in r["group_ids"])
        assert r["staleness_max_trained"] == want
        trained = [judged_at - by_id[g].min_version() for g in r["group_ids"]]
        assert r["staleness_hist_trained"] == {str(x): trained.count(x) for x in set(trained)}
        assert r["eta"] == 1
    assert [r["staleness_max_trained"] for r in rows] == [1, 0]
    assert [r["staleness_max"] for r in rows] == [3, 0]  # what the step took, drops included
    # arrivals: read at v3: a 0, b 1, c 3, g h i 3, d -1, e -2, f 1; at v4: j 0
    assert rows[0]["staleness_hist_arrived"] == {"-1": 2, "0": 1, "1": 2, "3": 4}
    assert rows[1]["staleness_hist_arrived"] == {"0": 1} and rows[1]["arrived"] == 1
    assert [(r["dropped_stale"], r["dropped_future"]) for r in rows] == [(4, 0), (0, 1)]
    dropped_tokens = sum(by_id[g].num_output_tokens for g in "cghie")
    assert sum(r["dropped_tokens"] for r in rows) == dropped_tokens == vm.dropped_tokens
    assert rows[1]["wasted_tokens"] == dropped_tokens
    assert rows[1]["waste_share"] == dropped_tokens / 100
    assert rows[1]["staleness_hist"] == {"-1": 1, "0": 2}


def test_eta_auto_raises_eta_live_and_logs_why(tmp_path: Path) -> None:
    # eta auto deciding every step; the run's books say 1 token in 2 was wasted (over the
    # 1% target): eta goes 1 -> 2 after the second step and 2 -> 3 after the third, through
    # set_eta with the measurements,
    # and the change is an event line of metrics.jsonl (no "step" key: it is not a step row)
    batches = [[_group(g, [3])] for g in "abc"]
    stop = StopRequest()
    buf, vm, ledger, pub = _Buffer(batches, stop), _VM(), _Ledger(eta=1), _Publisher()
    vm.ledger = ledger
    calls = iter(range(1, 100))

    async def waste() -> Waste:  # per step: 100 tokens generated, 50 of them wasted
        n = next(calls)
        return Waste(tokens={"pushed": 100 * n, "dropped:stale": 50 * n}, groups={})

    vm.waste = waste  # type: ignore[method-assign]
    tc = TrainerConfig(max_steps=3, checkpoint_every=10, micro_batch_tokens=64, device="cpu")
    auto = AutoEtaSettings(eta_max=4, window=1)
    args = TrainerArgs("u", tmp_path, 0, "redis://unused", "", 1, 1, 1.0, eta_auto=auto)
    model = _TinyLM()
    optimizer, scheduler = build_optimizer(model, tc)
    state = TrainState(version=3, weights_version=3)
    clock = RedisClock()
    reader = GroupReader(
        cast(Any, buf),
        cast(Any, vm),
        clock,
        state,
        share=1,
        wait_log_s=30.0,
        stopped=lambda: stop.requested,
    )
    parts = TrainerParts(
        vm=cast(Any, vm),
        buf=cast(Any, buf),
        ledger=cast(Any, ledger),
        reader=reader,
        publisher=pub,
        restored=Restored(model, optimizer, scheduler, state),
        device=torch.device("cpu"),
        clock=clock,
        crash_at=None,
    )
    trainer = Trainer(tc, args, parts, max_steps=None, dist=DistInfo(), stop=stop)
    assert asyncio.run(trainer.run()) == 3
    assert vm.auto_settings == auto.as_dict()
    assert [e for e, _ in vm.eta_calls] == [2, 3]
    why = vm.eta_calls[0][1]
    assert why is not None and why["rule"] == "up: waste over target"
    assert why["waste_share"] > 0.01 and why["trainer_step"] == 2
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [x for x in lines if x.get("event") == "eta"]
    assert [(e["from"], e["to"]) for e in events] == [(1, 2), (2, 3)]
    assert all("step" not in e for e in events)
    assert [x["eta"] for x in lines if "step" in x] == [1, 1, 2]  # judged at the eta of its start
