"""``trainer.parallel=fsdp``: the model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every rank holds ``1/world`` of each parameter, of its gradient and of its AdamW state (the
parameters are ``DTensor``s sharded on dim 0; the optimizer is plain ``torch.optim.AdamW`` over
them, so its state is sharded alike). Each transformer block (the classes the model lists in
``_no_split_modules``) is one FSDP unit and the root (embeddings, final norm, LM head; a tied
embedding and head stay one parameter) another: a block's full parameters exist only while it
runs, and gradients are reduce-scattered as each block's backward ends.

- **Precision.** On CUDA a ``MixedPrecisionPolicy``: parameters are all-gathered in bf16 for
  the forward and backward, gradients reduced in fp32 into the fp32 sharded master weights that
  AdamW updates (the trainer's bf16 autocast stays on and changes nothing for matmuls). On the
  CPU everything is fp32, as the DDP path is.
- **Micro-batches.** Gradients are reduce-scattered after every micro-batch's backward (DDP's
  ``no_sync`` is not used): holding the unsharded gradients until the last micro-batch would
  undo the sharding of gradient memory. Cost: one reduce-scatter per block per micro-batch.
- **Publication** (``full_weights``): every rank takes part in all-gathering one parameter at a
  time; rank 0 keeps each one as a host copy in the publish dtype. Rank 0 thus holds its own
  shard plus one full copy in the published dtype (bf16 on CUDA), never a second full copy; a
  device holds at most one unsharded parameter beyond its shards. The publishers
  (``weights.publish``) get ``FullWeights``, which answers what they ask of a model.
- **Checkpoints** (``checkpoint_tensors``, ``place_optimizer_state``): gathered, the same files
  as the DDP path (docs/trainer.md says why): rank 0 writes a servable ``model/`` and the full
  optimizer state; a restore loads them on every rank and keeps each rank's shard.

Runs under ``torchrun`` (every rank) or alone: without a process group, a one-rank group is
made (``ensure_process_group``) so that one GPU runs the same sharded code path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as td


def ensure_process_group(device: torch.device) -> None:
    """A one-rank process group when none exists (a trainer started without torchrun)."""
    if td.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    from torch._C._distributed_c10d import HashStore

    td.init_process_group(backend, store=HashStore(), rank=0, world_size=1)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (HF's ``_no_split_modules``: e.g. ``Qwen2DecoderLayer``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def shard_model(model: torch.nn.Module, device: torch.device) -> Any:
    """Shard ``model`` (an HF causal LM on the CPU or ``device``) over every rank, moving its
    shards to ``device``; returns the same module, now FSDP2-managed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (td.get_world_size(),))
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(
            f"trainer.parallel=fsdp: {type(model).__name__} names no repeated block class "
            "(_no_split_modules) to shard by"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _gather(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a sharded ``DTensor`` (a collective: every rank calls it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _gathered(
    named: Iterator[tuple[str, torch.Tensor]], *, keep: bool, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Gather each tensor in turn (every rank, same order); with ``keep`` a host copy of each
    (in ``dtype``, None: its own), the one full tensor on the device freed before the next.
    Tensors that are the same object (tied weights) are gathered and copied once."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for name, t in named:
        if id(t) in seen:
            if keep:
                out[name] = seen[id(t)]
            continue
        full = _gather(t.detach())
        if keep:
            full = full.to(dtype) if dtype is not None else full
            host = full.to("cpu", copy=True).contiguous()
            seen[id(t)] = out[name] = host
        else:
            seen[id(t)] = t
        del full
    return out


class FullWeights:
    """Rank 0's full copy of a sharded model's weights, handed to a publisher in place of the
    model: what ``weights.publish`` asks of a model (``state_dict``, ``named_parameters``,
    ``save_pretrained``, ``config``) answered from the gathered tensors."""

    def __init__(self, model: Any, tensors: dict[str, torch.Tensor], params: list[str]) -> None:
        self._model = model
        self._tensors = tensors
        self._params = params
        self.config = model.config

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, self._tensors[n]) for n in self._params)

    def save_pretrained(self, path: str, state_dict: Any = None, **kw: Any) -> None:
        sd = self._tensors if state_dict is None else state_dict
        self._model.save_pretrained(path, state_dict=sd, **kw)


def full_weights(model: Any, dtype: torch.dtype | None, rank: int) -> FullWeights | None:
    """Every rank: gather ``model``'s weights one parameter at a time; rank 0 gets them as
    ``FullWeights`` (host tensors in ``dtype``, None: fp32), the others None."""
    keep = rank == 0
    tensors = _gathered(iter(model.state_dict(keep_vars=True).items()), keep=keep, dtype=dtype)
    if not keep:
        return None
    names = [n for n, _ in model.named_parameters()]
    return FullWeights(model, tensors, names)


def checkpoint_tensors(
    model: Any, optimizer: torch.optim.Optimizer, rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Every rank: gather the fp32 master weights and the optimizer state, one tensor at a
    time; rank 0 gets ``(model state dict, optimizer state dict)`` as host tensors (the state
    dict's layout is ``optimizer.state_dict()``'s, with full tensors), the others None."""
    keep = rank == 0
    weights = _gathered(iter(model.state_dict(keep_vars=True).items()), keep=keep, dtype=None)
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for idx in sorted(sd["state"]):
        st = sd["state"][idx]
        tensors = {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
        full = _gathered(iter(tensors.items()), keep=keep, dtype=None)
        state[idx] = {**{k: v for k, v in st.items() if k not in tensors}, **full}
    if not keep:
        return None
    return weights, {"state": state, "param_groups": sd["param_groups"]}


def place_optimizer_state(sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state dict of full tensors (a gathered checkpoint's), with each state
    tensor that has its parameter's shape cut to this rank's shard of it, as the parameter is
    sharded; then ``optimizer.load_state_dict`` takes it. Scalars (AdamW's ``step``) as they
    are. No communication: every rank read the same full tensors."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        out = {}
        for k, v in st.items():
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape:
                v = distribute_tensor(
                    v.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                )
            out[k] = v
        state[int(idx)] = out
    return {"state": state, "param_groups": sd["param_groups"]}


def local_bytes(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state: the local shards
    of sharded tensors, whole tensors otherwise; a storage shared by several tensors once."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    seen: set[int] = set()

    def size(ts: list[torch.Tensor]) -> int:
        n = 0
        for t in ts:
            s = local(t).untyped_storage()
            if s.data_ptr() in seen or s.nbytes() == 0:
                continue
            seen.add(s.data_ptr())
            n += s.nbytes()
        return n

    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    opt = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return {"params": size(params), "grads": size(grads), "optimizer": size(opt)}
