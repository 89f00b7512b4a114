"""examples/text-task.yaml: its dataset path resolves beside the file from any directory, and
its task builds with the tokenizer the demo makes (char-level, the example's alphabet): 80
train and 20 eval rows, the user reward found beside the config, the prompt through the chat
template, and a random answer scoring low while the right one scores 1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inference.tokenizer import build_char_tokenizer
from rollout_workers.rewards import resolve_reward_fn
from sluice.config import add_module_dirs, build_task
from sluice.demo import load_demo_config

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "text-task.yaml"

pytestmark = pytest.mark.timeout(60)


def test_the_text_example_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository: the path resolves beside the config
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    cfg = load_demo_config(EXAMPLE)
    assert cfg.task.options["path"] == str(ROOT / "examples" / "data" / "reverse-text.jsonl")
    build_char_tokenizer(tmp_path / "m", alphabet=cfg.model.alphabet)
    cfg.model.path = str(tmp_path / "m")
    add_module_dirs(EXAMPLE)
    task = build_task(cfg)
    train, ev = task.prompts("train"), task.prompts("eval")
    assert (len(train), len(ev)) == (80, 20) and {p.id for p in train}.isdisjoint(p.id for p in ev)
    p = next(q for q in train if q.id == "rev-37")
    assert task.fmt.tokenizer.decode(p.input_ids) == (
        "<|im_start|>user\nreverse 37<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<unk>" not in task.fmt.tokenizer.convert_ids_to_tokens(p.input_ids)
    fn = resolve_reward_fn(task, cfg.rollout.reward_fn)
    enc = task.fmt.tokenizer
    right = [*enc("73", add_special_tokens=False)["input_ids"], enc.eos_token_id]
    wrong = enc("7 e", add_special_tokens=False)["input_ids"]
    assert fn(p, right, task.decode(right)) == 1.0
    # "7 e" vs "73": the first of the answer's two characters right.
    assert fn(p, wrong, task.decode(wrong)) == 0.5
