"""The wire format of a distributed weight sync (docs/weight-sync.md), shared by the trainer
(which announces it) and the rollout workers (which make their servers receive it).

An announcement is a weight event with ``fmt == FMT_ANNOUNCE`` whose ``location`` is a
``SyncPlan`` as JSON; after the broadcast the trainer publishes the same version with
``fmt == FMT_DONE`` (not loadable: a consumer that missed the broadcast catches up from the
latest disk copy, ``VersionManager.latest_disk_weights``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

FMT_ANNOUNCE = "distributed"
"""Event fmt of an announcement: location is a ``SyncPlan``; the broadcast follows."""
FMT_DONE = "distributed-done"
"""Fmt of the publication after a broadcast; its location is not loadable."""
DISTRIBUTED_FMTS = frozenset({FMT_ANNOUNCE, FMT_DONE})


@dataclass
class SyncPlan:
    """One broadcast, as announced to the workers."""

    version: int
    group: str
    """Group name; servers join it when ``init`` (a server cannot leave a group, so every new
    membership gets a new name)."""
    master_addr: str
    master_port: int
    world_size: int
    """1 (the trainer, rank 0) + the servers in ``ranks``."""
    ranks: dict[str, int]
    """Server URL -> its rank (1..world_size-1)."""
    init: bool
    """True on the group's first version: its servers join before receiving."""
    buckets: list[dict[str, list[Any]]]
    """``{"names": [str], "dtypes": ["float32", ...], "shapes": [[int]]}`` each; rank 0
    broadcasts the tensors of all buckets in this order, one broadcast per tensor."""
    timeout_s: float
    """How long rank 0 waits for the servers to join and to receive."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SyncPlan:
        """Parse an announcement's location; ``ValueError`` naming what is wrong."""
        try:
            d = json.loads(text)
            plan = cls(**d)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"bad distributed weight-sync plan: {e}") from None
        if plan.world_size != 1 + len(plan.ranks) or not plan.buckets:
            raise ValueError(
                f"bad distributed weight-sync plan: world_size {plan.world_size} with "
                f"{len(plan.ranks)} ranks and {len(plan.buckets)} buckets"
            )
        return plan
