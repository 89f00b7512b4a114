"""LoRA adapters as weight publications: the trainer publishes only the adapter of each version.

With ``trainer.lora`` the base model never changes; each version ``N`` is written as
``weights_dir/v{N}``, an adapter directory as PEFT writes it (``adapter_model.safetensors`` +
``adapter_config.json``), atomically (temp dir + fsync + rename, as full weights), and
published with ``publish_weights(N, path, FMT_LORA)``. Workers load it on their servers with
``/load_lora_adapter`` under ``inference.lora.adapter_name(N)``, switch their requests to it,
and unload the previous adapter once no request of theirs uses it
(``weights.receive.LoraReceiver``, ``rollout_workers.updater``).

Invariants (tests/unit/weights/test_weights_lora.py): a published directory holds exactly the
adapter's tensors (no base weight), in the published dtype, and loads back to the same values;
a crash before the rename leaves no ``v{N}``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from weights.disk import fsync_dir, prune, replace_dir
from weights.plan import FMT_LORA

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _raw(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a ``peft`` model by their file names
    (``base_model.model.<module>.lora_A.weight`` ...), detached, not copied."""
    from peft import get_peft_model_state_dict

    # Never the base's embedding or output matrices (peft adds them for an adapter on lm_head
    # unless told not to): the adapter file holds adapter tensors only.
    state = get_peft_model_state_dict(_raw(model), save_embedding_layers=False)
    return {k: v.detach() for k, v in state.items()}


def adapter_config(model: Any) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` (PEFT's format), JSON-able, with the target modules
    resolved to the names that matched (``all-linear`` becomes ``q_proj``, ``k_proj``, ...)."""
    cfg = _raw(model).peft_config["default"].to_dict()
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, set | frozenset):
            v = sorted(v)
        elif hasattr(v, "value"):  # enums (task_type, peft_type)
            v = v.value
        out[k] = v
    return out


def tensor_bytes(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes of ``tensors`` stored in ``dtype`` (None: their own)."""
    return sum(
        t.numel()
        * (t.element_size() if dtype is None else torch.empty((), dtype=dtype).element_size())
        for t in tensors.values()
    )


def write_adapter_files(
    dest: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """``dest/adapter_model.safetensors`` and ``dest/adapter_config.json`` (``dest`` created)."""
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / ADAPTER_WEIGHTS))
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_adapter_dir(
    model: Any,
    dest: str | Path,
    crash_hook: Callable[[str], None] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model``'s adapter as a PEFT adapter directory at ``dest``, atomically; in
    ``dtype`` (None: as the adapter is). Returns ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tensors = adapter_tensors(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    write_adapter_files(tmp, tensors, adapter_config(model))
    fsync_dir(tmp)
    if crash_hook is not None:
        crash_hook("mid_publish")
    replace_dir(tmp, dest)
    return dest


class LoraPublisher:
    """``trainer.lora`` with ``weight_sync=disk``: every version as the adapter directory
    ``weights_dir/v{N}`` (the newest ``keep`` kept), published as ``FMT_LORA``. ``publish``
    returns the bytes of the adapter written (the update's size)."""

    last_via = "lora"

    def __init__(
        self,
        records: Any,
        weights_dir: Path,
        *,
        keep: int,
        timed: Any = None,
        crash_hook: Callable[[str], None] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        from weights.publish import untimed

        self.records = records
        self.weights_dir = weights_dir
        self.keep = keep
        self.timed = timed if timed is not None else untimed
        self.crash_hook = crash_hook
        self.dtype = dtype

    async def publish(self, version: int, model: torch.nn.Module) -> int:
        dest = write_adapter_dir(
            model, self.weights_dir / f"v{version}", self.crash_hook, self.dtype
        )
        await self.timed(self.records.publish_weights(version, str(dest.resolve()), FMT_LORA))
        prune(self.weights_dir, "v", self.keep)
        return (dest / ADAPTER_WEIGHTS).stat().st_size
