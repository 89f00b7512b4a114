"""examples/tool-task.yaml: it builds (rows, tokenizer with the example's alphabet, the episode
found beside the config), and its episode sends the calculator's answer as a tool message and
scores each turn of a perfect episode 0.5 (1.0 in all) and a wrong call low (a scripted ctx stands in for the worker)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from inference.tokenizer import CHAT_TEMPLATES, build_char_tokenizer
from rollout_workers.episodes import Turn, resolve_episode_fn
from sluice.config import add_module_dirs, build_task
from sluice.demo import load_demo_config

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "tool-task.yaml"

pytestmark = pytest.mark.timeout(60)


class ScriptedCtx:
    """Answers each generate (and chat) with the next scripted text; records the chat
    requests (what the real context renders with the chat template and appends)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.chats: list[list[dict[str, str]]] = []

    async def generate(self, *, max_new_tokens: int | None = None) -> Turn:
        text = self.texts.pop(0)
        assert max_new_tokens is not None and len(text) <= max_new_tokens
        return Turn([0] * len(text), [0.0] * len(text), [0] * len(text), "length", text)

    async def chat(self, messages: Any, *, max_new_tokens: int | None = None) -> Turn:
        self.chats.append(list(messages))
        return await self.generate(max_new_tokens=max_new_tokens)


async def test_the_tool_example_builds_and_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    cfg = load_demo_config(EXAMPLE)
    build_char_tokenizer(
        tmp_path / "m",
        alphabet=cfg.model.alphabet,
        chat_template=CHAT_TEMPLATES[cfg.model.chat_template],
    )
    cfg.model.path = str(tmp_path / "m")
    add_module_dirs(EXAMPLE)
    task = build_task(cfg)
    rows = task.prompts("train")
    assert len(rows) == 58 and all(len(r.answer) == 2 for r in rows)
    row = next(r for r in rows if r.id == "mul-78")
    assert "<unk>" not in task.fmt.tokenizer.convert_ids_to_tokens(row.input_ids)
    episode = resolve_episode_fn(cfg.rollout.episode or "")
    ctx = ScriptedCtx(["7*8", "56"])
    assert await episode(ctx, row) == [0.5, 0.5]  # per turn: the call's, the answer's
    assert ctx.chats == [
        [
            {"role": "user", "content": "7*8"},
            {"role": "assistant", "content": "7*8"},
            {"role": "tool", "content": "56"},
        ]
    ]
    # The example's compact template: the prompt, the call and the tool's answer, one message
    # each, then the next turn's header; every character is in the tokenizer's alphabet.
    text = task.fmt.render(ctx.chats[0])
    assert text == (
        "<|im_start|>7*8<|im_end|><|im_start|>7*8<|im_end|><|im_start|>56<|im_end|><|im_start|>"
    )
    assert task.fmt.tokenizer.decode(row.input_ids) == "<|im_start|>7*8<|im_end|><|im_start|>"
    tool = task.fmt.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert task.fmt.tokenizer.unk_token_id not in tool
    ctx = ScriptedCtx(["7+8", "15"])  # not a call: the tool answers "?"
    assert await episode(ctx, row) == pytest.approx([0.5 * 2 / 3, 0.0])
    assert ctx.chats[0][-1] == {"role": "tool", "content": "?"}
