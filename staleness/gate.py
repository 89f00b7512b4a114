"""The staleness rule as pure functions: how many groups may start (``admission_capacity``),
how stale a trajectory is (``staleness``, ``group_staleness``) and whether it may be trained
(``past_eta``). The worker, the trainer and the reports use these; nothing recomputes them inline.

The version manager (``staleness.version_manager``) runs the same formula inside one Lua script;
``tests/unit/staleness/test_staleness_math.py`` checks the two against each other on random schedules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BatchPlan:
    """``plan_batch``'s answer: which pooled groups a step takes, which are past eta, and
    whether the step may go now."""

    take: list[int]
    """Indices into the pool, earliest expiry first: at most ``take`` of them."""
    expired: list[int]
    """Indices of pooled groups already past eta: dropped, never trained."""
    ready: bool
    """The batch is full and no group, pooled or still being generated, will expire for want
    of a step: every one can still be trained in time (given that it arrives)."""
    short: int
    """How many more groups the step lacks (in count, or by the expiry rule); 0 when ready."""


def plan_batch(
    oldest: Sequence[int],
    inflight: Mapping[int, int],
    *,
    version: int,
    eta: int,
    take: int,
    steps_to_publish: int = 1,
    publish_every: int = 1,
    inflight_share: float = 1.0,
    narrowed: tuple[int, int] | None = None,
) -> BatchPlan:
    """Which of the pooled groups the trainer trains now, earliest expiry first, and whether
    it must wait for more (``trainer.data``; docs/staleness.md, "No waste at steady state").

    ``oldest[i]`` is the oldest version of pooled group ``i`` (its oldest token, or its
    admission version); it may be trained while the trainer's version is at most
    ``oldest + eta``: its *expiry*. ``inflight`` maps admission versions to the groups still
    being generated (``VersionManager.inflight_by_version``); their tokens are no older than
    their admission, so their expiry is at most ``admission + eta`` (they are counted with
    that bound, times ``inflight_share``, this rank's share of them under data parallelism).
    The step at ``version`` trains ``take`` groups; the version moves on after
    ``steps_to_publish`` steps (this one included) and then every ``publish_every`` steps.

    The rule (earliest-deadline-first with a hold): the groups that expire at ``version + j``
    or earlier, ``D_j`` of them (pooled plus in flight), fit in the ``s_j = steps_to_publish +
    j * publish_every`` steps left before that version passes; the later steps hold
    ``(s_j - 1) * take`` of them, so this step must take at least ``D_j - (s_j - 1) * take``.
    The batch is the ``take`` earliest-expiring pooled groups; it is ``ready`` when it holds
    ``take`` groups and meets every such need. When it is not, the groups the need counts are
    still in flight, and waiting for them (bounded by the caller) is what keeps them from
    expiring: the trainer is the only thing that moves the version. With every group arriving
    and the gate's ``(eta + 1) * B`` bound, the need never exceeds one batch, so a trainer that
    waits whenever ``ready`` is False drops nothing (``tests/unit/staleness/test_plan_batch.py``
    checks it on random schedules).

    ``narrowed = (from_version, new_eta)`` while eta is being lowered (the gate admits with
    ``new_eta`` since ``from_version``, ``eta`` stays the bound until the older groups are out
    of reach: ``VersionManager.narrow_admission``): groups of version ``from_version`` or
    later are planned to be trained within ``new_eta`` (a group past it but within ``eta`` is
    overdue and goes first), so that none is past ``new_eta`` once it becomes the bound; only
    a group past ``eta`` is expired.
    """
    if take < 1 or eta < 0 or steps_to_publish < 1 or publish_every < 1:
        raise ValueError(
            f"plan_batch: take={take}, eta={eta}, steps_to_publish={steps_to_publish}, "
            f"publish_every={publish_every}: take, steps and publish_every must be >= 1, eta >= 0"
        )
    expired = [i for i, o in enumerate(oldest) if past_eta(staleness(version, [o]), eta)]
    gone = set(expired)

    def expiry(o: int) -> int:  # a group past its planned eta, within the bound: due now
        e = eta if narrowed is None or o < narrowed[0] else min(eta, narrowed[1])
        return max(o + e, version)

    order = sorted((expiry(o), o, i) for i, o in enumerate(oldest) if i not in gone)
    batch = [i for _, _, i in order[:take]]
    # Expiries, pooled and in flight (in flight: at most admission + eta; those already past
    # the bound are lost and are not waited for).
    due: dict[int, float] = {}
    for o in (oldest[i] for i in range(len(oldest)) if i not in gone):
        due[expiry(o)] = due.get(expiry(o), 0.0) + 1
    for v, c in inflight.items():
        if c > 0 and v + eta >= version:
            due[expiry(v)] = due.get(expiry(v), 0.0) + c * inflight_share
    taken_exp = sorted(expiry(oldest[i]) for i in batch)
    short = max(0, take - len(batch))
    cum = 0.0
    for e in sorted(due):
        cum += due[e]
        j = e - version
        steps = steps_to_publish + j * publish_every
        need = math.ceil(cum - 1e-9) - (steps - 1) * take
        if need <= 0:
            continue
        have = sum(1 for x in taken_exp if x <= e)
        # More due than one batch holds: some expire whatever the trainer does; waiting
        # cannot save them, so it asks for no more than a full batch of them.
        short = max(short, min(need, take) - have)
    return BatchPlan(take=batch, expired=expired, ready=short == 0, short=short)
