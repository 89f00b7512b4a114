"""The worker side of weight transports: make one inference server serve new weights.

A ``WeightReceiver`` fills one server through its ``InferenceClient`` and raises the client's
errors; its caller (the rollout worker's updater) holds that server's new requests meanwhile
and decides what a failure means (``ServerDead``: the server is gone; ``InferenceError``,
``ProtocolError``, ``InferenceTimeout``: it must load again). Two transports:

- ``DiskReceiver``: ``update_weights_from_disk(path, version, abort_all_requests=True)``, one
  call per server (``rollout.update_mode = abort_all``), or pause(abort) -> the same load ->
  continue (``pause``, for servers shared with other clients). In-flight requests come back
  with their partial output labelled with the old version.
- ``DistributedReceiver``: pause(abort), join the trainer's group when the plan opens one
  (``SyncPlan.init``), receive every bucket, continue (docs/weight-sync.md).
- ``LoraReceiver``: load a LoRA adapter of the version, switch the requests to it, interrupt
  the in-flight ones (``trainer.lora``; docs/weight-sync.md, LoRA).
- ``IpcReceiver``: the trainer itself fills the server (``weights.ipc``); the receiver only
  holds it: with the server's new requests held by its caller, it acknowledges
  (``ack_sync``), then waits until the server reports the new version (the trainer's last
  call landed) or the run publishes the version from disk (the trainer's fallback: the
  receiver loads that copy).

Invariants (tests/integration/test_weight_sync.py::test_distributed_sync_worker_server_and_catch_up_from_disk):

- A server's version label moves to the new version only with the last bucket; from the first
  bucket on its weights are a mix, so the receiver marks it ``mixed`` and only a complete
  transfer or a disk load (the caller's) clears the mark: a mixed server is reloaded from disk
  even when its label says it is current.
- A transfer that fails leaves the server in no group (``group = None``): it joins the next
  group the trainer opens, and catches up from disk meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

from inference.lora import adapter_name
from inference.protocol import (
    InferenceClient,
    InferenceError,
    InferenceTimeout,
    SGLangClientError,
)
from weights.plan import IPC_FMTS, IpcPlan, SyncPlan

GROUP_BACKEND = "gloo"
"""Backend of the broadcast group the servers join (the trainer broadcasts over gloo)."""
EXTRA_WAIT_S = 30.0
"""How much longer than the plan's own timeout a server call of the broadcast may take."""


class Receiving(Protocol):
    """What a receiver reads and marks on the server it fills (the worker's pool record)."""

    url: str
    version: int | None
    """The version the server serves, as far as its worker knows."""
    group: str | None
    """The broadcast group the server process has joined (None: none)."""
    mixed: bool
    """A transfer failed part-way: its weights are a mix of two versions."""
    adapter: str | None
    """LoRA runs: the adapter the worker's requests name (None: the base model)."""
    adapters: set[str]
    """LoRA runs: the adapters the worker loaded on the server and has not unloaded."""


class WeightReceiver(Protocol):
    """One transport's way to make a server serve ``version``."""

    @property
    def version(self) -> int:
        """The version the server serves once ``receive`` returned."""
        ...

    @property
    def during(self) -> str:
        """What is going on, for a log line: "the update to v3"."""
        ...

    @property
    def action(self) -> str:
        """What the server does, for a log line: "loading v3 from /w/v3"."""
        ...

    @property
    def fallback(self) -> str:
        """What happens when it fails, for a log line: "retried by the health loop"."""
        ...

    def refusal(self, server: Receiving) -> str | None:
        """Why ``server`` cannot receive this transfer (None: it can)."""
        ...

    async def receive(self, client: InferenceClient, server: Receiving) -> None:
        """Make the server behind ``client`` serve ``version``; raises the client's errors."""
        ...


@dataclass(frozen=True)
class DiskReceiver:
    """Load a safetensors directory that the trainer wrote (a disk publication)."""

    location: str
    version: int
    pause: bool = False
    """pause(abort) -> load -> continue instead of one load with ``abort_all_requests``."""

    @property
    def during(self) -> str:
        return f"the update to v{self.version}"

    @property
    def action(self) -> str:
        return f"loading v{self.version} from {self.location}"

    @property
    def fallback(self) -> str:
        return "retried by the health loop"

    def refusal(self, server: Receiving) -> str | None:
        return None

    async def receive(self, client: InferenceClient, server: Receiving) -> None:
        if self.pause:
            await client.pause("abort")
            try:
                await client.update_weights_from_disk(self.location, self.version)
            finally:
                await client.resume()
        else:
            await client.update_weights_from_disk(
                self.location, self.version, abort_all_requests=True
            )


@dataclass(frozen=True)
class DistributedReceiver:
    """Receive one broadcast of the trainer (a ``SyncPlan`` announcement)."""

    plan: SyncPlan

    @property
    def version(self) -> int:
        return self.plan.version

    @property
    def during(self) -> str:
        return f"the broadcast of v{self.plan.version}"

    @property
    def action(self) -> str:
        return f"receiving v{self.plan.version} over group {self.plan.group}"

    @property
    def fallback(self) -> str:
        return "catching up from disk"

    def refusal(self, server: Receiving) -> str | None:
        """A server that is not a member (restarted since the group was formed, or not
        registered when it was) cannot receive; its worker catches it up from disk."""
        plan = self.plan
        if server.url not in plan.ranks or (not plan.init and server.group != plan.group):
            return f"is not in weight-sync group {plan.group}: catching up from disk"
        return None

    async def receive(self, client: InferenceClient, server: Receiving) -> None:
        """pause(abort) -> join (if ``plan.init``) -> every bucket -> continue."""
        plan = self.plan
        wait = plan.timeout_s + EXTRA_WAIT_S
        try:
            await client.pause("abort")
            try:
                if plan.init:
                    server.group = None
                    await client.init_weights_update_group(
                        plan.master_addr,
                        plan.master_port,
                        plan.ranks[server.url],
                        plan.world_size,
                        plan.group,
                        GROUP_BACKEND,
                        timeout=wait,
                    )
                    server.group = plan.group
                server.mixed = True
                last = len(plan.buckets) - 1
                for i, b in enumerate(plan.buckets):
                    # The label moves to the new version only with the last bucket.
                    await client.update_weights_from_distributed(
                        b["names"],
                        b["dtypes"],
                        b["shapes"],
                        plan.group,
                        plan.version if i == last else (server.version or 0),
                        flush_cache=i == last,
                        timeout=wait,
                    )
            finally:
                await client.resume()
        except SGLangClientError:
            server.group = None
            raise


@dataclass(frozen=True)
class LoraReceiver:
    """Load the adapter of a LoRA publication (``weights.lora``) and switch to it.

    ``/abort_request`` (all) interrupts the in-flight requests: they come back with their
    partial output labelled with their adapter's (older) version and are resubmitted, as a
    full-weight update interrupts them; then ``/load_lora_adapter(adapter_name(version),
    location)``, and the worker's requests name the new adapter (``server.adapter``). The
    previous adapter is unloaded by the caller once no request names it. A failed load leaves
    ``server.adapter`` as it was: the caller marks the server NEEDS_LOAD, so it gets no
    request of this version.
    """

    location: str
    version: int
    reload: bool = False
    """Unload the name first if the server has it (a server brought up again may still hold
    an adapter of that name, or have lost it in a restart)."""

    @property
    def name(self) -> str:
        return adapter_name(self.version)

    @property
    def during(self) -> str:
        return f"the adapter update to v{self.version}"

    @property
    def action(self) -> str:
        return f"loading adapter v{self.version} from {self.location}"

    @property
    def fallback(self) -> str:
        return "retried by the health loop"

    def refusal(self, server: Receiving) -> str | None:
        return None

    async def receive(self, client: InferenceClient, server: Receiving) -> None:
        name = self.name
        if self.reload or name in server.adapters:
            with contextlib.suppress(InferenceError):  # not loaded there: nothing to replace
                await client.unload_lora_adapter(name)
            server.adapters.discard(name)
        # As a full-weight update with abort_all_requests: interrupt, then load (the load then
        # waits for no engine step); the caller holds the worker's new requests throughout.
        await client.abort()
        await client.load_lora_adapter(name, self.location)
        server.adapters.add(name)
        server.adapter = name


class IpcRun(Protocol):
    """What an ``IpcReceiver`` reads and writes in the run (``staleness.VersionManager``)."""

    async def ack_sync(self, version: int, url: str) -> None: ...

    async def latest_weights(self) -> Any: ...


IPC_POLL_S = (0.002, 0.05)
"""An ipc receiver checks its server and the run every 2 ms at first, backing off to 50 ms."""


@dataclass(frozen=True)
class IpcReceiver:
    """Hold one server while the trainer fills it in memory (an ``IpcPlan`` announcement)."""

    plan: IpcPlan
    run: IpcRun

    @property
    def version(self) -> int:
        return self.plan.version

    @property
    def during(self) -> str:
        return f"the ipc transfer of v{self.plan.version}"

    @property
    def action(self) -> str:
        return f"receiving v{self.plan.version} from the trainer in memory"

    @property
    def fallback(self) -> str:
        return "catching up from disk"

    def refusal(self, server: Receiving) -> str | None:
        """A server the trainer does not send to (not registered for ipc, or its worker was
        not seen alive when the plan was made) catches up from disk."""
        if server.url not in self.plan.servers:
            return f"is not a target of the ipc transfer of v{self.plan.version}: catching up from disk"
        return None

    async def receive(self, client: InferenceClient, server: Receiving) -> None:
        """Acknowledge, then wait for the outcome (see the class doc); the caller holds the
        server's new requests throughout. ``InferenceTimeout`` when neither comes within
        twice the plan's timeout (the trainer's wait for every acknowledgement, then its
        calls) plus ``EXTRA_WAIT_S`` (its disk copy)."""
        plan = self.plan
        # From the acknowledgement on the trainer may write any bucket.
        server.mixed = True
        await self.run.ack_sync(plan.version, server.url)
        deadline = time.monotonic() + 2 * plan.timeout_s + EXTRA_WAIT_S
        pause, polls = IPC_POLL_S[0], 0
        while True:
            if await client.weight_version(timeout=10.0) == plan.version:
                return  # the last bucket landed: every tensor of the version is in
            polls += 1
            if polls % 5 == 0:  # the run, less often than the server
                latest = await self.run.latest_weights()
                if latest is not None and latest.version >= plan.version:
                    if latest.version == plan.version and latest.fmt not in IPC_FMTS:
                        # The trainer fell back to disk for this version: load its copy.
                        await client.update_weights_from_disk(
                            latest.location, plan.version, abort_all_requests=True
                        )
                        return
                    if latest.version > plan.version or latest.fmt in IPC_FMTS:
                        # Done, yet this server is not at the version (or superseded): the
                        # caller reloads it from the latest disk copy.
                        have = await client.weight_version(timeout=10.0)
                        if have == plan.version:
                            return
                        raise InferenceError(
                            200,
                            f"the run is at v{latest.version} ({latest.fmt}) but the server "
                            f"reports v{have}",
                            "/model_info",
                        )
            if time.monotonic() > deadline:
                raise InferenceTimeout(
                    f"{server.url}: neither the ipc transfer of v{plan.version} nor a fallback "
                    "arrived in time"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, IPC_POLL_S[1])
