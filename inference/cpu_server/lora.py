"""LoRA adapters in the CPU reference server, as SGLang serves them (``--enable-lora``).

Adapters are loaded by name (``/load_lora_adapter`` from a PEFT directory,
``/load_lora_adapter_from_tensors`` from a hand-over payload) and dropped by name
(``/unload_lora_adapter``); a ``/generate`` request names its adapter with ``lora_path`` (a
loaded name; none: the base model). Rows of one running batch may name different adapters.

How: a forward hook on every target linear layer adds, for the rows that name an adapter with
weights for that layer, ``linear(linear(x, A), B) * scale`` to the layer's output, where
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``): the same operations,
in the same order, as ``peft``'s LoRA layer with dropout off, so a sample's log-probs equal the
trainer's recomputation with that adapter (tests/integration/test_lora_cpu_server.py).

Invariants (tests/unit/inference/test_cpu_server_lora.py): a load checks every tensor's
module, shape and rank (``<= --max-lora-rank``) and the target modules before anything is
kept (all or nothing); a name already loaded is refused, as SGLang does; the base model's
weights are never changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PEFT_PREFIX = "base_model.model."


class LoraRefused(ValueError):
    """An adapter that cannot be loaded; the message says why (answered 400)."""


@dataclass
class Adapter:
    name: str
    path: str
    """Where it was loaded from (``__tensor__`` for a tensor hand-over, as SGLang says)."""
    rank: int
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Module name -> (A [r, in], B [out, r]), in the model's dtype."""


def adapter_from_files(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(``adapter_config.json``, tensors) of a PEFT adapter directory (safetensors only)."""
    from safetensors.torch import load_file

    d = Path(path)
    cfg, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg.is_file() or not weights.is_file():
        raise LoraRefused(
            f"{path} is not a LoRA adapter directory (needs adapter_config.json and "
            "adapter_model.safetensors)"
        )
    try:
        config = json.loads(cfg.read_text())
    except ValueError as e:
        raise LoraRefused(f"{cfg}: {e}") from None
    return config, load_file(str(weights))


class AdapterSet:
    """The adapters one engine serves and the hooks that apply them. Not thread-safe: the
    server calls it between engine steps (under the scheduler's lock)."""

    def __init__(self, model: torch.nn.Module, max_rank: int, targets: list[str] | None) -> None:
        self.model = model
        self.max_rank = max_rank
        self.targets = None if targets is None or "all" in targets else set(targets)
        """Module name suffixes adapters may touch (None: every linear layer)."""
        self.adapters: dict[str, Adapter] = {}
        self.rows: list[str | None] = []
        """The adapter of each row of the forward being run (set by the engine)."""
        self._modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self._hooked: dict[str, Any] = {}

    def loaded(self) -> dict[str, str]:
        """Name -> path of every loaded adapter (SGLang's ``loaded_adapters``)."""
        return {a.name: a.path for a in self.adapters.values()}

    def load(
        self, name: str, path: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> None:
        """Check then keep the adapter ``name`` (``LoraRefused`` naming the problem)."""
        if not name:
            raise LoraRefused("lora_name is empty")
        if name in self.adapters:
            raise LoraRefused(f"The LoRA adapter with the name {name} already exists.")
        rank = config.get("r")
        alpha = config.get("lora_alpha")
        if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
            raise LoraRefused(f"adapter {name}: adapter_config needs r >= 1 and lora_alpha")
        if rank > self.max_rank:
            raise LoraRefused(
                f"LoRA adapter {name} has rank {rank}, above the server's --max-lora-rank "
                f"{self.max_rank}"
            )
        if config.get("use_dora"):
            raise LoraRefused(f"adapter {name}: DoRA is not supported")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weights: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            module, part = _split(key)
            weights.setdefault(module, {})[part] = t
        kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        dtype = next(self.model.parameters()).dtype
        for module, parts in sorted(weights.items()):
            lin = self._modules.get(module)
            if lin is None:
                raise LoraRefused(f"adapter {name}: {module} is not a linear layer of the model")
            if self.targets is not None and module.rsplit(".", 1)[-1] not in self.targets:
                raise LoraRefused(
                    f"adapter {name}: {module} is not in the server's --lora-target-modules "
                    f"{sorted(self.targets)}"
                )
            if set(parts) != {"lora_A", "lora_B"}:
                raise LoraRefused(f"adapter {name}: {module} needs lora_A and lora_B weights")
            a, b = parts["lora_A"], parts["lora_B"]
            if tuple(a.shape) != (rank, lin.in_features) or tuple(b.shape) != (
                lin.out_features,
                rank,
            ):
                raise LoraRefused(
                    f"adapter {name}: {module} has A {list(a.shape)} and B {list(b.shape)}, "
                    f"expected [{rank}, {lin.in_features}] and [{lin.out_features}, {rank}]"
                )
            kept[module] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
        if not kept:
            raise LoraRefused(f"adapter {name} holds no LoRA weights")
        for module in kept:
            if module not in self._hooked:
                self._hooked[module] = self._modules[module].register_forward_hook(
                    self._hook(module)
                )
        self.adapters[name] = Adapter(name, path, rank, float(scale), kept)

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise LoraRefused(f"LoRA adapter {name} is not loaded")
        del self.adapters[name]

    def _hook(self, module: str) -> Any:
        def add_lora(mod: torch.nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> Any:
            rows = self.rows
            if not any(rows):
                return None
            x = inputs[0]
            for name, idx in _groups(rows):
                ad = self.adapters.get(name)
                if ad is None:  # never run a row without the adapter it names
                    raise RuntimeError(f"LoRA adapter {name!r} is not loaded")
                if module not in ad.weights:
                    continue
                a, b = ad.weights[module]
                if len(idx) == len(rows):
                    out = out + F.linear(F.linear(x, a), b) * ad.scale
                else:
                    sel = torch.tensor(idx, dtype=torch.long, device=x.device)
                    xs = x.index_select(0, sel)
                    out = out.index_copy(
                        0, sel, out.index_select(0, sel) + F.linear(F.linear(xs, a), b) * ad.scale
                    )
            return out

        return add_lora


def _split(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (``<module>``, ``lora_A``)."""
    k = key.removeprefix(PEFT_PREFIX)
    for part in ("lora_A", "lora_B"):
        tail = f".{part}.weight"
        if k.endswith(tail):
            return k[: -len(tail)], part
        tail = f".{part}.default.weight"
        if k.endswith(tail):
            return k[: -len(tail)], part
    raise LoraRefused(f"{key} is not a LoRA weight (expected ...lora_A.weight / lora_B.weight)")


def _groups(rows: list[str | None]) -> Iterator[tuple[str, list[int]]]:
    """Each adapter named in ``rows`` with the indices of its rows."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(rows):
        if name is not None:
            out.setdefault(name, []).append(i)
    yield from out.items()
