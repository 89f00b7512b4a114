"""The episode of examples/tool-task.yaml: multiplication the policy solves with a calculator.

Each row is ``{"prompt": "7*8", "answer": "56"}``. The model sees the ChatML prompt and has two
turns:

1. it must call the calculator: its whole message is the calculator's input, ``A*B`` (then its
   stop token); the episode (the environment) runs the call and appends the tool's answer as a
   ``tool`` message plus the next assistant header:
   ``\\n<|im_start|>tool\\n56<|im_end|>\\n<|im_start|>assistant\\n``.
   Those tokens are context, never trained. A malformed call gets ``?`` as the tool's answer.
2. it gives the final answer, which is scored.

The reward is 0.5 x (how much of the call is right) + 0.5 x (how much of the final answer is
right), each the fraction of characters in the right place over the longer of the two strings:
partial credit is what lets a random-init model learn with GRPO (an all-or-nothing reward is
almost never hit at random, and a group of equal rewards teaches nothing). A perfect episode
scores 1.0; after a wrong call the tool answers "?" (or another product) and the policy would
have to know the product itself.
"""

from __future__ import annotations

import re

CALL = re.compile(r"(\d+)\*(\d+)")


CALL_TOKENS = 3  # "7*8": single-digit factors
ANSWER_TOKENS = 2  # "56": every product in the data has two digits


def partial(want: str, got: str) -> float:
    right = sum(1 for a, b in zip(want, got, strict=False) if a == b)
    return right / max(len(want), len(got), 1)


def calculator(call: str) -> str:
    """The tool: ``A*B`` -> the product as text, ``?`` for anything else."""
    m = CALL.fullmatch(call)
    return str(int(m.group(1)) * int(m.group(2))) if m else "?"


async def episode(ctx, row) -> float:
    call = await ctx.generate(max_new_tokens=CALL_TOKENS)
    if call.finish_reason != "stop":  # the turn used its budget: the harness closes it
        ctx.append("<|im_end|>")
    ctx.append(f"\n<|im_start|>tool\n{calculator(call.text)}<|im_end|>\n<|im_start|>assistant\n")
    answer = await ctx.generate(max_new_tokens=ANSWER_TOKENS)
    return 0.5 * partial(row.text, call.text) + 0.5 * partial(row.answer, answer.text)
