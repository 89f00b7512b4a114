"""``text``: a dataset of text prompts and reference answers, tokenized with the model's own
tokenizer and chat template, scored on the decoded answer.

The dataset (``path``) is JSONL, Parquet or a ``datasets`` dataset saved with ``save_to_disk``
(``rollout_workers.data``); nothing is downloaded. Each row gives the prompt as text
(``prompt_field``) or as chat ``messages`` (``messages_field``: a list of ``{role, content}``),
the reference answer (``answer_field``) and optional metadata (``metadata_fields``). Eval
prompts come from ``eval_path``, else a saved dataset's ``test``/``validation``/``eval`` split,
else the last ``eval_size`` rows of a seeded shuffle (``seed``) held out from train.

Tokenization (``rollout_workers.chat.ChatFormat``): the tokenizer of ``tokenizer`` (default:
the run's ``model.path``, filled in by the ``sluice`` commands), the chat template applied with
the generation prompt (``system_prompt`` prepended when the row has no system message), or the
raw prompt text when ``chat_template`` is false. The worker sends these ids, the server returns
output ids, and the trainer trains exactly those ids: nothing is re-tokenized from text.

The reward (``reward``: ``exact`` | ``numeric`` | ``math`` or ``module:function``) is called as
``fn(prompt, output_ids, text)`` with ``text`` the decoded answer (up to the first stop token,
special tokens skipped) and ``prompt.answer`` / ``prompt.text`` / ``prompt.metadata`` the row's.

Every problem with a row raises ``TaskError`` as ``FILE:ROW: reason`` before anything starts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from rollout_workers.data import Row, read_splits
from rollout_workers.tasks.base import Prompt, Split, Task, TaskError, check_split

EVAL_SPLITS = ("test", "validation", "eval")


def resolve_text_reward(spec: str) -> Callable[..., Any]:
    """A built-in reward by name (``rollout_workers.reward_fns.BUILTIN_REWARDS``) or a user
    one as ``module:function``; ``TaskError`` naming the spec when neither."""
    from rollout_workers.reward_fns import BUILTIN_REWARDS

    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise TaskError(
            f"reward {spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor "
            "'module:function'"
        )
    from rollout_workers.tasks.jsonl import load_reward_fn

    return load_reward_fn(spec)


class TextTask(Task):
    name = "text"
    option_help: ClassVar[dict[str, str]] = {
        "path": "the dataset: a JSONL or Parquet file, or a directory written by "
        "datasets' save_to_disk (local only, never downloaded)",
        "reward": "exact | numeric | math (math-verify) or 'module:function' called as "
        "fn(prompt, output_ids, text) -> float (text: the decoded answer)",
        "prompt_field": "the row's prompt text (the chat template wraps it as a user message)",
        "messages_field": "instead of prompt_field: the row's chat messages, a list of "
        "{role, content} (the conversation so far)",
        "answer_field": "the row's reference answer (prompt.answer for the reward)",
        "metadata_fields": "row fields passed to the reward as prompt.metadata",
        "id_field": "the row's unique id (default: <split>-<row>)",
        "system_prompt": "a system message put first when the row has none",
        "chat_template": "apply the tokenizer's chat template (false: the prompt text as is)",
        "skip_special_tokens": "decode the answer without special tokens (false: a special "
        "token the model emits before its stop token shows in the reward's text)",
        "tokenizer": "a directory with the tokenizer (default: model.path)",
        "eval_path": "a separate eval dataset (same fields)",
        "eval_size": "without eval_path or an eval split: rows held out from train for eval "
        "(after a seeded shuffle)",
        "seed": "the shuffle that picks the eval_size held-out rows",
        "max_new_tokens": "output budget per sample (rollout.max_new_tokens overrides it)",
    }

    def __init__(
        self,
        path: str,
        reward: str = "exact",
        prompt_field: str = "prompt",
        messages_field: str | None = None,
        answer_field: str | None = "answer",
        metadata_fields: list[str] | None = None,
        id_field: str | None = None,
        system_prompt: str | None = None,
        chat_template: bool = True,
        skip_special_tokens: bool = True,
        tokenizer: str = "",
        eval_path: str | None = None,
        eval_size: int = 0,
        seed: int = 0,
        max_new_tokens: int = 256,
    ) -> None:
        from rollout_workers.chat import ChatFormat

        if not tokenizer:
            raise TaskError(
                "task.options.tokenizer is empty: the text task needs the model's tokenizer "
                "(set model.path to a model directory with tokenizer files; `sluice model init "
                "DIR --tokenizer chars` makes a tiny one)"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise TaskError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(eval_size, int) or eval_size < 0:
            raise TaskError(f"eval_size must be an int >= 0, got {eval_size!r}")
        self.path = Path(path)
        self.reward_spec = reward
        self.reward_fn = resolve_text_reward(reward)
        self.prompt_field, self.messages_field = prompt_field, messages_field
        self.answer_field, self.id_field = answer_field, id_field
        self.metadata_fields = list(metadata_fields or [])
        self.fmt = ChatFormat.from_dir(
            tokenizer,
            system_prompt=system_prompt,
            chat_template=chat_template,
            skip_special_tokens=skip_special_tokens,
        )
        self.vocab_size = self.fmt.vocab_size
        self.eos_token_id = self.fmt.stop_ids[0]
        self.bos_token_id = self.fmt.bos_id if self.fmt.bos_id is not None else self.eos_token_id
        self.pad_token_id = self.fmt.pad_id if self.fmt.pad_id is not None else self.eos_token_id
        self.max_new_tokens = max_new_tokens
        self._splits = self._load(eval_path, eval_size, seed)

    # ------------------------------------------------------------------ rows -> prompts
    def _prompt(self, row: Row, split: str, index: int) -> Prompt:
        d, where = row.data, row.where
        if self.messages_field is not None:
            if self.messages_field not in d:
                raise TaskError(f"{where}: no field {self.messages_field!r} (messages_field)")
            messages = d[self.messages_field]
            if (
                not isinstance(messages, list)
                or not messages
                or not all(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    for m in messages
                )
            ):
                raise TaskError(
                    f"{where}: {self.messages_field!r} must be a non-empty list of "
                    "{role: str, content: str} objects"
                )
            users = [m["content"] for m in messages if m["role"] == "user"]
            text = users[-1] if users else messages[-1]["content"]
            msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        else:
            if self.prompt_field not in d:
                have = ", ".join(sorted(map(str, d))) or "none"
                raise TaskError(
                    f"{where}: no field {self.prompt_field!r} (task.options.prompt_field; the "
                    f"row has: {have})"
                )
            text = d[self.prompt_field]
            if not isinstance(text, str) or not text.strip():
                raise TaskError(f"{where}: {self.prompt_field!r} must be non-empty text")
            msgs = [{"role": "user", "content": text}]
        answer = None
        if self.answer_field is not None:
            if self.answer_field not in d or d[self.answer_field] is None:
                raise TaskError(
                    f"{where}: no field {self.answer_field!r} (task.options.answer_field; null "
                    "it if the reward needs no reference answer)"
                )
            answer = d[self.answer_field]
        meta = {}
        for f in self.metadata_fields:
            if f not in d:
                raise TaskError(f"{where}: no field {f!r} (task.options.metadata_fields)")
            meta[f] = d[f]
        if self.id_field is not None:
            pid = d.get(self.id_field)
            if not isinstance(pid, str | int) or isinstance(pid, bool):
                raise TaskError(f"{where}: {self.id_field!r} must be a string or an int id")
            pid = str(pid)
        else:
            pid = f"{split}-{index}"
        try:
            ids = self.fmt.prompt_ids(msgs)
        except Exception as e:  # the template raised on this row: say which row
            raise TaskError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from e
        if not ids:
            raise TaskError(f"{where}: the prompt tokenizes to no tokens")
        return Prompt(id=pid, input_ids=ids, answer=answer, text=text, metadata=meta)

    def _prompts(self, rows: list[Row], split: str) -> list[Prompt]:
        out = [self._prompt(r, split, i) for i, r in enumerate(rows)]
        seen: dict[str, str] = {}
        for p, r in zip(out, rows, strict=True):
            if p.id in seen:
                raise TaskError(f"{r.where}: id {p.id!r} repeats {seen[p.id]}")
            seen[p.id] = r.where
        return out

    def _load(self, eval_path: str | None, eval_size: int, seed: int) -> dict[str, list[Prompt]]:
        splits = read_splits(self.path)
        if "" in splits:
            train_rows, eval_rows = splits[""], None
        else:
            if "train" not in splits:
                raise TaskError(
                    f"dataset {self.path} has splits {sorted(splits)} and no 'train' split"
                )
            train_rows = splits["train"]
            eval_rows = next((splits[s] for s in EVAL_SPLITS if s in splits), None)
        if eval_path is not None:
            eval_rows = [r for rows in read_splits(eval_path).values() for r in rows]
        elif eval_rows is None and eval_size:
            if eval_size >= len(train_rows):
                raise TaskError(
                    f"eval_size {eval_size} leaves no train rows of the {len(train_rows)} in "
                    f"{self.path}"
                )
            order = list(range(len(train_rows)))
            random.Random(f"text/eval/{seed}").shuffle(order)
            held = set(order[-eval_size:])
            eval_rows = [r for i, r in enumerate(train_rows) if i in held]
            train_rows = [r for i, r in enumerate(train_rows) if i not in held]
        if not train_rows:
            raise TaskError(f"dataset {self.path}: no rows")
        return {
            "train": self._prompts(train_rows, "train"),
            "eval": self._prompts(eval_rows or [], "eval"),
        }

    # ------------------------------------------------------------------ task contract
    def prompts(self, split: Split) -> Sequence[Prompt]:
        check_split(split)
        return self._splits[split]

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return tuple(self.fmt.stop_ids)

    def decode(self, output_ids: list[int]) -> str:
        return self.fmt.decode(output_ids)

    def reward(self, prompt: Prompt, output_ids: list[int]) -> float:
        return float(self.reward_fn(prompt, list(output_ids), self.decode(output_ids)))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "dataset": str(self.path),
            "reward": self.reward_spec,
            "stop_token_ids": list(self.stop_token_ids),
            "train_prompts": len(self._splits["train"]),
            "eval_prompts": len(self._splits["eval"]),
        }
