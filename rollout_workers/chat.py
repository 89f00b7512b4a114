"""Chat formatting with a model's tokenizer: messages -> prompt token ids, output ids -> text.

``ChatFormat`` is the one place the text path touches a tokenizer; tasks (``tasks/text.py``)
and multi-turn episodes use it the same way:

- ``prompt_ids(messages)`` renders the tokenizer's chat template with the generation prompt
  (``system_prompt`` first when the messages have no system message) and encodes the rendered
  text without adding special tokens again — what ``tokenizer.apply_chat_template(messages,
  add_generation_prompt=True, tokenize=True)`` returns
  (tests/unit/rollout_workers/test_rollout_workers_text_task.py checks it is identical). With
  ``chat_template=False`` (or a tokenizer without one) the last message's content is encoded
  as is, with the tokenizer's own special tokens (e.g. BOS).
- ``decode(output_ids)`` is the text of the answer: the ids before the first stop id, special
  tokens skipped (as verl and AReaL decode for rewards) unless ``skip_special_tokens`` is false:
  then a special token the policy emits mid-answer shows in the text (a tiny model learned to
  pad "73" as "7<s>3<s>" to dodge a length penalty it could not see). The ids themselves are never re-derived from text: what the server sampled
  is what is trained.
- ``stop_ids`` are the tokenizer's EOS and the model directory's generation-config EOS ids
  (``inference.tokenizer.stop_token_ids``); the sampler sends them as ``stop_token_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rollout_workers.tasks.base import TaskError


@dataclass
class ChatFormat:
    tokenizer: Any
    stop_ids: list[int]
    system_prompt: str | None = None
    chat_template: bool = True
    skip_special_tokens: bool = True

    @classmethod
    def from_dir(
        cls,
        directory: str,
        *,
        system_prompt: str | None = None,
        chat_template: bool = True,
        skip_special_tokens: bool = True,
    ) -> ChatFormat:
        """The tokenizer of ``directory`` (a model directory, or a trainer checkpoint's) and
        its stop ids; ``TaskError`` naming the directory when it has no tokenizer."""
        from inference.models import resolve_model_dir
        from inference.tokenizer import TokenizerError, load_tokenizer, stop_token_ids

        d = resolve_model_dir(directory)
        try:
            tok = load_tokenizer(d)
        except TokenizerError as e:
            raise TaskError(f"task.options.tokenizer: {e}") from None
        stops = stop_token_ids(d, tok)
        if not stops:
            raise TaskError(
                f"the tokenizer of {d} has no EOS token and the model directory names no "
                "eos_token_id: generation would never stop"
            )
        if chat_template and not getattr(tok, "chat_template", None):
            raise TaskError(
                f"the tokenizer of {d} has no chat template: set task.options.chat_template="
                "false to send the prompt text as is"
            )
        return cls(tok, stops, system_prompt, chat_template, skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def bos_id(self) -> int | None:
        v = getattr(self.tokenizer, "bos_token_id", None)
        return int(v) if v is not None else None

    @property
    def pad_id(self) -> int | None:
        v = getattr(self.tokenizer, "pad_token_id", None)
        return int(v) if v is not None else None

    def with_system(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        msgs = [dict(m) for m in messages]
        if self.system_prompt and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The chat template's text for ``messages`` plus the generation prompt."""
        text = self.tokenizer.apply_chat_template(
            self.with_system(messages), add_generation_prompt=True, tokenize=False
        )
        return str(text)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt's token ids (see the module docstring)."""
        if not self.chat_template:
            text = messages[-1]["content"]
            if self.system_prompt:
                text = self.system_prompt + "\n" + text
            return [int(t) for t in self.tokenizer(text)["input_ids"]]
        ids = self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]
        return [int(t) for t in ids]

    def answer_ids(self, output_ids: Sequence[int]) -> list[int]:
        """``output_ids`` up to (not including) the first stop id."""
        stops = set(self.stop_ids)
        out = []
        for t in output_ids:
            if t in stops:
                break
            out.append(int(t))
        return out

    def decode(self, output_ids: Sequence[int]) -> str:
        """The answer's text (see the module docstring)."""
        return str(
            self.tokenizer.decode(
                self.answer_ids(output_ids), skip_special_tokens=self.skip_special_tokens
            )
        )
