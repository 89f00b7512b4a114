"""Weight publication, trainer side: one contract (``WeightPublisher``), two transports.

- ``DiskPublisher`` (``trainer.weight_sync=disk``): writes ``weights_dir/v{N}`` (an HF
  safetensors directory, atomically, with the starting model directory's non-weight files —
  tokenizer, generation config, ...: ``weights.disk.model_files``), publishes it
  (``publish_weights(N, path, "safetensors")``) and keeps the newest ``keep`` versions.
- ``DistributedPublisher`` (``trainer.weight_sync=distributed``): broadcasts ``N`` to the
  registered servers (``weights.distributed``) and publishes it as ``distributed-done``.
  Every ``disk_every`` versions, and whenever the broadcast fails, the disk copy is written and
  recorded first (``record_disk_weights``: the catch-up source of a server that missed a
  broadcast); after a failed broadcast ``N`` is published as safetensors from that copy.
- ``IpcPublisher`` (``trainer.weight_sync=ipc``): the same, with the transfer done by
  ``weights.ipc.IpcSync`` (``/update_weights_from_tensor`` to the servers launched on this
  host) and the publication's fmt ``ipc-done``.

Invariant: the run's version moves to ``N`` (``publish_weights``) only once the weights of
``N`` can be read: a complete directory on disk, or every server of the group has received
every tensor (``tests/integration/test_weight_sync.py``; ``tests/unit/weights/test_weights_publish.py``
checks the order of the calls with fakes).

The trainer publishes from rank 0 only; a publisher never learns the trainer's state beyond
the version and the model it is handed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from weights.disk import model_files, prune, write_model_dir
from weights.plan import FMT_DONE, FMT_IPC_DONE

R = TypeVar("R")

CrashHook = Callable[[str], None]
"""Called with ``"mid_publish"`` once a version's directory is written but not yet renamed
into place (the trainer's fault-injection hook)."""


class WeightPublisher(Protocol):
    """Makes the weights of ``version`` reachable by the servers, then the run's version;
    returns the bytes the update moved (written to disk or sent), None when unknown."""

    last_via: str
    """How the last version reached the servers: ``disk``, ``distributed``, ``ipc`` or
    ``lora``."""

    async def publish(self, version: int, model: torch.nn.Module) -> int | None: ...


class WeightRecords(Protocol):
    """What a publisher records in the run (``staleness.VersionManager`` has these)."""

    async def publish_weights(
        self, version: int, location: str, fmt: str = "safetensors"
    ) -> str: ...

    async def record_disk_weights(
        self, version: int, location: str, fmt: str = "safetensors"
    ) -> bool: ...


class Broadcast(Protocol):
    """The transfer to the servers (``weights.distributed.DistributedSync``,
    ``weights.ipc.IpcSync``)."""

    @property
    def group(self) -> str: ...

    async def broadcast(self, version: int, model: torch.nn.Module) -> bool: ...


class CallTimer(Protocol):
    """Awaits one call to the run's records, counting its time (the trainer's ``buffer_s``)."""

    def __call__(self, call: Awaitable[R], /) -> Awaitable[R]: ...


async def untimed(call: Awaitable[R]) -> R:
    """A ``CallTimer`` that counts nothing."""
    return await call


def weight_bytes(directory: Path) -> int:
    """Bytes of the ``*.safetensors`` files in ``directory``."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def model_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``model``'s parameters in ``dtype`` (None: their own), LoRA adapter tensors
    (``lora_`` in the name) left out: the size of one full-weight update."""
    raw = getattr(model, "module", model)
    total = 0
    for name, p in raw.named_parameters():
        if "lora_" in name:
            continue
        size = p.element_size() if dtype is None else torch.empty((), dtype=dtype).element_size()
        total += p.numel() * size
    return total


class DiskPublisher:
    """``weight_sync=disk``: every version as ``weights_dir/v{N}``, the newest ``keep`` kept;
    each carries the non-weight files of ``model_dir`` (the starting model), when given."""

    def __init__(
        self,
        records: WeightRecords,
        weights_dir: Path,
        *,
        keep: int,
        timed: CallTimer = untimed,
        crash_hook: CrashHook | None = None,
        model_dir: Path | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.records = records
        self.weights_dir = weights_dir
        self.keep = keep
        self.timed = timed
        self.crash_hook = crash_hook
        self.files = model_files(model_dir)
        self.dtype = dtype
        """The dtype written (None: the model's own)."""

    last_via = "disk"

    async def publish(self, version: int, model: torch.nn.Module) -> int | None:
        dest = write_model_dir(
            model, self.weights_dir / f"v{version}", self.crash_hook, self.files, self.dtype
        )
        await self.timed(self.records.publish_weights(version, str(dest.resolve()), "safetensors"))
        sent = weight_bytes(dest)
        prune(self.weights_dir, "v", self.keep)
        return sent


class DistributedPublisher:
    """``weight_sync=distributed``: broadcast, with a disk copy every ``disk_every`` versions
    and whenever the broadcast fails (see the module docstring)."""

    done_fmt = FMT_DONE
    """The fmt of a version published after a successful transfer."""
    done_prefix = "group:"
    """Its location: this prefix and ``sync.group`` (not loadable)."""
    via = "distributed"
    last_via = "disk"

    def __init__(
        self,
        records: WeightRecords,
        sync: Broadcast,
        weights_dir: Path,
        *,
        keep: int,
        disk_every: int,
        timed: CallTimer = untimed,
        crash_hook: CrashHook | None = None,
        model_dir: Path | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.records = records
        self.sync = sync
        self.weights_dir = weights_dir
        self.keep = keep
        self.disk_every = disk_every
        self.timed = timed
        self.crash_hook = crash_hook
        self.files = model_files(model_dir)
        self.dtype = dtype
        """The dtype written (None: the model's own)."""

    async def _disk_copy(self, version: int, model: torch.nn.Module) -> Path:
        dest = write_model_dir(
            model, self.weights_dir / f"v{version}", self.crash_hook, self.files, self.dtype
        )
        await self.timed(self.records.record_disk_weights(version, str(dest.resolve())))
        prune(self.weights_dir, "v", self.keep)
        return dest

    async def publish(self, version: int, model: torch.nn.Module) -> int | None:
        dest: Path | None = None
        if version % self.disk_every == 0:
            dest = await self._disk_copy(version, model)
        if await self.sync.broadcast(version, model):
            await self.timed(
                self.records.publish_weights(
                    version, self.done_prefix + self.sync.group, self.done_fmt
                )
            )
            self.last_via = self.via
            return model_bytes(model, self.dtype)
        if dest is None:
            dest = await self._disk_copy(version, model)
        await self.timed(self.records.publish_weights(version, str(dest.resolve()), "safetensors"))
        self.last_via = "disk"
        return weight_bytes(dest)


class IpcPublisher(DistributedPublisher):
    """``weight_sync=ipc``: the trainer fills the servers of its host in memory
    (``weights.ipc.IpcSync``), with a disk copy every ``disk_every`` versions and whenever the
    transfer fails; a success is published as ``ipc-done`` (location: the target URLs)."""

    done_fmt = FMT_IPC_DONE
    done_prefix = "ipc:"
    via = "ipc"
