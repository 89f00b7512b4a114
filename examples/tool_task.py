"""The episode of examples/tool-task.yaml: multiplication the policy solves with a calculator.

Each row is ``{"prompt": "7*8", "answer": "56"}``. The model sees the prompt in its chat
template and has two turns:

1. it must call the calculator: its whole message is the calculator's input, ``A*B``; the
   episode (the environment) runs the call and appends the tool's answer as a ``tool``
   message, framed by the model's chat template (``ctx.chat``), plus the next assistant
   header. Those tokens are context, never trained. A malformed call gets ``?`` as the tool's
   answer.
2. it gives the final answer, which is scored.

Each turn is scored (the episode returns one reward per model turn): the call earns 0.5 x how
much of it is right, the answer 0.5 x how much of it is right, each the fraction of characters
in the right place over the longer of the two strings. The episode's reward is their sum (1.0
for a perfect episode). Partial credit is what lets a random-init model learn with GRPO (an
all-or-nothing reward is almost never hit at random, and a group of equal rewards teaches
nothing). Per-turn rewards let the trainer credit each turn with the rewards from it on: the
call's tokens with both, the answer's with the answer's only, so the answer is not trained on
the noise of the call (after a wrong call the tool answers "?" or another product, and the
policy would have to know the product itself).
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


def turn_rewards(row, call: str, answer: str) -> list[float]:
    """The rewards of the two model turns: the call's, the answer's."""
    return [0.5 * partial(row.text, call), 0.5 * partial(row.answer, answer)]


async def episode(ctx, row) -> list[float]:
    call = await ctx.generate(max_new_tokens=CALL_TOKENS)
    # The tool's answer goes back as a tool message: ctx.chat renders the conversation with the
    # model's chat template, appends what is new (the call's closing tokens if the turn ran
    # out of budget, the tool message, the next assistant header) as masked context, and
    # samples the next turn.
    messages = [
        {"role": "user", "content": row.text},
        {"role": "assistant", "content": call.text},
        {"role": "tool", "content": calculator(call.text)},
    ]
    answer = await ctx.chat(messages, max_new_tokens=ANSWER_TOKENS)
    return turn_rewards(row, call.text, answer.text)
