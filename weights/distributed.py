"""Distributed weight sync, trainer side (rank 0): broadcast parameters to the servers over gloo.

Protocol (docs/weight-sync.md), per published version ``v``:

1. **Group.** If there is no group, or the set of registered servers (``VersionManager.
   sync_servers``, filtered to servers whose worker's heartbeat is alive) changed, or the last
   transfer failed, rank 0 opens a fresh rendezvous: a master ``TCPStore`` on
   ``sync_master_addr:port`` with ``world_size = 1 + servers`` and a new group name
   (``sluice-g{n}``; a server cannot leave a group, so a new set means a new name). Ranks are
   the servers' sorted URLs: ``ranks[url] = 1 + index``.
2. **Announce** ``v`` with ``VersionManager.announce_weights(v, plan_json, "distributed")``:
   the plan (``SyncPlan``) names the group, its address, port, world size, ranks, whether the
   servers must join first, and the buckets (names / dtypes / shapes, ``bucket_mb`` each).
3. **Broadcast** every parameter of ``model.named_parameters()`` in plan order from rank 0
   (one gloo broadcast per tensor; the servers receive one bucket per HTTP call).
4. The caller then **publishes** ``v`` (fmt ``distributed-done``), so the run's version moves
   only once the weights are on the servers.

Any failure (nobody registered, a server that does not join or dies mid-transfer, timeout)
returns False: the caller writes the disk copy and publishes ``v`` as safetensors, and the next
version opens a fresh group. Invariant: ``broadcast`` returns True only if every rank took part
in every tensor's broadcast (gloo broadcast completes on rank 0 only then, or raises).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from datetime import timedelta
from typing import Any

import torch

from weights.plan import FMT_ANNOUNCE, SyncPlan

log = logging.getLogger("sluice.weights.distributed")


def bucket_plan(named: list[tuple[str, torch.Tensor]], bucket_mb: int) -> list[dict[str, Any]]:
    """Split ``named`` (in order) into buckets of at most ``bucket_mb`` MiB (a larger tensor gets
    a bucket of its own). Concatenating the buckets' names gives back ``named``'s names."""
    limit = bucket_mb * 1024 * 1024
    buckets: list[dict[str, Any]] = []
    cur: dict[str, Any] = {"names": [], "dtypes": [], "shapes": []}
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if cur["names"] and size + n > limit:
            buckets.append(cur)
            cur, size = {"names": [], "dtypes": [], "shapes": []}, 0
        cur["names"].append(name)
        cur["dtypes"].append(str(t.dtype).removeprefix("torch."))
        cur["shapes"].append(list(t.shape))
        size += n
    if cur["names"]:
        buckets.append(cur)
    return buckets


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


class DistributedSync:
    """Rank 0's end of the weight broadcast; one per trainer process (see the module doc)."""

    def __init__(
        self,
        vm: Any,
        *,
        master_addr: str = "127.0.0.1",
        port: int = 0,
        bucket_mb: int = 256,
        timeout_s: float = 60.0,
    ) -> None:
        self.vm = vm
        self.master_addr = master_addr
        self.port = port
        self.bucket_mb = bucket_mb
        self.timeout_s = timeout_s
        self._store: Any = None
        self._pg: Any = None
        self._group = ""
        self._ranks: dict[str, int] = {}
        self._port = 0
        self._groups_opened = 0
        self.last_s = 0.0
        """Seconds the last ``broadcast`` took (announce to last tensor)."""

    @property
    def group(self) -> str:
        """The current group's name ('' when none is open)."""
        return self._group

    async def _servers(self) -> list[str]:
        """Registered servers whose worker is alive (heartbeat not expired), sorted."""
        reg = await self.vm.sync_servers()
        snap = await self.vm.snapshot()
        alive = {w.id for w in snap.workers if w.alive}
        return sorted(u for u, w in reg.items() if w in alive)

    def _close(self) -> None:
        self._pg, self._store, self._group, self._ranks = None, None, "", {}

    async def broadcast(self, version: int, model: torch.nn.Module) -> bool:
        """Announce ``version`` and broadcast ``model``'s parameters; True if every server got
        every tensor (the caller then publishes), False otherwise (the caller falls back)."""
        import torch.distributed as dist
        from torch._C._distributed_c10d import PrefixStore, TCPStore  # torch.distributed's own

        t0 = time.monotonic()
        servers = await self._servers()
        if not servers:
            log.info("weight sync v%d: no server registered; falling back to disk", version)
            self._close()
            return False
        init = self._pg is None or sorted(self._ranks) != servers
        if init:
            self._close()
            self._groups_opened += 1
            self._port = self.port or _free_port(self.master_addr)
            self._group = f"sluice-g{self._groups_opened}-{int(time.time())}"
            self._ranks = {u: i + 1 for i, u in enumerate(servers)}
            world = 1 + len(servers)
            self._store = TCPStore(
                self.master_addr,
                self._port,
                world,
                is_master=True,
                timeout=timedelta(seconds=self.timeout_s),
                wait_for_workers=False,
            )
        # gloo sends CPU tensors (a CUDA model is copied to the host; NCCL would not need it).
        named = [(n, p.detach().to("cpu").contiguous()) for n, p in model.named_parameters()]
        plan = SyncPlan(
            version=version,
            group=self._group,
            master_addr=self.master_addr,
            master_port=self._port,
            world_size=1 + len(self._ranks),
            ranks=dict(self._ranks),
            init=init,
            buckets=bucket_plan(named, self.bucket_mb),
            timeout_s=self.timeout_s,
        )
        try:
            await self.vm.announce_weights(version, plan.to_json(), FMT_ANNOUNCE)
            if init:
                store, world = self._store, plan.world_size
                self._pg = await asyncio.to_thread(
                    lambda: dist.ProcessGroupGloo(
                        PrefixStore(plan.group + "/", store),
                        0,
                        world,
                        timedelta(seconds=self.timeout_s),
                    )
                )
            pg = self._pg

            def send() -> None:
                for _, t in named:
                    opts = dist.BroadcastOptions()
                    opts.rootRank = 0
                    pg.broadcast([t], opts).wait()

            await asyncio.to_thread(send)
        except (RuntimeError, OSError, ValueError) as e:
            log.warning("weight sync v%d over group %s failed: %s", version, plan.group, e)
            self._close()
            return False
        self.last_s = time.monotonic() - t0
        log.info(
            "weight sync v%d: %d tensors in %d bucket(s) to %d server(s) in %.3fs",
            version,
            len(named),
            len(plan.buckets),
            len(self._ranks),
            self.last_s,
        )
        return True
