"""The wire format of the weight transports that announce a transfer before it (docs/weight-sync.md),
shared by the trainer (which announces it) and the rollout workers (which make their servers
receive it, or hold them while the trainer fills them).

- distributed: an announcement is a weight event with ``fmt == FMT_ANNOUNCE`` whose
  ``location`` is a ``SyncPlan`` as JSON; after the broadcast the trainer publishes the same
  version with ``fmt == FMT_DONE``.
- ipc: the announcement has ``fmt == FMT_IPC_ANNOUNCE`` and an ``IpcPlan``; the trainer waits
  until every target's worker acknowledged that it holds the server's new requests, sends the
  buckets itself (``/update_weights_from_tensor``), then publishes ``FMT_IPC_DONE``.

Neither done publication is loadable: a consumer that missed the transfer catches up from the
latest disk copy (``VersionManager.latest_disk_weights``); ``REMOTE_FMTS`` names them all.
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
FMT_IPC_ANNOUNCE = "ipc"
"""Event fmt of an ipc announcement: location is an ``IpcPlan``; the trainer's calls follow."""
FMT_IPC_DONE = "ipc-done"
"""Fmt of the publication after an ipc transfer; its location is not loadable."""
IPC_FMTS = frozenset({FMT_IPC_ANNOUNCE, FMT_IPC_DONE})
REMOTE_FMTS = DISTRIBUTED_FMTS | IPC_FMTS
FMT_LORA = "lora"
"""A LoRA adapter directory (``weights.lora``): servers load it with ``/load_lora_adapter``
over their unchanged base model, and requests name it."""
"""Weight events whose location is not a directory: the catch-up source is the disk copy."""


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


@dataclass
class IpcPlan:
    """One ipc transfer, as announced to the workers."""

    version: int
    servers: list[str]
    """The target servers' URLs (registered ``ipc``, on the trainer's host)."""
    buckets: list[dict[str, list[Any]]]
    """As ``SyncPlan.buckets``, in the dtype sent; one ``/update_weights_from_tensor`` call
    per bucket and server, in this order."""
    timeout_s: float
    """How long the trainer waits for the workers' acknowledgements, and for each call."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> IpcPlan:
        """Parse an announcement's location; ``ValueError`` naming what is wrong."""
        try:
            plan = cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"bad ipc weight-sync plan: {e}") from None
        if not plan.servers or not plan.buckets:
            raise ValueError(
                f"bad ipc weight-sync plan: {len(plan.servers)} servers and "
                f"{len(plan.buckets)} buckets"
            )
        return plan
