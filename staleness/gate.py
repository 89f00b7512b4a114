"""The staleness rule as pure functions: how many groups may start (``admission_capacity``),
how stale a trajectory is (``staleness``, ``group_staleness``) and whether it may be trained
(``past_eta``). The worker, the trainer and the reports use these; nothing recomputes them inline.

The version manager (``staleness.version_manager``) runs the same formula inside one Lua script;
``tests/unit/staleness/test_staleness_math.py`` checks the two against each other on random schedules.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch / numpy stay unimported: the version manager uses this module
    import numpy as np
    import torch

    from buffer.schema import TrajectoryGroup


def admission_capacity(
    version: int, eta: int, batch_groups: int, admitted: int, rejected: int
) -> int:
    """How many more groups may be admitted now::

        capacity = max(0, (version + eta + 1) * batch_groups - (admitted - rejected))

    ``version`` V is the trainer's current policy version (0 before the first step), ``eta`` the
    staleness limit, ``batch_groups`` B the groups one train step consumes, ``admitted`` every
    group ever admitted and ``rejected`` those that handed their slot back (rejected, failed,
    reaped, or dropped by the trainer). ``admitted - rejected`` is therefore the number of
    groups that are in flight, waiting in the buffer, or already trained on.

    Invariant: after any admission, ``admitted - rejected <= (V + eta + 1) * B``. The trainer
    at version V has trained on ``V * B`` groups, so at most ``(eta + 1) * B`` groups are in
    flight or buffered. If groups reach the trainer in the order they were admitted, a group
    admitted at version v is the k-th live group with ``k <= (v + eta + 1) * B`` and is trained
    in a step whose version is ``<= v + eta``: its staleness is at most ``eta``. A straggler that
    later groups overtake can exceed it; the trainer's per-group ``staleness`` check catches it
    (``tests/unit/staleness/test_staleness_math.py::GateModel`` checks both statements).

    Never negative: lowering ``eta`` on a live run clamps capacity at 0 until the trainer
    catches up.
    """
    for name, value, low in (
        ("version", version, 0),
        ("eta", eta, 0),
        ("batch_groups", batch_groups, 1),
        ("admitted", admitted, 0),
        ("rejected", rejected, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"admission_capacity: {name}={value!r} must be an int >= {low}")
    if rejected > admitted:
        raise ValueError(
            f"admission_capacity: rejected={rejected} exceeds admitted={admitted} "
            "(a slot was handed back twice)"
        )
    return max(0, (version + eta + 1) * batch_groups - (admitted - rejected))


def staleness(
    current_version: int,
    token_versions: Iterable[int] | torch.Tensor | np.ndarray,
    *,
    admission_version: int | None = None,
) -> int:
    """The staleness rule: ``current_version - oldest``, how many versions old a trajectory is.

    ``oldest`` is the smallest policy version among ``token_versions`` (the version that
    produced each generated token; a sample interrupted by a weight update carries several).
    A trajectory without generated tokens is as old as its admission: with no tokens,
    ``admission_version`` is ``oldest`` (and ``ValueError`` when it is not given). The same
    function decides for the trainer (drop a group read with ``staleness > eta``:
    ``group_staleness``) and for the worker (stop a group that can no longer be trained,
    before it has tokens: ``staleness(version, (), admission_version=v)``).

    A negative result means a token claims a version the trainer has not reached: a bug
    upstream, returned as is for the caller to report.
    """
    arr: Any = token_versions
    if hasattr(arr, "shape") and callable(getattr(arr, "min", None)):  # torch.Tensor, np.ndarray
        oldest = None if 0 in tuple(arr.shape) else int(arr.min())
    else:
        values = [int(v) for v in token_versions]
        oldest = min(values) if values else None
    if oldest is None:
        if admission_version is None:
            raise ValueError("staleness: token_versions is empty and no admission_version given")
        oldest = int(admission_version)
    return int(current_version) - oldest


def group_staleness(current_version: int, group: TrajectoryGroup) -> int:
    """``staleness`` of a whole group: its oldest token over every sample, or its admission
    version when no sample has a token."""
    mins = [int(s.token_versions.min()) for s in group.samples if s.num_tokens]
    return staleness(current_version, mins, admission_version=group.admission_version)


def past_eta(staleness_: int, eta: int) -> bool:
    """True when a trajectory this stale may not be trained (``staleness > eta``)."""
    return staleness_ > eta
