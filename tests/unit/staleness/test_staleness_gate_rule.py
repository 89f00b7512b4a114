"""The one staleness rule (``staleness.gate``): the trainer's drop and the worker's cancel
decide with the same function, and agree on groups without tokens."""

from __future__ import annotations

import numpy as np
import pytest

from buffer.schema import Sample, TrajectoryGroup
from staleness.gate import group_staleness, past_eta, staleness


def _sample(versions: list[int]) -> Sample:
    n = len(versions)
    return Sample(
        output_ids=np.arange(n, dtype=np.int32),
        behaviour_logp=np.zeros(n, dtype=np.float32),
        token_versions=np.array(versions, dtype=np.int32),
        reward=0.0,
        finish_reason="stop",
        index=0,
    )


def _group(admission: int, *samples: list[int]) -> TrajectoryGroup:
    return TrajectoryGroup(
        run_id="r",
        prompt_id="p",
        prompt_ids=np.array([1, 2], dtype=np.int32),
        samples=[_sample(v) for v in samples],
        worker_id="w",
        admission_version=admission,
    )


def test_a_group_is_as_old_as_its_oldest_token() -> None:
    # samples with tokens of versions {4, 5} and {3, 5}: oldest 3; at version 6: 6 - 3 = 3
    assert group_staleness(6, _group(2, [4, 5], [3, 5])) == 3


def test_a_group_without_tokens_is_as_old_as_its_admission() -> None:
    # no sample has a token: the admission version (2) is the oldest; 6 - 2 = 4
    assert group_staleness(6, _group(2, [], [])) == 4
    # the worker's view of a group before it has tokens is the same number
    assert staleness(6, (), admission_version=2) == 4


def test_empty_tokens_without_admission_version_is_an_error() -> None:
    with pytest.raises(ValueError, match="admission_version"):
        staleness(3, [])


def test_tokens_win_over_admission_version() -> None:
    # tokens say 5: admission 1 does not make the group older
    assert staleness(6, [5, 6], admission_version=1) == 1


@pytest.mark.parametrize(
    ("s", "eta", "out"), [(0, 0, False), (1, 0, True), (2, 2, False), (3, 2, True)]
)
def test_past_eta(s: int, eta: int, out: bool) -> None:
    assert past_eta(s, eta) is out
