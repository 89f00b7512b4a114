"""The staleness rule as two pure functions: how many groups may start, and how stale one is.

The version manager (``staleness.version_manager``) runs the same formula inside one Lua script;
``tests/test_staleness_math.py`` checks the two against each other on random schedules.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch / numpy stay unimported: the version manager uses this module
    import numpy as np
    import torch


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
    (``tests/test_staleness_math.py::GateModel`` checks both statements).

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
    current_version: int, token_versions: Iterable[int] | torch.Tensor | np.ndarray
) -> int:
    """``current_version - min(token_versions)``: how many versions old the oldest token is.

    ``token_versions`` holds the policy version that produced each generated token of a sample
    or group (a sample interrupted by a weight update carries several). The trainer drops a
    group with ``staleness > eta``. A negative result means a token claims a version the
    trainer has not reached: a bug upstream, returned as is for the caller to report.
    Raises ``ValueError`` on an empty input (a group without generated tokens has no age).
    """
    arr: Any = token_versions
    if hasattr(arr, "shape") and callable(getattr(arr, "min", None)):  # torch.Tensor, np.ndarray
        if 0 in tuple(arr.shape):
            raise ValueError("staleness: token_versions is empty")
        oldest = int(arr.min())
    else:
        values = [int(v) for v in token_versions]
        if not values:
            raise ValueError("staleness: token_versions is empty")
        oldest = min(values)
    return int(current_version) - oldest
