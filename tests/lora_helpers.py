"""LoRA test helpers: random adapters over a tiny model, and the trainer's recomputation of
log-probs with a published adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def make_adapter(
    base: Path, rank: int, seed: int, targets: list[str] | None = None, std: float = 0.3
) -> Any:
    """A peft model on ``base`` whose adapter is random (B != 0: it changes the outputs)."""
    from inference.models import load_model
    from trainer.config import LoraConfig
    from trainer.lora import apply_lora

    torch.manual_seed(seed)
    m = apply_lora(
        load_model(base), LoraConfig(rank=rank, target_modules=targets or ["all-linear"])
    )
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, std)
    return m


def model_with_adapter(base: Path, adapter_dir: Path | None) -> Any:
    """The base model in float64, with the adapter published at ``adapter_dir`` loaded as the
    trainer loads one (``trainer.lora``); None: the base alone."""
    import json

    from safetensors.torch import load_file

    from inference.models import load_model
    from trainer.config import LoraConfig
    from trainer.lora import apply_lora, load_adapter_state

    model = load_model(base, dtype="float64")
    if adapter_dir is None:
        return model
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    lc = LoraConfig(rank=cfg["r"], alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
    model = apply_lora(model, lc)
    load_adapter_state(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    return model


def recompute(model: Any, prompt: list[int], output: list[int], t: float) -> np.ndarray:
    """``log_softmax(logits / T)`` of each output token by one unbatched forward."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits / t, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(output) - 1)
    return logp[pos, torch.tensor(output)].numpy()
