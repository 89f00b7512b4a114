"""LoRA on the trainer's model (``trainer.lora``, ``peft``): wrap the base model, read and
restore the adapter, and the adapter's dropout.

With ``trainer.lora.rank > 0`` the base model's weights are frozen; ``peft`` adds a pair
``lora_A [r, in]`` / ``lora_B [out, r]`` to every target linear layer (B starts at zero, so
version 0 is exactly the base model), and the layer computes
``base(x) + lora_B(lora_A(dropout(x))) * alpha / r``. Only the adapter's parameters require
gradients, so ``trainer.model.build_optimizer`` (which takes the trainable ones) holds AdamW
state for the adapter only, and checkpoints and publications carry only the adapter
(``trainer.checkpoint``, ``weights.lora``).

Invariants (tests/unit/trainer/test_trainer_lora.py):
- A freshly wrapped model computes the base model's logits exactly.
- ``adapter_state`` -> ``load_adapter_state`` into a fresh wrap gives the same logits.
- The dropout is active only inside ``adapter_dropout`` (the gradient pass); every other
  forward (the proximal recompute, the rollout-trainer gap) runs without it, as the servers do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from trainer.config import LoraConfig, TrainerError


def apply_lora(model: Any, cfg: LoraConfig) -> Any:
    """``model`` (an HF causal LM) wrapped by ``peft`` with a fresh adapter; the base
    weights frozen, the model in ``eval()`` mode (no dropout outside ``adapter_dropout``)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: str | list[str] = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    elif "all-linear" in targets:  # all-linear plus others (e.g. the output head, lm_head)
        targets = sorted(set(linear_names(model)) | (set(targets) - {"all-linear"}))
    pcfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.scale_alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = get_peft_model(model, pcfg)
    except ValueError as e:  # no module matched target_modules
        raise TrainerError(f"trainer.lora.target_modules={cfg.target_modules}: {e}") from None
    wrapped.eval()
    return wrapped


def linear_names(model: Any) -> list[str]:
    """The names (last component) of ``model``'s linear layers but the output head: what
    ``all-linear`` selects."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head
        }
    )


def is_lora(model: Any) -> bool:
    """True for a model wrapped by ``apply_lora`` (under DDP too)."""
    raw = model.module if hasattr(model, "module") else model
    return hasattr(raw, "peft_config")


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their PEFT file names (``weights.lora.adapter_tensors``)."""
    from weights.lora import adapter_tensors

    return adapter_tensors(model)


def adapter_config(model: Any) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` (``weights.lora.adapter_config``)."""
    from weights.lora import adapter_config as config

    return config(model)


def load_adapter_state(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (``adapter_state``'s names) into ``model``'s adapter; every adapter
    tensor must be present with its shape (``TrainerError`` otherwise)."""
    from peft import set_peft_model_state_dict

    own = adapter_state(model)
    missing = sorted(set(own) - set(tensors))
    unknown = sorted(set(tensors) - set(own))
    if missing or unknown:
        raise TrainerError(
            f"the checkpoint's adapter does not fit trainer.lora: missing {missing[:3]}, "
            f"unknown {unknown[:3]} (was it written with other rank/target_modules?)"
        )
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise TrainerError(
                f"the checkpoint's adapter tensor {k} has shape {list(t.shape)}, trainer.lora "
                f"makes {list(own[k].shape)} (was it written with another rank?)"
            )
    raw = model.module if hasattr(model, "module") else model
    result = set_peft_model_state_dict(raw, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise TrainerError(f"adapter tensors not loaded: {unexpected[:3]}")


@contextlib.contextmanager
def adapter_dropout(model: Any) -> Iterator[None]:
    """The adapter's dropout modules in training mode for the body (the gradient pass);
    back in ``eval()`` afterwards. A no-op for a model without LoRA or with dropout 0."""
    raw = model.module if hasattr(model, "module") else model
    if not hasattr(raw, "peft_config"):
        yield
        return
    mods = [
        m
        for name, m in raw.named_modules()
        if name.rsplit(".", 2)[-2:-1] == ["lora_dropout"] and isinstance(m, torch.nn.Dropout)
    ]
    for m in mods:
        m.train()
    try:
        yield
    finally:
        for m in mods:
            m.eval()
