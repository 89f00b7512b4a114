"""examples/tool_task.py's agent written against the OpenAI client, unchanged by training.

Set ``rollout.episode: tool_task_openai:episode`` and ``rollout.openai_endpoint: true``: each
episode gets its own base URL (``ctx.openai_base_url``) on the worker's OpenAI-compatible
endpoint, which renders the messages with the model's chat template, samples with the
worker's sampler and records the exact tokens (docs/agents.md). The trajectory equals the one
``tool_task:episode`` makes through ``ctx`` (tests/integration/test_episodes_openai.py).
Needs the ``openai`` package (``pip install openai``).
"""

from __future__ import annotations

import openai
from tool_task import ANSWER_TOKENS, CALL_TOKENS, calculator, turn_rewards


async def episode(ctx, row) -> list[float]:
    async with openai.AsyncOpenAI(
        base_url=ctx.openai_base_url, api_key="unused", max_retries=0
    ) as client:
        messages = [{"role": "user", "content": row.text}]
        r = await client.chat.completions.create(
            model="policy", messages=messages, max_tokens=CALL_TOKENS
        )
        call = r.choices[0].message.content or ""
        messages += [
            {"role": "assistant", "content": call},
            {"role": "tool", "tool_call_id": "calc", "content": calculator(call)},
        ]
        r = await client.chat.completions.create(
            model="policy", messages=messages, max_tokens=ANSWER_TOKENS
        )
        answer = r.choices[0].message.content or ""
    return turn_rewards(row, call, answer)
