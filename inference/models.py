"""Tiny random-init causal LMs for tests, demos and benchmarks, and a safetensors-only loader.

``init_tiny_model`` writes a Hugging Face model directory (``config.json``,
``model.safetensors``, ``generation_config.json``) that transformers loads with
``AutoModelForCausalLM.from_pretrained`` and SGLang serves with ``--skip-tokenizer-init``
(token ids in, token ids out: no tokenizer files are needed or written).
``init_tiny_text_model`` adds a character-level tokenizer with a chat template (text tasks).

Invariants:
- The same arguments (seed included) write bit-identical weights.
- Weights are only ever read from ``*.safetensors``; ``load_model`` refuses a directory whose
  weights are pickles (``pytorch_model.bin``, ``*.pt``) rather than unpickling them.
- A trainer checkpoint (``RUN_DIR/checkpoints/step-N``, whose ``model/`` subdirectory is the
  HF directory) is accepted wherever a model directory is: ``resolve_model_dir`` turns it into
  its ``model/`` subdirectory (with one log line) and every function here resolves first.
- Special ids: ``pad=0, bos=1, eos=2`` unless given; every built-in task uses the same layout
  (``rollout_workers.tasks``), so a model made for a task's ``vocab_size`` stops on its EOS.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("sluice.model")

ARCHS = ("llama", "qwen2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class ModelDirError(FileNotFoundError):
    """A model directory that is missing, incomplete, or holds weights we refuse to load."""


def _build_config(
    arch: str,
    *,
    vocab: int,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    max_positions: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Any:
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    from transformers import Qwen2Config

    return Qwen2Config(use_sliding_window=False, **common)


def _check_dims(
    *,
    vocab: int,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    max_positions: int,
    special: dict[str, int],
) -> None:
    """Raise ``ValueError`` naming the first size or special id a model cannot have."""
    for name, value, low in (
        ("vocab", vocab, 2),
        ("layers", layers, 1),
        ("hidden", hidden, 2),
        ("heads", heads, 1),
        ("kv_heads", kv_heads, 1),
        ("intermediate", intermediate, 1),
        ("max_positions", max_positions, 2),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    if (hidden // heads) % 2:
        raise ValueError(f"head_dim = hidden / heads = {hidden // heads} must be even (RoPE)")
    for name, value in special.items():
        if not 0 <= value < vocab:
            raise ValueError(f"{name}_token_id {value} is outside the vocabulary [0, {vocab})")


def init_tiny_model(
    directory: str | Path,
    *,
    vocab: int,
    layers: int,
    hidden: int,
    arch: str = "llama",
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 4096,
    seed: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
    init_std: float = 0.02,
) -> Path:
    """Write a random-init float32 ``arch`` model to ``directory`` and return its path.

    ``heads`` defaults to ``max(1, hidden // 64)`` (head_dim 64, which GPU attention kernels
    support); ``kv_heads`` to ``heads``; ``intermediate`` to ``4 * hidden``. The special ids
    must lie inside the vocabulary. ``init_std`` is the normal init's standard deviation
    (0.02, as transformers; larger gives peakier, more input-dependent next-token
    distributions, which makes log-prob tests sharper).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    heads = heads if heads is not None else max(1, hidden // 64)
    kv_heads = kv_heads if kv_heads is not None else heads
    intermediate = intermediate if intermediate is not None else 4 * hidden
    _check_dims(
        vocab=vocab,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        max_positions=max_positions,
        special={"bos": bos_token_id, "eos": eos_token_id, "pad": pad_token_id},
    )

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = _build_config(
        arch,
        vocab=vocab,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        max_positions=max_positions,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if not init_std > 0:
        raise ValueError(f"init_std must be > 0, got {init_std}")
    config.initializer_range = float(init_std)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cpu_rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    finally:
        torch.random.set_rng_state(cpu_rng)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    model.config.architectures = [type(model).__name__]
    save_weights(model, out)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


def init_tiny_text_model(
    directory: str | Path,
    *,
    alphabet: str | None = None,
    chat_template: str = "chatml",
    **model_args: Any,
) -> Path:
    """A tiny random-init model with a character-level tokenizer and a chat template
    (``inference.tokenizer.build_char_tokenizer``; ``chat_template`` names one of
    ``CHAT_TEMPLATES``: chatml or compact) in ``directory``: the vocabulary is the
    tokenizer's, BOS/EOS/PAD its ``<s>``/``<|im_end|>``/``<pad>``. ``model_args`` go to
    ``init_tiny_model`` (layers, hidden, heads, arch, seed, ...)."""
    from inference.tokenizer import CHAT_TEMPLATES, DEFAULT_ALPHABET, build_char_tokenizer

    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(
            f"chat_template must be one of {sorted(CHAT_TEMPLATES)}, got {chat_template!r}"
        )
    tok = build_char_tokenizer(
        directory,
        alphabet=alphabet or DEFAULT_ALPHABET,
        chat_template=CHAT_TEMPLATES[chat_template],
    )
    return init_tiny_model(
        directory,
        vocab=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **model_args,
    )


def save_weights(model: Any, directory: str | Path) -> Path:
    """Write ``model``'s weights as ``directory/model.safetensors`` (contiguous float tensors)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    path = out / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path


_resolved_logged: set[Path] = set()


def resolve_model_dir(directory: str | Path) -> Path:
    """The HF model directory ``directory`` stands for: itself, or, for a directory without
    ``config.json`` whose ``model/`` subdirectory has one (a trainer checkpoint
    ``RUN_DIR/checkpoints/step-N``), that subdirectory, logged once per path. Checks nothing
    else (``check_model_dir`` does)."""
    d = Path(directory)
    sub = d / "model"
    if not (d / "config.json").is_file() and (sub / "config.json").is_file():
        if d not in _resolved_logged:
            _resolved_logged.add(d)
            what = "a trainer checkpoint" if (d / "state.json").is_file() else "a directory"
            log.info("model path %s is %s: using its model directory %s", d, what, sub)
        return sub
    return d


def check_model_dir(directory: str | Path) -> list[Path]:
    """The safetensors files of a model directory (or of a checkpoint's ``model/``:
    ``resolve_model_dir``); ``ModelDirError`` naming what is wrong."""
    d = resolve_model_dir(directory)
    if not d.is_dir():
        raise ModelDirError(f"model directory {d} does not exist")
    if not (d / "config.json").is_file():
        if (d / "adapter_config.json").is_file() or (d / "adapter").is_dir():
            raise ModelDirError(
                f"{d} holds a LoRA adapter, not a model: give the base model as model.path "
                "(a LoRA run's weights/vN and checkpoint adapter/ load over it)"
            )
        raise ModelDirError(f"model directory {d} has no config.json")
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelDirError(
                f"model directory {d} holds pickled weights ({', '.join(pickles)}) but no "
                "*.safetensors: sluice loads weights only from safetensors (convert them first)"
            )
        raise ModelDirError(f"model directory {d} has no *.safetensors weights")
    return shards


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict."""
    check_model_dir(directory)
    return dict(json.loads((resolve_model_dir(directory) / "config.json").read_text()))


def eos_token_ids(directory: str | Path) -> list[int]:
    """EOS ids: ``generation_config.json`` if present, else ``config.json``; [] if neither has one."""
    d = resolve_model_dir(directory)
    for name in ("generation_config.json", "config.json"):
        p = d / name
        if p.is_file():
            eos = json.loads(p.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's safetensors shards (refuses pickles)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in check_model_dir(directory):
        if shard.name.endswith(".index.json"):
            continue
        state.update(load_file(str(shard)))
    return state


def load_model(directory: str | Path, *, dtype: str = "float32") -> Any:
    """A transformers causal LM from ``directory`` in eval mode, loaded only from safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_dir(directory)
    model = AutoModelForCausalLM.from_pretrained(
        str(resolve_model_dir(directory)), dtype=getattr(torch, dtype), use_safetensors=True
    )
    model.eval()  # type: ignore[no-untyped-call]
    return model
