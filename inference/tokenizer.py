"""Tokenizers of model directories: load one (never from a hub) and build a tiny one locally.

``load_tokenizer(DIR)`` is ``transformers.AutoTokenizer.from_pretrained(DIR,
local_files_only=True)`` with a one-line ``TokenizerError`` when the directory holds none.
``stop_token_ids(DIR, tokenizer)`` are the ids generation stops on: the tokenizer's EOS and
every ``eos_token_id`` of ``generation_config.json`` and ``config.json`` (an instruct model's
``<|im_end|>`` is often only in the generation config).

``build_char_tokenizer`` writes a character-level tokenizer (the ``tokenizers`` library, no
download) with a ChatML-style chat template into a model directory, so a random-init tiny model
(``sluice model init DIR --tokenizer chars``) runs the whole text path: chat template, token
ids, decoded text. Its ids: ``<pad>`` 0, ``<s>`` 1, ``<|im_end|>`` 2 (EOS, what the template
closes each turn with), ``<|im_start|>`` 3, ``<unk>`` 4, then one id per alphabet character (the characters the template itself writes, the newline
and the role names, are always added).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIALS = ("<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DEFAULT_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"
"""Printable ASCII and the newline."""
TEMPLATE_CHARS = "\nsystemuserassistant"
"""Characters ``CHATML_TEMPLATE`` writes around the messages; always in the alphabet."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML: ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` per message, then the assistant's
header when a generation prompt is asked for (what Qwen2.5's template does without tools)."""

COMPACT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>' }}{% endif %}"
)
"""``<|im_start|>CONTENT<|im_end|>`` per message, then ``<|im_start|>`` for a generation
prompt: no role names, no newlines. For tiny random-init models: the tokens a turn must copy
(an expression from the prompt, a tool's answer) sit 2-5 positions back instead of 12-16, and
such a model learns to copy much sooner (examples/tool-task.yaml)."""

CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "compact": COMPACT_TEMPLATE}
"""The chat templates a tiny model can be written with, by name (``model.chat_template``)."""


class TokenizerError(ValueError):
    """A model directory without a usable tokenizer; the message names the directory."""


def build_char_tokenizer(
    directory: str | Path, *, alphabet: str = DEFAULT_ALPHABET, chat_template: str | None = None
) -> Any:
    """Write a character-level fast tokenizer (``SPECIALS`` then ``alphabet``) with
    ``chat_template`` (default ``CHATML_TEMPLATE``) to ``directory``; returns it loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # The template's own characters (newline, role names) are always in the vocabulary.
    chars = list(dict.fromkeys(alphabet + TEMPLATE_CHARS))
    if not chars:
        raise TokenizerError("the tokenizer's alphabet is empty")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=chat_template or CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return load_tokenizer(out)


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer of a local model directory (``AutoTokenizer``, local files only)."""
    d = Path(directory)
    if not d.is_dir():
        raise TokenizerError(f"tokenizer directory {d} does not exist")
    if not any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise TokenizerError(
            f"{d} has no tokenizer (tokenizer.json / tokenizer_config.json): copy the model's "
            "tokenizer files there, or make a tiny one with `sluice model init DIR --tokenizer "
            "chars`"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load the tokenizer of {d}: {e}") from None


def stop_token_ids(directory: str | Path | None, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS id, then every ``eos_token_id`` of the directory's
    ``generation_config.json`` and ``config.json``; no duplicates, in that order."""
    out: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        out.append(int(tokenizer.eos_token_id))
    if directory is not None:
        for name in ("generation_config.json", "config.json"):
            p = Path(directory) / name
            if not p.is_file():
                continue
            eos = json.loads(p.read_text()).get("eos_token_id")
            for e in eos if isinstance(eos, list) else [eos]:
                if isinstance(e, int) and e not in out:
                    out.append(e)
    return out
