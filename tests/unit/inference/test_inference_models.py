"""Tiny models: deterministic init, loadable by transformers, safetensors only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference.models import ModelDirError, check_model_dir, init_tiny_model, load_model
from sluice.cli import main


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_init_is_deterministic_and_loadable(tmp_path: Path, arch: str) -> None:
    a = init_tiny_model(tmp_path / "a", vocab=40, layers=1, hidden=32, heads=2, arch=arch, seed=3)
    b = init_tiny_model(tmp_path / "b", vocab=40, layers=1, hidden=32, heads=2, arch=arch, seed=3)
    c = init_tiny_model(tmp_path / "c", vocab=40, layers=1, hidden=32, heads=2, arch=arch, seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["architectures"][0].lower().startswith(arch)
    gen = json.loads((a / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    m = load_model(a)
    assert m.lm_head.weight.shape == (40, 32) and m.dtype == torch.float32
    assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 40)


def test_model_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="does not exist"):
        check_model_dir(tmp_path / "missing")
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(ModelDirError, match=r"no config\.json"):
        check_model_dir(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(ModelDirError, match=r"no \*\.safetensors"):
        check_model_dir(d)
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelDirError, match=r"pickled weights \(pytorch_model\.bin\)"):
        load_model(d)
    with pytest.raises(ValueError, match="eos_token_id 50"):
        init_tiny_model(tmp_path / "x", vocab=10, layers=1, hidden=32, eos_token_id=50)


@pytest.mark.timeout(60)
def test_cli_model_init_from_task(tmp_path: Path) -> None:
    assert main(["model", "init", str(tmp_path / "m"), "--task", "reverse", "--hidden", "32"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["vocab_size"] == 14 and cfg["hidden_size"] == 32 and cfg["eos_token_id"] == 2
    with pytest.raises(SystemExit, match="--vocab"):
        main(["model", "init", str(tmp_path / "n")])
