"""A trained model is usable as is: every published ``weights/vN`` and checkpoint ``model/``
loads with transformers (model and tokenizer; the tokenizer files byte-identical to the
starting model's), and ``model.path=RUN/checkpoints/step-N`` starts a new run: ``sluice
serve``, ``sluice rollout`` (its validation and its version-0 weights) and ``sluice train``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from trainer_helpers import VOCAB, base_config, make_group, make_model, put_groups, run_train

from inference.launch import launch_cpu_server

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tokenizer(model: Path) -> None:
    """A small word-level tokenizer over the model's vocabulary, saved beside its weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", '
        '"eos_token": "</s>", "pad_token": "<pad>"}'
    )
    (model / "special_tokens_map.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}'
    )


def _loads_as_is(d: Path, source: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in (*TOKENIZER_FILES, "generation_config.json"):
        assert (d / name).read_bytes() == (source / name).read_bytes(), (d, name)
    model = AutoModelForCausalLM.from_pretrained(str(d), use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok("w5 w7")["input_ids"] == [5, 7] and tok.eos_token_id == 2
    return model


def test_published_and_checkpointed_models_load_and_a_checkpoint_starts_a_run(
    tmp_path: Path, redis_url: str
) -> None:
    source = make_model(tmp_path / "base")
    _tokenizer(source)
    # run A: 2 steps on synthetic groups
    conf = base_config(tmp_path, redis_url, "runa", source, max_steps=2, checkpoint_every=1)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(conf))
    rng = np.random.default_rng(0)
    put_groups(redis_url, "runa", [make_group(rng, "runa") for _ in range(4)])
    res = run_train(tmp_path / "a.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    run_a = tmp_path / "runa"
    published = _loads_as_is(run_a / "weights" / "v2", source)
    ckpt = run_a / "checkpoints" / "step-00000002"
    checkpointed = _loads_as_is(ckpt / "model", source)
    for (k, a), (_, b) in zip(
        published.state_dict().items(), checkpointed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k  # the checkpoint holds the weights of version 2

    from inference.models import check_model_dir, load_model, resolve_model_dir

    assert resolve_model_dir(ckpt) == ckpt / "model"
    assert check_model_dir(ckpt) == [ckpt / "model" / "model.safetensors"]
    via_ckpt = load_model(ckpt)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            via_ckpt.state_dict().values(), checkpointed.state_dict().values(), strict=True
        )
    )

    # run B starts from run A's checkpoint dir: a server on it, a worker, a trainer
    conf_b = base_config(tmp_path, redis_url, "runb", ckpt, max_steps=1)
    conf_b["task"] = {"name": "reverse", "options": {"n_digits": 2, "n_train": 8, "n_eval": 2}}
    conf_b["rollout"] = {"temperature": 1.0, "n_samples": 2, "max_inflight_groups": 2}
    cfg_b = tmp_path / "b.yaml"
    cfg_b.write_text(yaml.safe_dump(conf_b))
    with launch_cpu_server(ckpt, log_path=tmp_path / "server.log") as srv:
        args = ["rollout", "--config", str(cfg_b), "--servers", srv.url, "--max-groups", "2"]
        worker = subprocess.run(
            [sys.executable, "-m", "sluice", *args, "--worker-id", "wb"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert "is a trainer checkpoint: using its model directory" in worker.stderr
    res_b = run_train(cfg_b)
    assert res_b.returncode == 0, res_b.stderr[-3000:]
    assert "is a trainer checkpoint: using its model directory" in res_b.stderr
    run_b = tmp_path / "runb"
    _loads_as_is(run_b / "weights" / "v1", source)  # the files came along from the checkpoint
    recorded = yaml.safe_load((run_b / "config.yaml").read_text())
    assert recorded["model"]["path"] == str((ckpt / "model").resolve())
