"""ipc weight sync, trainer side (rank 0): hand the weights to servers on this host in memory.

SGLang's ``POST /update_weights_from_tensor`` takes, per TP rank, a base64 ``ForkingPickler``
dump of ``[(name, tensor)]``: CUDA IPC handles when the tensors are on a GPU (torch's own
reduction), so a server on the same GPU copies them device to device; on the CPU (the CPU
reference server) memory-backed files that the receiver maps by name (``Handover`` says why
not torch's CPU reduction). The sender keeps the tensors alive until the call returns. Protocol, per published version ``N``
(docs/weight-sync.md):

1. **Targets**: the servers registered with kind ``ipc`` (a worker registers only servers it
   launched itself, with its host name) whose worker's heartbeat is alive, whose host is this
   host and whose URL is a local address. None: return False (the caller falls back to disk).
2. **Announce** ``N`` (``VersionManager.announce_weights(N, IpcPlan, "ipc")``): each target's
   worker holds the server's new requests (``weights.receive.IpcReceiver``) and acknowledges
   (``ack_sync``); rank 0 waits for every target's acknowledgement (``timeout_s``).
3. **Send** bucket by bucket (``bucket_mb`` MiB in the sent dtype, ``named_parameters()``
   order): a copy of the bucket's parameters (in ``dtype``: bf16 on the GPU), one payload, one
   call per server, all servers at once; ``abort_all_requests`` on the first call (in-flight
   requests come back partial, labelled with the old version, and are resubmitted by the
   worker, which holds them), ``weight_version = N`` and ``flush_cache`` on the last only (the
   label moves with the last bucket). The copy is dropped once every call returned: the extra
   memory is one bucket.
4. The caller then **publishes** ``N`` (fmt ``ipc-done``); the worker sees its server at ``N``
   and lets requests through again.

Any failure (no target, a missing acknowledgement, a call that fails or times out, Redis)
returns False: the caller writes the disk copy and publishes ``N`` from it, which the held
workers load. The payload is a pickle the server executes: it goes only to servers registered
as launched on this host, with the admin key, never through Redis or the trajectory path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import ipaddress
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from redis.exceptions import RedisError

from inference.client import SGLangClient
from inference.protocol import SGLangClientError
from weights.plan import FMT_IPC_ANNOUNCE, IpcPlan

log = logging.getLogger("sluice.weights.ipc")


@functools.cache
def local_host_names() -> frozenset[str]:
    """This machine's name and the addresses it resolves to (what a local server URL may
    name besides a loopback address)."""
    names = {"localhost", socket.gethostname()}
    with contextlib.suppress(OSError):
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    return frozenset(names)


def is_local_url(url: str, names: frozenset[str] | None = None) -> bool:
    """True when ``url``'s host is a loopback address or one of this machine's names."""
    host = urlsplit(url).hostname or ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    return host in (names if names is not None else local_host_names())


def plan_buckets(
    named: list[tuple[str, torch.Tensor]], bucket_mb: float, dtype: torch.dtype | None = None
) -> list[dict[str, list[Any]]]:
    """Split ``named`` (in order) into buckets of at most ``bucket_mb`` MiB counted in the sent
    dtype (``dtype``, or each tensor's own); a larger tensor gets a bucket of its own.
    Concatenating the buckets' names gives back ``named``'s names."""
    limit = bucket_mb * 1024 * 1024
    buckets: list[dict[str, list[Any]]] = []
    cur: dict[str, list[Any]] = {"names": [], "dtypes": [], "shapes": []}
    size = 0
    for name, t in named:
        dt = dtype or t.dtype
        n = t.numel() * dt.itemsize
        if cur["names"] and size + n > limit:
            buckets.append(cur)
            cur, size = {"names": [], "dtypes": [], "shapes": []}, 0
        cur["names"].append(name)
        cur["dtypes"].append(str(dt).removeprefix("torch."))
        cur["shapes"].append(list(t.shape))
        size += n
    if cur["names"]:
        buckets.append(cur)
    return buckets


SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
"""Where CPU tensors are handed over: memory-backed files (RAM, not disk, on Linux)."""


class _ShmFile:
    """A CPU tensor's bytes in a file of ``SHM_DIR``; pickles as the receiver's read-only
    mapping of it, ``torch.from_file(path, shared=False, size, dtype=...)`` (public torch
    functions only: any torch process unpickles it)."""

    def __init__(self, path: Path, numel: int, dtype: torch.dtype) -> None:
        self.path, self.numel, self.dtype = path, numel, dtype

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial(torch.from_file, dtype=self.dtype), (
            str(self.path),
            False,
            self.numel,
        )


class Handover:
    """One bucket as SGLang's payload (``payload``): base64 of a ``ForkingPickler`` dump of
    ``[(name, tensor)]``. CUDA tensors go as CUDA IPC handles (torch's own reduction);
    CPU tensors as memory-backed files that the receiver maps. Keep the object until the call
    returned, then ``close()`` (drops the tensors, removes the files; a receiver that still
    maps one keeps its pages).

    Why not torch's CPU reduction: its ``file_descriptor`` strategy passes descriptors only to
    this process's children, and its ``file_system`` strategy (which works across independent
    processes) starts a ``torch_shm_manager`` daemon that lives as long as any receiver that
    ever mapped a tensor, holding this process's stdout/stderr open (a trainer's pipe never
    closes while its servers run)."""

    _count = 0

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        from multiprocessing.reduction import ForkingPickler

        from torch.multiprocessing.reductions import reduce_tensor

        self.tensors = named
        self.files: list[Path] = []

        def reduce(t: torch.Tensor) -> Any:
            if t.is_cuda:
                return reduce_tensor(t)  # type: ignore[no-untyped-call]
            c = t.contiguous()
            return torch.as_strided, (self._to_file(c), tuple(c.shape), tuple(c.stride()), 0)

        buf = io.BytesIO()
        pickler = ForkingPickler(buf)
        pickler.dispatch_table[torch.Tensor] = reduce
        try:
            pickler.dump(named)
        except BaseException:
            self.close()
            raise
        self.payload = base64.b64encode(buf.getvalue()).decode("ascii")

    def _to_file(self, t: torch.Tensor) -> _ShmFile:
        Handover._count += 1
        path = SHM_DIR / f"sluice-ipc-{os.getpid()}-{Handover._count}"
        self.files.append(path)
        n = t.numel()
        dst = torch.from_file(str(path), shared=True, size=n, dtype=t.dtype)
        dst.copy_(t.view(-1))
        del dst
        return _ShmFile(path, n, t.dtype)

    def close(self) -> None:
        self.tensors = []
        for f in self.files:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        self.files = []


def bucket_copy(
    params: dict[str, torch.Tensor], names: list[str], dtype: torch.dtype | None
) -> list[tuple[str, torch.Tensor]]:
    """The named parameters in ``dtype``, ready to be read by another process (the device's
    work finished): a copy on a GPU (the model itself is untouched); on the CPU a tensor of
    the parameter's own dtype is passed as is, since ``Handover`` copies it into its file."""
    out = [
        (n, params[n].detach().to(dtype or params[n].dtype, copy=params[n].is_cuda)) for n in names
    ]
    if any(t.is_cuda for _, t in out):
        torch.cuda.synchronize()
    return out


async def send_buckets(
    clients: list[tuple[SGLangClient, int]],
    params: dict[str, torch.Tensor],
    buckets: list[dict[str, list[Any]]],
    version: int,
    *,
    dtype: torch.dtype | None,
    timeout_s: float,
) -> None:
    """Every bucket to every ``(client, tp_size)``, in order (see the module doc, step 3);
    raises the first client error once every call of that bucket has returned."""
    last = len(buckets) - 1
    for i, b in enumerate(buckets):
        hand = Handover(bucket_copy(params, list(b["names"]), dtype))
        results = await asyncio.gather(
            *(
                c.update_weights_from_tensor(
                    [hand.payload] * tp,
                    version if i == last else None,
                    flush_cache=i == last,
                    abort_all_requests=i == 0,
                    timeout=timeout_s,
                )
                for c, tp in clients
            ),
            return_exceptions=True,
        )
        # Every call has returned (or timed out: a receiver that still maps a file keeps its
        # pages, and torch keeps a CUDA IPC block while a receiver holds it): the copy can go.
        hand.close()
        for r in results:
            if isinstance(r, BaseException):
                raise r


class IpcSync:
    """Rank 0's end of the ipc weight sync; one per trainer process (see the module doc)."""

    def __init__(
        self,
        vm: Any,
        *,
        bucket_mb: int = 256,
        timeout_s: float = 60.0,
        admin_api_key: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.vm = vm
        self.bucket_mb = bucket_mb
        self.timeout_s = timeout_s
        self.admin_api_key = admin_api_key
        self.dtype = dtype
        """The dtype sent (None: the parameters' own)."""
        self.servers: list[str] = []
        """The targets of the last transfer."""
        self.last_s = 0.0
        """Seconds the last ``broadcast`` took (announce to last call returned)."""

    @property
    def group(self) -> str:
        """The targets of the last transfer, for the done publication's location."""
        return ",".join(self.servers) or "none"

    async def targets(self) -> dict[str, int]:
        """Registered ipc servers on this host whose worker is alive: URL -> TP ranks."""
        reg = await self.vm.sync_server_records("ipc")
        snap = await self.vm.snapshot()
        alive = {w.id for w in snap.workers if w.alive}
        here, names = socket.gethostname(), local_host_names()
        out = {}
        for url, rec in sorted(reg.items()):
            if rec.worker not in alive:
                continue
            if rec.host != here or not is_local_url(url, names):
                log.warning(
                    "ipc weight sync: server %s (host %s) is not on this host (%s): skipped",
                    url,
                    rec.host,
                    here,
                )
                continue
            out[url] = rec.tp
        return out

    async def broadcast(self, version: int, model: torch.nn.Module) -> bool:
        """Announce ``version``, wait for the workers to hold their servers, send every bucket;
        True if every server took every bucket (the caller then publishes), False otherwise
        (the caller falls back to disk)."""
        t0 = time.monotonic()
        try:
            targets = await self.targets()
        except (RedisError, RuntimeError) as e:  # the fallback says whether Redis is gone
            log.warning("ipc weight sync v%d: cannot read the targets: %s", version, e)
            return False
        self.servers = list(targets)
        if not targets:
            log.info("ipc weight sync v%d: no server registered; falling back to disk", version)
            return False
        raw: Any = model.module if hasattr(model, "module") else model
        named: list[tuple[str, torch.Tensor]] = list(raw.named_parameters())
        plan = IpcPlan(
            version=version,
            servers=list(targets),
            buckets=plan_buckets(named, self.bucket_mb, self.dtype),
            timeout_s=self.timeout_s,
        )
        try:
            await self.vm.announce_weights(version, plan.to_json(), FMT_IPC_ANNOUNCE)
            acked = await self.vm.wait_sync_acks(version, set(targets), self.timeout_s)
            if acked != set(targets):
                log.warning(
                    "ipc weight sync v%d: no acknowledgement from %s within %.0fs",
                    version,
                    ", ".join(sorted(set(targets) - acked)),
                    self.timeout_s,
                )
                return False
            clients = [
                SGLangClient(u, admin_api_key=self.admin_api_key, validate_ids=False)
                for u in targets
            ]
            try:
                await send_buckets(
                    list(zip(clients, targets.values(), strict=True)),
                    dict(named),
                    plan.buckets,
                    version,
                    dtype=self.dtype,
                    timeout_s=self.timeout_s,
                )
            finally:
                for c in clients:
                    await c.close()
        except (SGLangClientError, RedisError, ValueError, OSError, RuntimeError) as e:
            log.warning("ipc weight sync v%d failed: %s", version, e)
            return False
        self.last_s = time.monotonic() - t0
        log.info(
            "ipc weight sync v%d: %d tensors in %d bucket(s) to %d server(s) in %.3fs",
            version,
            len(named),
            len(plan.buckets),
            len(targets),
            self.last_s,
        )
        return True
