"""inference/lora.py: adapter names and versions, and the LoRA server flags the command
builders add (inference/launch.py)."""

from __future__ import annotations

import pytest

from inference.launch import cpu_server_command, sglang_command
from inference.lora import adapter_name, adapter_version, lora_server_args


def test_adapter_names_round_trip_and_refuse_others() -> None:
    assert adapter_name(7) == "sluice-v7" and adapter_version("sluice-v7") == 7
    for bad in ("v7", "sluice-v", "sluice-v7x", "other-v7"):
        with pytest.raises(ValueError, match="not an adapter name"):
            adapter_version(bad)
    for v in (0, -1, True):
        with pytest.raises(ValueError):
            adapter_name(v)


def test_server_flags() -> None:
    assert lora_server_args(16, ["all-linear"]) == [
        "--enable-lora", "--max-lora-rank", "16", "--lora-target-modules", "all",
    ]  # fmt: skip
    # SGLang's "all" stands alone: beside lm_head the projections are spelled out
    assert lora_server_args(8, ["all-linear", "lm_head"])[4:] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
    ]  # fmt: skip
    assert lora_server_args(4, ["q_proj", "v_proj"])[4:] == ["q_proj", "v_proj"]


def test_command_builders_add_the_flags_only_with_lora() -> None:
    plain = sglang_command("/m", 30000)
    assert "--enable-lora" not in plain
    cmd = sglang_command("/m", 30000, lora_rank=16, lora_target_modules=["all-linear"])
    assert cmd[len(plain) :] == lora_server_args(16, ["all-linear"])
    cpu = cpu_server_command("/m", 30000, lora_rank=8, lora_target_modules=["q_proj"])
    assert cpu[-5:] == ["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "q_proj"]
