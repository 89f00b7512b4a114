"""``trainer.ledger.covered_by``: what a checkpoint's one transaction acks, records and deletes."""

from __future__ import annotations

from trainer.ledger import covered_by


def test_covered_by_takes_every_rank_up_to_the_step() -> None:
    rank0 = {
        1: {"version": 0, "entries": [["1-0", "a"], ["1-1", "b"]], "dropped": ["1-1"]},
        2: {"version": 1, "entries": [["2-0", "c"]]},
        3: {"version": 2, "entries": [["3-0", "d"]]},  # after the checkpoint: untouched
    }
    rank1 = {2: {"version": 1, "entries": [["2-1", "e"]]}}
    c = covered_by([rank0, rank1], 2)
    # every entry of steps <= 2 is acked, dropped ones too (they were acked already; acking
    # again is harmless); only trained groups go into the checkpoint's state
    assert c.entries == ["1-0", "1-1", "2-0", "2-1"]
    assert c.groups == ["a", "c", "e"]
    assert c.fields == [["1", "2"], ["2"]]


def test_covered_by_with_no_records() -> None:
    c = covered_by([{}, {}], 5)
    assert (c.entries, c.groups, c.fields) == ([], [], [[], []])
