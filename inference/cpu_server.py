"""CPU reference inference server: a transformers causal LM behind SGLang's HTTP subset.

Speaks shared/SGLANG_PROTOCOL.md (token ids in, token ids out, as SGLang with
``--skip-tokenizer-init``) so that the one worker client is exercised by tests on CPU.
Start it with ``sluice serve --model DIR --port P``.

Batching choice. transformers 5 ships a continuous-batching manager (``generate_batch`` /
``init_continuous_batching``, paged attention), but it samples inside its own loop with one
generation config: no per-request seed, temperature or top-p/top-k, log-probs of the
*filtered* distribution, and no way to return a running request's partial output on abort.
So this server keeps its own small scheduler around the plain model forward:

- One running batch whose KV cache is a ``DynamicCache`` built from per-layer tensors
  ``[B, kv_heads, L, head_dim]``, **left-padded**, with a ``[B, L]`` attention mask and
  explicit ``position_ids`` (the count of real tokens before each one), exactly what
  ``generate`` does with left padding.
- Each scheduler step: one decode forward of every running row, then one batched prefill of the
  requests that arrived since (up to ``max_batch`` rows in all); the new rows' caches are
  left-padded to a common length and concatenated to the running batch, so a request joins at
  the next step. Finished or aborted rows are dropped with ``index_select``; all-padding
  columns on the left are trimmed.
- The model runs in one executor thread; every mutation of the batch (steps, aborts, pauses,
  weight loads) happens under one ``asyncio.Lock``, so HTTP handlers never see a half step.

Invariants (tests/test_cpu_server.py):
- ``output_token_logprobs[i][0] == log_softmax(logits_i / T)[token_i]`` of the full
  distribution, before top-p/top-k (T=1 is used for the report when T=0, greedy), float32, to
  1e-4 of an unbatched transformers forward over prompt + output
  (``test_logprobs_match_transformers_forward``).
- Every token is stamped with the weight version it was sampled under (``weight_versions``
  spans); a request aborted by ``update_weights_from_disk(abort_all_requests=true)`` returns
  before the load and reports the old version (``test_pause_abort_resume_and_update``).
- Finish order as SGLang: ``length`` when ``max_new_tokens`` is reached (checked first), else
  ``stop`` on an EOS (from the generation config) or a ``stop_token_ids`` id; ``ignore_eos``
  disables both, as SGLang's ``_check_token_based_finish`` does.
- A bad request is answered 400 ``{"error": {"message": ...}}`` naming the problem and never
  reaches the model; token ids are checked against the vocabulary
  (``test_bad_requests_get_400_and_server_keeps_serving``).
- No prefix cache: ``flush_cache`` is a no-op when idle. A weight update during an
  ``in_place`` pause keeps the running rows' old-weight KV (as SGLang does); their later
  tokens carry the new version.

Distributed updates (``/init_weights_update_group``): gloo only. The server joins with public
torch APIs: ``TCPStore(master_address, master_port, world_size, is_master=False)`` wrapped in
``PrefixStore(group_name + "/", store)`` and ``ProcessGroupGloo(prefix_store, rank_offset,
world_size)``. The sender (rank 0) builds the same from a master ``TCPStore`` and, per
``/update_weights_from_distributed`` call, broadcasts each tensor of ``names`` in order from
rank 0 (``test_distributed_update_matches_sender``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from inference.models import eos_token_ids, load_model, load_state_dict

log = logging.getLogger("sluice.cpu_server")

SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop_token_ids",
        "ignore_eos",
        "sampling_seed",
    }
)
GENERATE_KEYS = frozenset(
    {
        "rid",
        "input_ids",
        "sampling_params",
        "return_logprob",
        "logprob_start_len",
        "stream",
        "top_logprobs_num",
        "return_text_in_logprobs",
    }
)
DEFAULT_MAX_NEW_TOKENS = 128


class BadRequest(ValueError):
    """A request refused with HTTP 400; the message names what was wrong."""


class EngineFailure(RuntimeError):
    """The model forward raised; the affected requests are answered 500."""


# --------------------------------------------------------------------------------------------
# Requests and sampling


@dataclass
class Sampling:
    """Validated ``sampling_params`` of one request (SGLang defaults)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    sampling_seed: int | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_sampling(raw: Any, vocab_size: int) -> Sampling:
    """Check ``sampling_params``; raise ``BadRequest`` naming the first bad key or value."""
    if raw is None:
        return Sampling()
    if not isinstance(raw, dict):
        raise BadRequest(f"sampling_params must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - SAMPLING_KEYS)
    if unknown:
        raise BadRequest(
            f"unknown sampling_params key(s) {unknown}; supported: {sorted(SAMPLING_KEYS)}"
        )
    s = Sampling()
    if raw.get("max_new_tokens") is not None:
        v = raw["max_new_tokens"]
        if not _is_int(v) or v < 0:
            raise BadRequest(f"max_new_tokens must be a non-negative integer, got {v!r}")
        s.max_new_tokens = v
    if raw.get("temperature") is not None:
        v = raw["temperature"]
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise BadRequest(f"temperature must be a non-negative finite number, got {v!r}.")
        s.temperature = float(v)
    if raw.get("top_p") is not None:
        v = raw["top_p"]
        if not _is_number(v) or not 0 < v <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {v!r}")
        s.top_p = float(v)
    if raw.get("top_k") is not None:
        v = raw["top_k"]
        if not _is_int(v) or (v < 1 and v != -1):
            raise BadRequest(f"top_k must be -1 (whole vocabulary) or >= 1, got {v!r}")
        s.top_k = v
    if raw.get("stop_token_ids") is not None:
        v = raw["stop_token_ids"]
        if not isinstance(v, list) or not all(_is_int(t) for t in v):
            raise BadRequest(f"stop_token_ids must be a list of integers, got {v!r}")
        bad = [t for t in v if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
        s.stop_token_ids = frozenset(v)
    if raw.get("ignore_eos") is not None:
        v = raw["ignore_eos"]
        if not isinstance(v, bool):
            raise BadRequest(f"ignore_eos must be a boolean, got {v!r}")
        s.ignore_eos = v
    if raw.get("sampling_seed") is not None:
        v = raw["sampling_seed"]
        if not _is_int(v) or v < 0:
            raise BadRequest(f"sampling_seed must be a non-negative integer, got {v!r}")
        s.sampling_seed = v
    return s


@dataclass(eq=False)
class Req:
    """One generate request inside the engine.

    ``output_ids``/``logprobs``/``versions`` grow together (one entry per sampled token);
    the last sampled token is not yet in the KV cache (the next decode step feeds it).
    """

    rid: str
    input_ids: list[int]
    sampling: Sampling
    return_logprob: bool
    generator: torch.Generator | None
    future: asyncio.Future[Req]
    created: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    weight_version: str = ""


def sample_rows(logits: torch.Tensor, reqs: list[Req]) -> tuple[list[int], list[float]]:
    """Pick one token per row of ``logits [n, V]`` and its reported log-prob.

    The log-prob is ``log_softmax(logits / T)`` of the full distribution (T=1 when T=0), as
    SGLang reports it. T=0 takes the argmax. T>0 applies top-k then top-p to
    ``softmax(logits / T)`` and inverts the row's CDF at one uniform draw from the request's
    own generator (so a ``sampling_seed`` reproduces whatever else is in the batch).
    """
    temps = torch.tensor(
        [r.sampling.temperature if r.sampling.temperature > 0 else 1.0 for r in reqs],
        dtype=logits.dtype,
    )
    logp = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    rows = [i for i, r in enumerate(reqs) if r.sampling.temperature > 0]
    if rows:
        probs = logp[rows].exp()
        vocab = probs.shape[-1]
        for j, i in enumerate(rows):
            s = reqs[i].sampling
            if 0 < s.top_k < vocab:
                kth = torch.topk(probs[j], s.top_k).values[-1]
                probs[j] = torch.where(probs[j] >= kth, probs[j], 0.0)
            if s.top_p < 1.0:
                sorted_p, order = torch.sort(probs[j], descending=True)
                csum = torch.cumsum(sorted_p, dim=-1)
                drop = (csum - sorted_p) > s.top_p * csum[-1]
                probs[j] = torch.zeros_like(sorted_p).scatter(
                    0, order, sorted_p.masked_fill(drop, 0.0)
                )
        u = torch.cat([torch.rand(1, generator=reqs[i].generator) for i in rows])
        cdf = torch.cumsum(probs.double(), dim=-1)
        picked = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)[:, 0]
        tokens[rows] = picked.clamp(max=vocab - 1)
    lps = logp.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), lps.tolist()


# --------------------------------------------------------------------------------------------
# The engine: a left-padded running batch with a KV cache (runs in the executor thread)


class Engine:
    """The model and its running batch. Not thread-safe: the server serialises every call."""

    def __init__(
        self, model_path: str, weight_version: str, max_batch: int, dtype: str = "float32"
    ) -> None:
        self.model_path = str(model_path)
        self.model = load_model(model_path, dtype=dtype)
        self.config = self.model.config
        self.vocab_size = int(self.config.vocab_size)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 1 << 30))
        self.eos_ids = frozenset(eos_token_ids(model_path))
        # transformers 5.x renamed ``past_key_values`` to ``cache``; 4.x knows only the former.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.weight_version = weight_version
        self.max_batch = max_batch
        self.rows: list[Req] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    # ---- forward helpers

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        new_kv = [(k, v) for k, v, *_ in cache]
        logits = out.logits[:, -1, :]
        return (logits if logits.dtype == torch.float64 else logits.float()), new_kv

    def _append(self, req: Req, token: int, logprob: float) -> None:
        req.output_ids.append(token)
        req.logprobs.append(logprob)
        req.versions.append(self.weight_version)
        s = req.sampling
        if (
            len(req.output_ids) >= s.max_new_tokens
            or len(req.input_ids) + len(req.output_ids) >= self.max_positions
        ):
            req.finish_reason = {"type": "length", "length": len(req.output_ids)}
        elif not s.ignore_eos and (token in self.eos_ids or token in s.stop_token_ids):
            req.finish_reason = {"type": "stop", "matched": token}
        if req.finish_reason is not None:
            req.weight_version = self.weight_version

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.kv, self.mask = [], torch.zeros(0, 0, dtype=torch.long)
            return
        self.kv = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.kv]
        self.mask = self.mask.index_select(0, idx)
        used = self.mask.any(dim=0)
        first = int(torch.argmax(used.to(torch.int8)))
        if first > 0:
            self.kv = [(k[:, :, first:], v[:, :, first:]) for k, v in self.kv]
            self.mask = self.mask[:, first:]

    @staticmethod
    def _pad_left(
        kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, length: int
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        extra = length - mask.shape[1]
        if extra <= 0:
            return kv, mask
        out = []
        for k, v in kv:
            pad = k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])
            out.append((torch.cat([pad, k], dim=2), torch.cat([pad, v], dim=2)))
        return out, torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1)

    # ---- one scheduler step

    @torch.inference_mode()
    def step(self, admitted: list[Req]) -> list[Req]:
        """Decode every running row once, then prefill ``admitted`` into the batch.

        Returns the requests that finished in this step (already removed from the batch).
        """
        finished: list[Req] = []
        if self.rows:
            last = torch.tensor([[r.output_ids[-1]] for r in self.rows], dtype=torch.long)
            pos = torch.tensor(
                [[len(r.input_ids) + len(r.output_ids) - 1] for r in self.rows], dtype=torch.long
            )
            mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            logits, self.kv = self._forward(last, mask, pos, self.kv)
            self.mask = mask
            tokens, lps = sample_rows(logits, self.rows)
            keep = []
            for i, (r, t, lp) in enumerate(zip(self.rows, tokens, lps, strict=True)):
                self._append(r, t, lp)
                if r.finish_reason is None:
                    keep.append(i)
                else:
                    finished.append(r)
            self._keep_rows(keep)
        if admitted:
            width = max(len(r.input_ids) for r in admitted)
            ids = torch.zeros(len(admitted), width, dtype=torch.long)
            mask = torch.zeros(len(admitted), width, dtype=torch.long)
            for i, r in enumerate(admitted):
                n = len(r.input_ids)
                ids[i, width - n :] = torch.tensor(r.input_ids, dtype=torch.long)
                mask[i, width - n :] = 1
            pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits, kv = self._forward(ids, mask, pos, [])
            tokens, lps = sample_rows(logits, admitted)
            keep = []
            for i, (r, t, lp) in enumerate(zip(admitted, tokens, lps, strict=True)):
                self._append(r, t, lp)
                if r.finish_reason is None:
                    keep.append(i)
                else:
                    finished.append(r)
            if keep:
                idx = torch.tensor(keep, dtype=torch.long)
                kv = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in kv]
                mask = mask.index_select(0, idx)
                if self.rows:
                    length = max(mask.shape[1], self.mask.shape[1])
                    kv, mask = self._pad_left(kv, mask, length)
                    self.kv, self.mask = self._pad_left(self.kv, self.mask, length)
                    self.kv = [
                        (torch.cat([k0, k1]), torch.cat([v0, v1]))
                        for (k0, v0), (k1, v1) in zip(self.kv, kv, strict=True)
                    ]
                    self.mask = torch.cat([self.mask, mask])
                else:
                    self.kv, self.mask = kv, mask
                self.rows += [admitted[i] for i in keep]
        return finished

    def remove(self, reqs: set[Req]) -> None:
        """Drop ``reqs`` from the running batch (their outputs so far stay on them)."""
        self._keep_rows([i for i, r in enumerate(self.rows) if r not in reqs])

    # ---- weights

    def load_weights(self, state: dict[str, torch.Tensor], *, complete: bool = True) -> None:
        """Copy ``state`` into the model after checking every name and shape (all or nothing).

        ``complete``: every parameter must be present (a checkpoint); a distributed bucket
        may carry a subset.
        """
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"weights not in the model: {unknown[:5]}")
        tied = "lm_head.weight" if getattr(self.config, "tie_word_embeddings", False) else None
        missing = sorted(
            n for n, p in self.model.named_parameters() if n not in state and n != tied
        )
        if complete and missing:
            raise ValueError(f"weights missing from the update: {missing[:5]}")
        for name, t in state.items():
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"shape of {name} is {list(t.shape)}, the model has {list(params[name].shape)}"
                )
        with torch.no_grad():
            for name, t in state.items():
                params[name].copy_(t.to(params[name].dtype))

    def load_from_disk(self, model_path: str) -> None:
        self.load_weights(load_state_dict(model_path))
        self.model_path = str(model_path)


# --------------------------------------------------------------------------------------------
# The HTTP server


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


class CPUServer:
    """aiohttp app around one ``Engine``; see the module docstring for the scheduling rules."""

    def __init__(
        self,
        engine: Engine,
        *,
        admin_api_key: str | None = None,
        seed: int = 0,
        threads: int = 1,
    ) -> None:
        self.engine = engine
        self.admin_api_key = admin_api_key
        self.rng = torch.Generator().manual_seed(seed)
        self.threads = threads
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-engine")
        self.lock = asyncio.Lock()
        self.work = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.admit_open = asyncio.Event()
        self.admit_open.set()
        self.paused = False
        self.waiting: list[Req] = []
        self.inflight: dict[str, Req] = {}
        self.groups: dict[str, Any] = {}
        self._loop_task: asyncio.Task[None] | None = None
        # Read-only counters for /model_info (benchmarks): seconds the model spent in engine
        # steps (decode + prefill), steps taken, /generate requests received, since start.
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.engine_steps = 0
        self.requests = 0

    # ---- plumbing

    async def _in_executor(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _has_work(self) -> bool:
        return bool(self.waiting or self.engine.rows)

    def _finish(self, reqs: list[Req]) -> None:
        for r in reqs:
            self.inflight.pop(r.rid, None)
            if not r.future.done():
                r.future.set_result(r)
        if not self._has_work():
            self.idle.set()

    def _fail(self, reqs: list[Req], message: str) -> None:
        """Answer ``reqs`` with HTTP 500 and drop the running batch (its cache may be torn)."""
        self.engine.remove(set(self.engine.rows))
        for r in reqs:
            self.inflight.pop(r.rid, None)
            if not r.future.done():
                r.future.set_exception(EngineFailure(message))
        if not self._has_work():
            self.idle.set()

    def _abort(self, reqs: list[Req], message: str = "Aborted") -> None:
        """Finish ``reqs`` now with their partial outputs (caller holds the lock)."""
        running = {r for r in reqs if r in self.engine.rows}
        if running:
            self.engine.remove(running)
        for r in reqs:
            if r in self.waiting:
                self.waiting.remove(r)
            msg = message if r in running or r.output_ids else "Abort in waiting queue"
            r.finish_reason = {
                "type": "abort",
                "message": msg,
                "status_code": None,
                "err_type": None,
            }
            r.weight_version = self.engine.weight_version
        self._finish(reqs)

    async def _scheduler(self) -> None:
        await self._in_executor(torch.set_num_threads, self.threads)
        while True:
            await self.work.wait()
            async with self.lock:
                if self.paused or not self._has_work():
                    self.work.clear()
                    continue
                room = max(0, self.engine.max_batch - len(self.engine.rows))
                admitted, self.waiting = self.waiting[:room], self.waiting[room:]
                t_step = time.monotonic()
                try:
                    finished = await self._in_executor(self.engine.step, admitted)
                except Exception as e:  # the model failed: fail these requests, keep serving
                    log.exception("engine step failed")
                    self._fail(list(self.engine.rows) + admitted, f"engine step failed: {e!r}")
                    continue
                finally:
                    self.busy_s += time.monotonic() - t_step
                    self.engine_steps += 1
                self._finish(finished)
            await asyncio.sleep(0)

    async def on_startup(self, app: web.Application) -> None:
        self._loop_task = asyncio.create_task(self._scheduler())

    async def on_cleanup(self, app: web.Application) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self.executor.shutdown(wait=True)

    def _authorized(self, request: web.Request) -> bool:
        if not self.admin_api_key:
            return True
        return request.headers.get("Authorization", "") == f"Bearer {self.admin_api_key}"

    async def _json_body(self, request: web.Request, *, allow_empty: bool = True) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            if allow_empty:
                return {}
            raise BadRequest("request body is empty; expected a JSON object")
        try:
            import json

            body = json.loads(raw)
        except ValueError as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    # ---- /generate

    def _parse_generate(self, body: dict[str, Any]) -> tuple[str, list[int], Sampling, bool]:
        if "text" in body:
            raise BadRequest(
                "text prompts are not supported (the server runs with --skip-tokenizer-init "
                "semantics): send input_ids"
            )
        unknown = sorted(set(body) - GENERATE_KEYS)
        if unknown:
            raise BadRequest(
                f"unknown request key(s) {unknown}; supported: {sorted(GENERATE_KEYS)}"
            )
        if "input_ids" not in body:
            raise BadRequest("input_ids is missing")
        ids = body["input_ids"]
        if not isinstance(ids, list):
            raise BadRequest(f"input_ids must be a list of integers, got {type(ids).__name__}")
        if not ids:
            raise BadRequest("input_ids cannot be empty.")
        if isinstance(ids[0], list):
            raise BadRequest(
                "batched input_ids (a list of lists) are not supported: one prompt per call"
            )
        vocab = self.engine.vocab_size
        for i, t in enumerate(ids):
            if not _is_int(t):
                raise BadRequest(f"input_ids[{i}] = {t!r} is not an integer")
            if not 0 <= t < vocab:
                raise BadRequest(f"input_ids[{i}] = {t} is outside the vocabulary [0, {vocab})")
        sampling = parse_sampling(body.get("sampling_params"), vocab)
        total = len(ids) + sampling.max_new_tokens
        if total > self.engine.max_positions:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of "
                f"{self.engine.max_positions} tokens: {len(ids)} input + "
                f"{sampling.max_new_tokens} max_new_tokens = {total}"
            )
        ret = body.get("return_logprob", False)
        if not isinstance(ret, bool):
            raise BadRequest(f"return_logprob must be a boolean, got {ret!r}")
        if body.get("logprob_start_len", -1) not in (-1, None):
            raise BadRequest(
                "logprob_start_len other than -1 (input-token log-probs) is not supported"
            )
        if body.get("top_logprobs_num") not in (None, 0):
            raise BadRequest("top_logprobs_num is not supported (send 0 or leave it out)")
        if body.get("stream"):
            raise BadRequest("stream=true is not supported by the CPU server")
        rid = body.get("rid")
        if rid is None:
            rid = uuid.uuid4().hex
        if not isinstance(rid, str) or not rid:
            raise BadRequest(f"rid must be a non-empty string, got {rid!r}")
        return rid, list(ids), sampling, ret

    def _response(self, r: Req) -> dict[str, Any]:
        spans: list[dict[str, Any]] = []
        for i, v in enumerate(r.versions):
            if spans and spans[-1]["version"] == v:
                spans[-1]["end"] = i + 1
            else:
                spans.append({"version": v, "start": i, "end": i + 1})
        meta: dict[str, Any] = {
            "id": r.rid,
            "finish_reason": r.finish_reason,
            "prompt_tokens": len(r.input_ids),
            "completion_tokens": len(r.output_ids),
            "cached_tokens": 0,
            "weight_version": r.weight_version,
            "weight_versions": spans,
        }
        if r.return_logprob:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [
                [lp, t, None] for lp, t in zip(r.logprobs, r.output_ids, strict=True)
            ]
        meta["e2e_latency"] = time.perf_counter() - r.created
        return {"output_ids": r.output_ids, "meta_info": meta}

    async def generate(self, request: web.Request) -> web.Response:
        created = time.perf_counter()
        try:
            body = await self._json_body(request, allow_empty=False)
            rid, ids, sampling, ret = self._parse_generate(body)
        except BadRequest as e:
            return _error(400, str(e))
        if rid in self.inflight:
            return _error(400, f"Duplicate request ID: {rid}")
        self.requests += 1
        seed = sampling.sampling_seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
        gen = torch.Generator().manual_seed(seed) if sampling.temperature > 0 else None
        req = Req(
            rid=rid,
            input_ids=ids,
            sampling=sampling,
            return_logprob=ret,
            generator=gen,
            future=asyncio.get_running_loop().create_future(),
            created=created,
        )
        self.inflight[rid] = req
        try:
            if sampling.max_new_tokens == 0:
                req.finish_reason = {"type": "length", "length": 0}
                req.weight_version = self.engine.weight_version
                self._finish([req])
            else:
                await self.admit_open.wait()
                self.waiting.append(req)
                self.idle.clear()
                self.work.set()
            done = await req.future
        except EngineFailure as e:
            return _error(500, str(e))
        except asyncio.CancelledError:
            # The client went away: free the slot (under the lock, between two steps).
            asyncio.get_running_loop().create_task(self._abort_later([req]))
            raise
        return web.json_response(self._response(done))

    async def _abort_later(self, reqs: list[Req]) -> None:
        async with self.lock:
            self._abort([r for r in reqs if not r.future.done()])

    # ---- control endpoints

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        mode = body.get("mode", "abort")
        if mode == "retract":
            return _error(
                400,
                "pause mode 'retract' is not supported by the CPU server; use 'abort' or 'in_place'",
            )
        if mode not in ("abort", "in_place"):
            return _error(400, f"unknown pause mode {mode!r}; expected 'abort' or 'in_place'")
        async with self.lock:
            self.paused = True
            if mode == "abort":
                self._abort(list(self.engine.rows) + list(self.waiting))
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await self._json_body(request)
        async with self.lock:
            self.paused = False
            if self._has_work():
                self.work.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        rid = body.get("rid")
        abort_all = body.get("abort_all", False)
        if not abort_all and not isinstance(rid, str):
            return _error(400, 'abort_request needs {"rid": "<prefix>"} or {"abort_all": true}')
        async with self.lock:
            pending = list(self.engine.rows) + list(self.waiting)
            if abort_all:
                targets = pending
            else:
                assert isinstance(rid, str)
                targets = [r for r in pending if r.rid.startswith(rid)]
            self._abort(targets)
        return web.Response(status=200)

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self._has_work():
            return web.Response(
                status=400, text="Cache not flushed: there are running or waiting requests.\n"
            )
        return web.Response(text="Cache flushed.\n")

    async def _update(
        self, request: web.Request, load: Callable[[dict[str, Any]], Awaitable[str]]
    ) -> web.Response:
        try:
            body = await self._json_body(request, allow_empty=False)
        except BadRequest as e:
            return _error(400, str(e))
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str | int):
            return _error(400, f"weight_version must be a string, got {version!r}")
        abort_all = bool(body.get("abort_all_requests", False))
        try:
            if not abort_all and not self.paused:
                # SGLang's rule: hold new requests, let the in-flight ones finish, then load.
                self.admit_open.clear()
                await self.idle.wait()
            async with self.lock:
                if abort_all:
                    # Partial outputs go back labelled with the old version, before the load.
                    self._abort(list(self.engine.rows) + list(self.waiting))
                try:
                    message = await load(body)
                except (ValueError, OSError, RuntimeError, KeyError, TypeError) as e:
                    log.warning("weight update failed: %s", e)
                    return web.json_response(
                        {"success": False, "message": f"Failed to update weights: {e}"}, status=400
                    )
                if version is not None:
                    self.engine.weight_version = str(version)
        finally:
            self.admit_open.set()
        log.info("weights updated (%s); version %s", message, self.engine.weight_version)
        return web.json_response(
            {
                "success": True,
                "message": f"Succeeded to update model weights. Weight version updated to "
                f"{self.engine.weight_version}.",
                "num_paused_requests": 0,
            }
        )

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        async def load(body: dict[str, Any]) -> str:
            path = body.get("model_path")
            if not isinstance(path, str) or not path:
                raise ValueError("model_path is missing")
            await self._in_executor(self.engine.load_from_disk, path)
            return f"from {path}"

        return await self._update(request, load)

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request, allow_empty=False)
            for key in ("master_address", "master_port", "rank_offset", "world_size"):
                if key not in body:
                    raise BadRequest(f"{key} is missing")
            backend = body.get("backend", "gloo")
            if backend != "gloo":
                raise BadRequest(
                    f"backend {backend!r} is not supported by the CPU server; use 'gloo'"
                )
        except BadRequest as e:
            return _error(400, str(e))
        name = str(body.get("group_name", "weights"))
        if name in self.groups:
            return web.json_response(
                {"success": False, "message": f"weight update group {name!r} already exists"},
                status=400,
            )

        def join() -> Any:
            from datetime import timedelta

            import torch.distributed as dist

            timeout = timedelta(seconds=float(body.get("timeout_s", 120)))
            store = dist.TCPStore(
                str(body["master_address"]),
                int(body["master_port"]),
                int(body["world_size"]),
                is_master=False,
                timeout=timeout,
            )
            prefixed = dist.PrefixStore(name + "/", store)
            group = dist.ProcessGroupGloo(
                prefixed, int(body["rank_offset"]), int(body["world_size"]), timeout
            )
            return store, group

        try:
            self.groups[name] = await self._in_executor(join)
        except (RuntimeError, OSError, ValueError) as e:
            return web.json_response(
                {"success": False, "message": f"Failed to init group: {e}"}, status=400
            )
        return web.json_response(
            {"success": True, "message": "Succeeded to initialize custom process group."}
        )

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        async def load(body: dict[str, Any]) -> str:
            name = str(body.get("group_name", "weights"))
            if name not in self.groups:
                raise ValueError(
                    f"no weight update group {name!r}: call /init_weights_update_group"
                )
            names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
            if not (
                isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
            ):
                raise ValueError("names, dtypes and shapes must be lists")
            if not len(names) == len(dtypes) == len(shapes):
                raise ValueError("names, dtypes and shapes must have the same length")
            _, group = self.groups[name]

            def receive() -> None:
                import torch.distributed as dist

                state = {}
                for n, dt, shape in zip(names, dtypes, shapes, strict=True):
                    t = torch.empty([int(s) for s in shape], dtype=getattr(torch, str(dt)))
                    opts = dist.BroadcastOptions()
                    opts.rootRank = 0
                    group.broadcast([t], opts).wait()
                    state[str(n)] = t
                self.engine.load_weights(state, complete=False)

            await self._in_executor(receive)
            return f"{len(names)} tensors from group {name}"

        return await self._update(request, load)

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        """SGLang's debugging endpoint: ``{"name", "truncate_size"}`` -> the first rows as lists."""
        try:
            body = await self._json_body(request, allow_empty=False)
        except BadRequest as e:
            return _error(400, str(e))
        name, size = body.get("name"), body.get("truncate_size", 100)
        params = dict(self.engine.model.named_parameters())
        if name not in params:
            return _error(400, f"no parameter named {name!r}")
        if not _is_int(size) or size < 1:
            return _error(400, f"truncate_size must be a positive integer, got {size!r}")
        async with self.lock:
            value = params[name].detach()[:size].tolist()
        return web.json_response(value)

    async def model_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        return web.json_response(
            {
                "model_path": self.engine.model_path,
                "tokenizer_path": None,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": self.engine.weight_version,
                "model_type": cfg.model_type,
                "architectures": list(cfg.architectures or []),
                "vocab_size": self.engine.vocab_size,
                "max_position_embeddings": self.engine.max_positions,
                "eos_token_ids": sorted(self.engine.eos_ids),
                # Not in SGLang's answer (CPU server only): busy_s / uptime_s = utilisation.
                "busy_s": round(self.busy_s, 6),
                "engine_steps": self.engine_steps,
                "requests": self.requests,
                "uptime_s": round(time.monotonic() - self.started, 6),
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.paused else 200)

    async def health_generate(self, request: web.Request) -> web.Response:
        if self.paused:
            return web.Response(status=200)
        loop = asyncio.get_running_loop()
        req = Req(
            rid="health-" + uuid.uuid4().hex,
            input_ids=[0],
            sampling=Sampling(max_new_tokens=1, temperature=0.0),
            return_logprob=False,
            generator=None,
            future=loop.create_future(),
        )
        self.inflight[req.rid] = req
        self.waiting.append(req)
        self.idle.clear()
        self.work.set()
        try:
            await asyncio.wait_for(asyncio.shield(req.future), timeout=20)
        except TimeoutError:
            return web.Response(status=503, text="generation did not finish within 20 s")
        return web.Response(status=200)

    # ---- app

    def app(self) -> web.Application:
        @web.middleware
        async def guard(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.path in ADMIN_PATHS and not self._authorized(request):
                return _error(
                    401, "Unauthorized: this endpoint needs Authorization: Bearer <admin key>"
                )
            try:
                return await handler(request)
            except BadRequest as e:
                return _error(400, str(e))

        app = web.Application(middlewares=[guard], client_max_size=64 * 1024 * 1024)
        routes = [
            ("POST", "/generate", self.generate),
            ("POST", "/pause_generation", self.pause_generation),
            ("POST", "/continue_generation", self.continue_generation),
            ("POST", "/abort_request", self.abort_request),
            ("POST", "/flush_cache", self.flush_cache),
            ("GET", "/flush_cache", self.flush_cache),
            ("POST", "/update_weights_from_disk", self.update_weights_from_disk),
            ("POST", "/init_weights_update_group", self.init_weights_update_group),
            ("POST", "/update_weights_from_distributed", self.update_weights_from_distributed),
            ("GET", "/model_info", self.model_info),
            ("POST", "/get_weights_by_name", self.get_weights_by_name),
            ("GET", "/get_weights_by_name", self.get_weights_by_name),
            ("GET", "/get_model_info", self.model_info),
            ("GET", "/health", self.health),
            ("GET", "/health_generate", self.health_generate),
            ("GET", "/ready", self.ready),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app


ADMIN_PATHS = frozenset(
    {
        "/pause_generation",
        "/continue_generation",
        "/abort_request",
        "/flush_cache",
        "/update_weights_from_disk",
        "/init_weights_update_group",
        "/update_weights_from_distributed",
    }
)


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 30000,
    weight_version: str = "0",
    admin_api_key: str | None = None,
    max_batch: int = 64,
    threads: int = 1,
    seed: int = 0,
    dtype: str = "float32",
) -> None:
    """Load ``model`` (in ``dtype``: float32, or float64 for bit-tight checks) and serve it
    until SIGTERM/SIGINT (blocking)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    engine = Engine(model, weight_version, max_batch, dtype=dtype)
    server = CPUServer(engine, admin_api_key=admin_api_key, seed=seed, threads=threads)
    log.info(
        "serving %s (%s, vocab %d) on http://%s:%d, weight version %s",
        model,
        engine.config.model_type,
        engine.vocab_size,
        host,
        port,
        weight_version,
    )
    web.run_app(server.app(), host=host, port=port, print=None, access_log=None)


# --------------------------------------------------------------------------------------------
# A server process started by pid (tests, benchmarks)


class CPUServerProcess:
    """``sluice serve`` as a child process on ``port``; stopped by its own pid."""

    def __init__(
        self,
        model: str | Path,
        *,
        port: int,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.model, self.port, self.host = str(model), port, host
        self.extra_args = extra_args or []
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> CPUServerProcess:
        import urllib.error
        import urllib.request

        args = [sys.executable, "-m", "sluice", "serve", "--model", self.model]
        args += ["--host", self.host, "--port", str(self.port), *self.extra_args]
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""
                raise RuntimeError(f"sluice serve exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"CPU server on {self.url} not healthy within {timeout}s")

    def stop(self) -> None:
        from procs import stop_pid

        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def __enter__(self) -> CPUServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
