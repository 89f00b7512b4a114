"""LoRA on the trainer's model (trainer/lora.py): the wrap starts as the base model, only the
adapter trains, the adapter round-trips, dropout only in the gradient pass, and a checkpoint
holds the adapter and optimizer state only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.models import init_tiny_model
from trainer.checkpoint import read_checkpoint_state, save_checkpoint
from trainer.config import LoraConfig, TrainerConfig, TrainerError
from trainer.lora import adapter_dropout, adapter_state, apply_lora, load_adapter_state
from trainer.model import build_optimizer, load_model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny_model(
        tmp_path_factory.mktemp("m") / "base", vocab=32, layers=2, hidden=32, arch="qwen2"
    )


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fresh_adapter_is_the_base_and_only_it_trains(base_dir: Path) -> None:
    base = load_model(base_dir, torch.device("cpu"))
    want = _logits(base)
    model = apply_lora(base, LoraConfig(rank=4))
    assert torch.equal(_logits(model), want)  # lora_B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # all-linear on qwen2: the 7 projections of each of the 2 layers, A and B each
    assert len(trainable) == 2 * 7 * 2
    opt, _ = build_optimizer(model, TrainerConfig(lora=LoraConfig(rank=4)))
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_opt < 0.2 * sum(p.numel() for p in model.parameters())


def test_adapter_round_trips_and_alpha_scales(base_dir: Path) -> None:
    cfg = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    a = apply_lora(load_model(base_dir, torch.device("cpu")), cfg)
    with torch.no_grad():
        for n, p in a.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    state = {k: v.clone() for k, v in adapter_state(a).items()}
    assert len(state) == 2 * 2 * 2 and all("lora_" in k for k in state)
    b = apply_lora(load_model(base_dir, torch.device("cpu")), cfg)
    assert not torch.equal(_logits(a), _logits(b))
    load_adapter_state(b, state)
    assert torch.equal(_logits(a), _logits(b))
    # The layer adds (x A^T B^T) * alpha / r: compare one q_proj by hand.
    layer = a.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    want = layer.base_layer(x) + (x @ layer.lora_A["default"].weight.T) @ layer.lora_B[
        "default"
    ].weight.T * (8 / 4)
    with torch.no_grad():
        assert torch.allclose(layer(x), want, atol=1e-6)
    with pytest.raises(TrainerError, match="another rank"):
        c = apply_lora(
            load_model(base_dir, torch.device("cpu")),
            LoraConfig(rank=2, alpha=8, target_modules=["q_proj", "v_proj"]),
        )
        load_adapter_state(c, state)


def test_dropout_only_inside_the_gradient_pass(base_dir: Path) -> None:
    torch.manual_seed(0)
    m = apply_lora(load_model(base_dir, torch.device("cpu")), LoraConfig(rank=4, dropout=0.5))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    a, b = _logits(m), _logits(m)
    assert torch.equal(a, b)  # eval: no dropout
    with adapter_dropout(m):
        c = _logits(m)
    assert not torch.equal(a, c)
    assert torch.equal(_logits(m), a)  # back to eval


def test_all_linear_beside_the_output_head(base_dir: Path) -> None:
    m = apply_lora(
        load_model(base_dir, torch.device("cpu")),
        LoraConfig(rank=4, target_modules=["all-linear", "lm_head"]),
    )
    mods = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapter_state(m)}
    assert mods == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    }
    plain = apply_lora(load_model(base_dir, torch.device("cpu")), LoraConfig(rank=4))
    assert "lm_head" not in {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapter_state(plain)}


def test_unknown_target_module_is_a_clear_error(base_dir: Path) -> None:
    with pytest.raises(TrainerError, match="target_modules"):
        apply_lora(
            load_model(base_dir, torch.device("cpu")),
            LoraConfig(rank=4, target_modules=["nope_proj"]),
        )


def test_checkpoint_holds_the_adapter_only(base_dir: Path, tmp_path: Path) -> None:
    tc = TrainerConfig(lora=LoraConfig(rank=4))
    m = apply_lora(load_model(base_dir, torch.device("cpu")), tc.lora)
    opt, sched = build_optimizer(m, tc)
    m(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    dest = save_checkpoint(
        tmp_path / "step-1",
        model=m,
        optimizer=opt,
        scheduler=sched,
        state={"step": 1, "version": 1},
    )
    assert not (dest / "model").exists()
    files = {p.name for p in (dest / "adapter").iterdir()}
    assert files == {"adapter_model.safetensors", "adapter_config.json"}
    from safetensors.torch import load_file

    saved = load_file(str(dest / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(adapter_state(m))
    opt_t = load_file(str(dest / "optimizer.safetensors"))
    n_adapter = sum(t.numel() for t in saved.values())
    assert sum(t.numel() for k, t in opt_t.items() if k.endswith("exp_avg")) == n_adapter
    assert read_checkpoint_state(dest)["step"] == 1
