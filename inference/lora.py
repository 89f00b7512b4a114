"""LoRA adapters on the inference servers: how an adapter of version ``N`` is named.

A trainer with ``trainer.lora`` publishes each version as an adapter; a worker loads it on its
servers under the name ``adapter_name(N)`` (``/load_lora_adapter``) and its requests name it
(``lora_path``). A request that names an adapter runs entirely with it (SGLang and the CPU
server refuse a name that is not loaded), so the version of every token of its answer is the
adapter's, ``adapter_version(name)`` (``inference.client.SGLangClient.generate``).
"""

from __future__ import annotations

import re

PREFIX = "sluice-v"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)$")


def adapter_name(version: int) -> str:
    """The name a server knows the adapter of ``version`` by: ``sluice-v{version}``."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"an adapter version is an int >= 1, got {version!r}")
    return f"{PREFIX}{version}"


def adapter_version(name: str) -> int:
    """The version of the adapter named ``name`` (``ValueError`` for another name)."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not an adapter name of sluice ({PREFIX}N)")
    return int(m.group(1))


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a llama/qwen2 decoder layer: ``all-linear`` beside other names."""


def lora_server_args(max_rank: int, target_modules: list[str]) -> list[str]:
    """The server flags that enable adapters of rank <= ``max_rank`` on ``target_modules``
    (SGLang's and the CPU server's): ``--enable-lora --max-lora-rank R
    --lora-target-modules M...``; ``all-linear`` alone is SGLang's ``all``, beside other names
    (``lm_head``) it is spelled out as ``ALL_LINEAR``."""
    mods = list(target_modules)
    if mods == ["all-linear"]:
        mods = ["all"]
    elif "all-linear" in mods:  # SGLang's "all" stands alone: name the projections
        mods = [*ALL_LINEAR, *(m for m in mods if m != "all-linear" and m not in ALL_LINEAR)]
    return [
        "--enable-lora",
        "--max-lora-rank",
        str(max_rank),
        "--lora-target-modules",
        *mods,
    ]
