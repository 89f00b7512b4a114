"""Tasks: rewards on hand-made outputs, deterministic prompts, JSONL errors naming file:line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rollout_workers.tasks import JsonlTask, Prompt, get_task
from rollout_workers.tasks.base import EOS
from rollout_workers.tasks.long_tail import DIGIT0 as LT0
from rollout_workers.tasks.reverse import DIGIT0, SEP


def test_reverse_prompts_and_partial_credit() -> None:
    t = get_task("reverse")
    p = Prompt(
        id="x",
        input_ids=[1, DIGIT0 + 1, DIGIT0 + 2, DIGIT0 + 3, DIGIT0 + 4, SEP],
        answer=[4, 3, 2, 1],
    )
    d = [DIGIT0 + x for x in (4, 3, 2, 1)]
    assert t.reward(p, [*d, EOS]) == 1.0
    assert t.reward(p, d) == 1.0  # no EOS: the digits still count
    assert t.reward(p, [d[0], d[1], DIGIT0 + 9, d[3], EOS]) == 0.75
    assert t.reward(p, [d[0], EOS, d[2], d[3]]) == 0.25  # tokens after EOS are ignored
    assert t.reward(p, []) == 0.0
    assert t.reward(p, [99, -5, 1000, 7, 7, 7, 7, 7]) == 0.0
    # The prompt encodes the answer.
    for q in t.prompts("train")[:20]:
        digits = [x - DIGIT0 for x in q.input_ids[1:-1]]
        assert q.answer == digits[::-1] and q.input_ids[-1] == SEP
        assert t.reward(q, [DIGIT0 + x for x in q.answer] + [EOS]) == 1.0
    assert t.vocab_size == 14 and t.eos_token_id == EOS and t.max_new_tokens == 5


def test_prompts_deterministic_and_disjoint() -> None:
    for name in ("reverse", "long-tail"):
        a, b = get_task(name, seed=3), get_task(name, seed=3)
        for split in ("train", "eval"):
            assert a.prompts(split) == b.prompts(split)  # type: ignore[arg-type]
            ids = [p.id for p in a.prompts(split)]  # type: ignore[arg-type]
            assert len(set(ids)) == len(ids)
            assert all(0 <= t < a.vocab_size for p in a.prompts(split) for t in p.input_ids)  # type: ignore[arg-type]
        assert a.prompts("train") != get_task(name, seed=4).prompts("train")
    r = get_task("reverse", n_digits=3, n_train=900, n_eval=100)
    train = {tuple(p.input_ids) for p in r.prompts("train")}
    assert not train & {tuple(p.input_ids) for p in r.prompts("eval")}
    with pytest.raises(ValueError, match="exceeds"):
        get_task("reverse", n_digits=2, n_train=100, n_eval=1)
    with pytest.raises(ValueError, match="split"):
        r.prompts("test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ValueError, match="n_digitz"):
        get_task("reverse", n_digitz=3)


def test_long_tail_lengths_are_heavy_tailed_and_reward() -> None:
    t = get_task("long-tail", median=32, sigma=1.0, max_len=512, n_train=2000)
    lengths = sorted(p.answer[0] for p in t.prompts("train"))
    median, p99 = lengths[len(lengths) // 2], lengths[int(0.99 * len(lengths))]
    assert 24 <= median <= 40 and p99 >= 5 * median and lengths[-1] <= 512
    p = Prompt(id="x", input_ids=[], answer=[5, 8])
    right = [LT0 + d for d in (8, 9, 0, 1, 2)]
    assert t.reward(p, [*right, EOS]) == 1.0
    assert t.reward(p, [*right[:3], EOS]) == 0.6
    assert t.reward(p, [*right, right[0], right[0], EOS]) == 5 / 7  # overlong costs
    assert t.reward(p, [LT0 + 7] * 5) == 0.0  # 7 is never right for (n=5, s=8)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = tmp_path / "my_reward.py"
    mod.write_text(
        "def exact(prompt, output_ids):\n    return float(output_ids[:1] == [prompt.answer])\n"
        "def bad(prompt, output_ids):\n    return 2.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_reward", None)
    f = _write(
        tmp_path / "t.jsonl",
        [
            '{"prompt_ids": [1, 5, 6], "answer": 7}',
            "",
            '{"prompt": [1, 9], "answer": 3, "split": "eval", "id": "e0"}',
        ],
    )
    t = get_task("jsonl", path=f, reward="my_reward:exact", eos_token_id=2)
    assert [p.id for p in t.prompts("train")] == ["train-1"] and t.prompts("eval")[0].id == "e0"
    assert t.vocab_size == 10
    p = t.prompts("train")[0]
    assert t.reward(p, [7, 2]) == 1.0 and t.reward(p, [6]) == 0.0
    bad = JsonlTask(f, reward="my_reward:bad", eos_token_id=2)
    with pytest.raises(ValueError, match="my_reward:bad"):
        bad.reward(p, [1])
    for lines, lineno, word in [
        (['{"prompt_ids": [1]}', "{oops"], 2, "JSON"),
        (['{"prompt_ids": [1]}', "", '{"answer": 1}'], 3, "prompt_ids"),
        (['{"prompt_ids": []}'], 1, "non-empty"),
        (['{"prompt_ids": [1, -2]}'], 1, "token ids"),
        (['{"prompt": "some text"}'], 1, "tokenizer-free"),
        (['{"prompt_ids": [1], "split": "dev"}'], 1, "split"),
        (["[1, 2]"], 1, "object"),
        (['{"prompt_ids": [1], "id": "a"}', '{"prompt_ids": [2], "id": "a"}'], 2, "duplicate"),
    ]:
        g = _write(tmp_path / f"bad{lineno}.jsonl", lines)
        with pytest.raises(ValueError, match=rf"bad{lineno}\.jsonl:{lineno}: .*{word}"):
            JsonlTask(g, reward="my_reward:exact", eos_token_id=2)
    with pytest.raises(ValueError, match="module:function"):
        JsonlTask(f, reward="my_reward.exact", eos_token_id=2)
    with pytest.raises(ValueError, match="nosuchmod"):
        JsonlTask(f, reward="nosuchmod:f", eos_token_id=2)
    with pytest.raises(ValueError, match="outside vocab_size"):
        JsonlTask(f, reward="my_reward:exact", eos_token_id=2, vocab_size=5)
