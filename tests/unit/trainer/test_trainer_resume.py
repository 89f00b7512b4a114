"""``trainer.resume.plan_replay``: the recorded steps after the checkpoint are replayed in their
recorded composition and version; pending groups no record names are new."""

from __future__ import annotations

import numpy as np

from buffer import Delivered, TrajectoryGroup
from trainer.resume import entry_order, plan_replay


def _d(entry: str) -> Delivered:
    g = TrajectoryGroup(
        run_id="r",
        prompt_id="p",
        prompt_ids=np.array([1], dtype=np.int32),
        samples=[],
        worker_id="w",
        admission_version=0,
        group_id=f"g{entry}",
    )
    return Delivered(entry, g)


def test_replay_keeps_recorded_composition_and_version() -> None:
    pending = sorted([_d("5-0"), _d("3-0"), _d("3-1"), _d("4-0"), _d("9-0")], key=entry_order)
    records = {
        2: {"version": 1, "entries": [["1-0", "x"], ["2-0", "y"]]},  # covered by the checkpoint
        3: {"version": 2, "entries": [["3-0", "a"], ["3-1", "b"]]},
        4: {"version": 3, "entries": [["4-0", "c"], ["4-1", "gone"]]},  # 4-1 already acked
        5: {"version": 4, "entries": [["8-0", "acked"]]},  # nothing pending: no step
    }
    replay, fresh = plan_replay(records, pending, after_step=2)
    assert [(b.version, [d.entry_id for d in b.delivered], b.replay) for b in replay] == [
        (2, ["3-0", "3-1"], True),
        (3, ["4-0"], True),
    ]
    assert [d.entry_id for d in fresh] == ["5-0", "9-0"]


def test_entry_order_is_numeric() -> None:
    # by milliseconds, then sequence, as numbers ("10-0" after "9-1"; as text it would sort first)
    ids = ["10-0", "9-1", "9-0", "9-10"]
    assert sorted(ids, key=lambda e: entry_order(_d(e))) == ["9-0", "9-1", "9-10", "10-0"]
