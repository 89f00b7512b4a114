"""``staleness.checks``: the version manager's argument checks and the run-settings check,
with their messages (no Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from staleness.checks import (
    check_count,
    check_location,
    check_reason,
    check_run_settings,
    check_setting,
    check_worker,
)
from staleness.records import RunNotFound, RunSettingsMismatch


@pytest.mark.parametrize("bad", ["", "x" * 201, 3, None])
def test_worker_id(bad: Any) -> None:
    with pytest.raises(ValueError, match="must be a non-empty string of <= 200 characters"):
        check_worker(bad)
    assert check_worker("w" * 200) == "w" * 200


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1"])
def test_count(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"^finish: n=.* must be an int >= 0$"):
        check_count("finish", bad)
    assert check_count("finish", 0) == 0


def test_setting() -> None:
    with pytest.raises(ValueError, match=r"^batch_groups=0 must be an int >= 1$"):
        check_setting("batch_groups", 0, 1)
    with pytest.raises(ValueError, match=r"^eta=False must be an int >= 0$"):
        check_setting("eta", False, 0)
    assert check_setting("eta", 0, 0) == 0


def test_reason_and_location() -> None:
    with pytest.raises(ValueError, match=r"^drop: reason '' must be 1-100 characters$"):
        check_reason("drop", "")
    with pytest.raises(ValueError, match="1-100 characters"):
        check_reason("reject", "r" * 101)
    assert check_reason("reject", "r" * 100) == "r" * 100
    with pytest.raises(ValueError, match=r"^publish_weights: location must be non-empty$"):
        check_location("publish_weights", "")


def test_run_settings_from_the_open_reply() -> None:
    # {2, eta, B}: created; {1, eta, B}: existed (Redis returns the stored values as bytes)
    assert check_run_settings("r", 2, 8, [2, b"2", b"8"]) == (2, 8)
    assert check_run_settings("r", None, None, [1, b"2", b"8"]) == (2, 8)
    assert check_run_settings("r", 2, None, [1, b"2", b"8"]) == (2, 8)


def test_missing_run() -> None:
    with pytest.raises(RunNotFound, match=r"run 'r' does not exist in this Redis; .* check --run"):
        check_run_settings("r", None, None, [0])


def test_mismatches_name_both_values_and_the_fix() -> None:
    with pytest.raises(
        RunSettingsMismatch, match=r"eta=2 .* eta=3; .*`sluice run set-eta 3 --run r`"
    ):
        check_run_settings("r", 3, 8, [1, b"2", b"8"])
    with pytest.raises(
        RunSettingsMismatch, match=r"batch_groups=8 .* batch_groups=4; batch_groups is fixed"
    ):
        check_run_settings("r", 2, 4, [1, b"2", b"8"])
