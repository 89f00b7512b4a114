"""An OpenAI-compatible ``/v1/chat/completions`` for the episodes a worker runs.

With ``rollout.openai_endpoint: true`` the worker serves HTTP on ``rollout.openai_host`` /
``openai_port`` (0: a free port) and every episode gets its own base URL,
``ctx.openai_base_url`` = ``http://HOST:PORT/episodes/<id>/v1``. An agent written against the
OpenAI client is pointed at it and runs unchanged::

    client = openai.AsyncOpenAI(base_url=ctx.openai_base_url, api_key="sluice")
    r = await client.chat.completions.create(model="policy", messages=[...])

The sampling temperature is the rollout's (``rollout.temperature``: the trainer takes its
log-probs at it); a request's ``temperature`` is ignored. Each request is one model turn of that episode (``EpisodeContext.chat``): the request's
messages are rendered with the task's chat template; the text must extend the episode's
tokens so far (decoded), and only the new text (the tool's or user's message and the next
assistant header) is encoded and appended, masked; the completion is sampled by the worker's
sampler from exactly those tokens. So the trajectory holds the tokens the server sampled, never
a re-tokenization of the conversation; a request whose conversation does not extend the
episode's (a rewritten earlier turn, another system prompt) is refused with 400 naming where
they part. Supported: ``messages``, ``max_tokens`` / ``max_completion_tokens``, ``n = 1``,
no ``stream``; other fields are ignored. ``GET
/episodes/<id>/v1/models`` lists the one model. An id that is not (or no longer) running
answers 404.

Invariant (tests/integration/test_episodes_openai.py): an episode driven through this endpoint
yields the same trajectory (ids, mask, turns, log-probs, versions) as the same episode through
``ctx``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from rollout_workers.episodes import EpisodeContext

log = logging.getLogger("sluice.rollout")

MODEL_NAME = "sluice-policy"


class ConversationError(ValueError):
    """A chat request that cannot continue its episode; answered with 400 and this message."""


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind}}, status=status)


class OpenAIEndpoint:
    """The HTTP shell: episode ids -> contexts; ``start()`` before use, ``close()`` at the end."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.episodes: dict[str, EpisodeContext] = {}
        self.completions = 0
        self._runner: web.AppRunner | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        """Listen (once: concurrent episodes of a group all call it)."""
        async with self._starting:
            if self._runner is None:
                await self._listen()

    async def _listen(self) -> None:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_post("/episodes/{eid}/v1/chat/completions", self._chat)
        app.router.add_get("/episodes/{eid}/v1/models", self._models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1])
        self._runner = runner
        log.info("episodes' OpenAI-compatible endpoint on http://%s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def register(self, ctx: EpisodeContext) -> str:
        """Serve ``ctx`` under a new id; returns its base URL."""
        eid = uuid.uuid4().hex
        self.episodes[eid] = ctx
        return f"http://{self.host}:{self.port}/episodes/{eid}/v1"

    def unregister(self, base_url: str) -> None:
        self.episodes.pop(base_url.rstrip("/").split("/")[-2], None)

    async def _models(self, request: web.Request) -> web.Response:
        if request.match_info["eid"] not in self.episodes:
            return _error(404, "no such episode (finished, or never started)", "not_found_error")
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "sluice"}],
            }
        )

    async def _chat(self, request: web.Request) -> web.Response:
        ctx = self.episodes.get(request.match_info["eid"])
        if ctx is None:
            return _error(404, "no such episode (finished, or never started)", "not_found_error")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        try:
            messages, max_tokens = parse_request(body)
            turn = await ctx.chat(messages, max_new_tokens=max_tokens)
        except ConversationError as e:
            return _error(400, str(e))
        self.completions += 1
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or MODEL_NAME,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": turn.text or ""},
                        "finish_reason": "stop" if turn.finish_reason == "stop" else "length",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": len(ctx.context_ids) - len(turn.ids),
                    "completion_tokens": len(turn.ids),
                    "total_tokens": len(ctx.context_ids),
                },
            }
        )


def parse_request(body: Any) -> tuple[list[dict[str, str]], int | None]:
    """``messages`` and the token budget of a chat request;
    ``ConversationError`` naming the field that is wrong."""
    if not isinstance(body, dict):
        raise ConversationError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ConversationError(f"messages[{i}] must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ConversationError(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content})
    if body.get("stream"):
        raise ConversationError("stream=true is not supported")
    if body.get("n", 1) != 1:
        raise ConversationError("n must be 1 (each episode is one conversation)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConversationError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    return out, max_tokens
