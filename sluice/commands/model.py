"""Model utilities: ``sluice model init DIR`` writes a tiny random-init HF model (safetensors).

With ``--task NAME`` the vocabulary size and the BOS/EOS/PAD ids come from the task, so the
model stops on the task's EOS. With ``--tokenizer chars`` the directory also gets a
character-level tokenizer (built locally with the ``tokenizers`` library) and a chat template
(``--chat-template``: chatml or compact), and the vocabulary is the tokenizer's: a model for
the ``text`` task.
"""

from __future__ import annotations

import argparse
from typing import Any

from inference.tokenizer import CHAT_TEMPLATES


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model_cmd", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="write a tiny random-init model directory")
    init.add_argument("dir", help="output directory")
    init.add_argument("--vocab", type=int, default=None, help="vocabulary size (or --task)")
    init.add_argument("--task", default=None, help="take vocab and special ids from this task")
    init.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    init.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    init.add_argument("--heads", type=int, default=None, help="attention heads (default hidden/64)")
    init.add_argument("--arch", choices=("llama", "qwen2"), default="llama", help="architecture")
    init.add_argument("--max-positions", type=int, default=4096, help="context length")
    init.add_argument("--seed", type=int, default=0, help="init seed (same seed, same weights)")
    init.add_argument(
        "--tokenizer",
        choices=("none", "chars"),
        default="none",
        help="chars: also write a character-level tokenizer with a chat template (text tasks)",
    )
    init.add_argument(
        "--alphabet",
        default=None,
        help="--tokenizer chars: its characters (default: printable ASCII and newline)",
    )
    init.add_argument(
        "--chat-template",
        choices=tuple(CHAT_TEMPLATES),
        default="chatml",
        help="--tokenizer chars: chatml (<|im_start|>ROLE\\nCONTENT<|im_end|>\\n) or compact "
        "(<|im_start|>CONTENT<|im_end|>: short contexts for tiny models)",
    )


def run(args: argparse.Namespace) -> int:
    from inference.models import init_tiny_model

    shape: dict[str, Any] = dict(
        layers=args.layers,
        hidden=args.hidden,
        arch=args.arch,
        heads=args.heads,
        max_positions=args.max_positions,
        seed=args.seed,
    )
    if args.tokenizer == "chars":
        from inference.models import init_tiny_text_model

        if args.task or args.vocab:
            raise SystemExit("sluice model init: --tokenizer chars sets the vocabulary itself")
        try:
            out = init_tiny_text_model(
                args.dir, alphabet=args.alphabet, chat_template=args.chat_template, **shape
            )
        except ValueError as e:
            raise SystemExit(f"sluice model init: {e}") from None
        print(
            f"wrote {args.arch} model with a char tokenizer ({args.layers}x{args.hidden}) to {out}"
        )
        return 0
    special: dict[str, Any] = {}
    vocab = args.vocab
    if args.task:
        from rollout_workers.tasks import get_task

        task = get_task(args.task)
        if vocab is not None and vocab < task.vocab_size:
            raise SystemExit(
                f"--vocab {vocab} is smaller than task {task.name}'s {task.vocab_size}"
            )
        vocab = vocab or task.vocab_size
        special = dict(
            bos_token_id=task.bos_token_id,
            eos_token_id=task.eos_token_id,
            pad_token_id=task.pad_token_id,
        )
    if vocab is None:
        raise SystemExit("sluice model init: give --vocab V or --task NAME")
    try:
        out = init_tiny_model(args.dir, vocab=vocab, **shape, **special)
    except ValueError as e:
        raise SystemExit(f"sluice model init: {e}") from None
    print(f"wrote {args.arch} model (vocab {vocab}, {args.layers}x{args.hidden}) to {out}")
    return 0
