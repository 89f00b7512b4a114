"""The version manager's argument checks, run before anything reaches Redis: each raises
``ValueError`` naming the argument, its value and what is allowed. ``check_run_settings``
compares a process's ``eta`` and ``batch_groups`` with the run's, as the open script returned
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from staleness.records import RunNotFound, RunSettingsMismatch


def check_worker(worker_id: str) -> str:
    if not isinstance(worker_id, str) or not worker_id or len(worker_id) > 200:
        raise ValueError(f"worker id {worker_id!r} must be a non-empty string of <= 200 characters")
    return worker_id


def check_count(name: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name}: n={n!r} must be an int >= 0")
    return n


def check_setting(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return value


def check_reason(name: str, reason: str) -> str:
    """A rejection reason: the field it is counted under in ``gate:rejected_by``."""
    if not reason or len(reason) > 100:
        raise ValueError(f"{name}: reason {reason!r} must be 1-100 characters")
    return reason


def check_location(name: str, location: str) -> str:
    if not location:
        raise ValueError(f"{name}: location must be non-empty")
    return location


def check_run_settings(
    run: str, eta: int | None, batch_groups: int | None, reply: Sequence[Any]
) -> tuple[int, int]:
    """The run's (eta, batch_groups) from the open script's ``reply``, checked against the
    process's values (None: take the run's). Raises ``RunNotFound`` when the run does not exist
    and ``RunSettingsMismatch`` naming both values when they differ."""
    if int(reply[0]) == 0:
        raise RunNotFound(
            f"run {run!r} does not exist in this Redis; start it with eta and batch_groups "
            "(e.g. the trainer or `sluice rollout` with a config) or check --run"
        )
    have_eta, have_b = int(reply[1]), int(reply[2])
    if eta is not None and eta != have_eta:
        raise RunSettingsMismatch(
            f"run {run!r} has eta={have_eta} but this process was started with eta={eta}; "
            f"use the run's value, or change it on the live run with `sluice run set-eta {eta} "
            f"--run {run}`"
        )
    if batch_groups is not None and batch_groups != have_b:
        raise RunSettingsMismatch(
            f"run {run!r} has batch_groups={have_b} but this process was started with "
            f"batch_groups={batch_groups}; batch_groups is fixed for a run (start a new run to "
            "change it)"
        )
    return have_eta, have_b


def settings_differ(
    run: str,
    *,
    run_eta: int,
    config_eta: int,
    run_batch_groups: int | None = None,
    config_batch_groups: int | None = None,
) -> str | None:
    """The one warning a worker or trainer logs when it joins a run whose settings differ
    from its config's (None when they agree): both values of each, and that the run's win.
    The run's eta may differ after ``sluice run set-eta``; that is normal, not an error."""
    diffs = []
    if run_eta != config_eta:
        diffs.append(f"eta={run_eta} (the config says {config_eta})")
    if None not in (run_batch_groups, config_batch_groups) and (
        run_batch_groups != config_batch_groups
    ):
        diffs.append(f"batch_groups={run_batch_groups} (the config says {config_batch_groups})")
    if not diffs:
        return None
    return (
        f"run {run!r} has {' and '.join(diffs)}: using the run's, which wins (change eta on "
        f"the live run with `sluice run set-eta N --run {run}`)"
    )
