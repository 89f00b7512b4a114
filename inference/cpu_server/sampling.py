"""Requests and sampling of the CPU reference server: what a ``/generate`` body may hold, how
one token per row is picked, and the answer a finished request gets.

Invariants:
- A bad request raises ``BadRequest`` naming the first problem (key, value, or what is not
  supported), so the app answers it 400 ``{"error": {"message": ...}}`` before it reaches the
  model; token ids are checked against the vocabulary (tests/unit/inference/
  test_cpu_server_sampling.py; tests/integration/test_cpu_server.py::
  test_bad_requests_get_400_and_server_keeps_serving).
- ``sample_rows`` reports ``log_softmax(logits_i / T)[token_i]`` of the full distribution,
  before top-p/top-k (T=1 is used for the report when T=0, greedy), and draws each row from the
  request's own generator, so a ``sampling_seed`` reproduces whatever else is in the batch
  (tests/integration/test_cpu_server.py::test_logprobs_match_transformers_forward,
  ::test_seed_reproduces_and_stop_tokens).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

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
        "lora_path",
        "return_text_in_logprobs",
    }
)
DEFAULT_MAX_NEW_TOKENS = 128


class BadRequest(ValueError):
    """A request refused with HTTP 400; the message names what was wrong."""


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


def is_int(v: Any) -> bool:
    """An int that is not a bool (JSON ``true`` is not a token id)."""
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
        if not is_int(v) or v < 0:
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
        if not is_int(v) or (v < 1 and v != -1):
            raise BadRequest(f"top_k must be -1 (whole vocabulary) or >= 1, got {v!r}")
        s.top_k = v
    if raw.get("stop_token_ids") is not None:
        v = raw["stop_token_ids"]
        if not isinstance(v, list) or not all(is_int(t) for t in v):
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
        if not is_int(v) or v < 0:
            raise BadRequest(f"sampling_seed must be a non-negative integer, got {v!r}")
        s.sampling_seed = v
    return s


def parse_json_object(raw: bytes, *, allow_empty: bool = True) -> dict[str, Any]:
    """A request body as a JSON object (``{}`` for an empty body when ``allow_empty``)."""
    if not raw.strip():
        if allow_empty:
            return {}
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


class GenerateRequest(NamedTuple):
    """A validated ``/generate`` body."""

    rid: str
    input_ids: list[int]
    sampling: Sampling
    return_logprob: bool
    lora: str | None = None
    """The adapter the request names (``lora_path``; None: the base model)."""


def _input_ids(body: dict[str, Any], vocab: int) -> list[int]:
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
    for i, t in enumerate(ids):
        if not is_int(t):
            raise BadRequest(f"input_ids[{i}] = {t!r} is not an integer")
        if not 0 <= t < vocab:
            raise BadRequest(f"input_ids[{i}] = {t} is outside the vocabulary [0, {vocab})")
    return list(ids)


def _check_unsupported(body: dict[str, Any]) -> None:
    if body.get("logprob_start_len", -1) not in (-1, None):
        raise BadRequest("logprob_start_len other than -1 (input-token log-probs) is not supported")
    if body.get("top_logprobs_num") not in (None, 0):
        raise BadRequest("top_logprobs_num is not supported (send 0 or leave it out)")
    if body.get("stream"):
        raise BadRequest("stream=true is not supported by the CPU server")


def parse_generate(body: dict[str, Any], *, vocab_size: int, max_positions: int) -> GenerateRequest:
    """Check a ``/generate`` body; raise ``BadRequest`` naming the first problem."""
    if "text" in body:
        raise BadRequest(
            "text prompts are not supported (the server runs with --skip-tokenizer-init "
            "semantics): send input_ids"
        )
    unknown = sorted(set(body) - GENERATE_KEYS)
    if unknown:
        raise BadRequest(f"unknown request key(s) {unknown}; supported: {sorted(GENERATE_KEYS)}")
    ids = _input_ids(body, vocab_size)
    sampling = parse_sampling(body.get("sampling_params"), vocab_size)
    total = len(ids) + sampling.max_new_tokens
    if total > max_positions:
        raise BadRequest(
            f"Requested token count exceeds the model's maximum context length of "
            f"{max_positions} tokens: {len(ids)} input + "
            f"{sampling.max_new_tokens} max_new_tokens = {total}"
        )
    ret = body.get("return_logprob", False)
    if not isinstance(ret, bool):
        raise BadRequest(f"return_logprob must be a boolean, got {ret!r}")
    _check_unsupported(body)
    rid = body.get("rid")
    if rid is None:
        rid = uuid.uuid4().hex
    if not isinstance(rid, str) or not rid:
        raise BadRequest(f"rid must be a non-empty string, got {rid!r}")
    lora = body.get("lora_path")
    if lora is not None and (not isinstance(lora, str) or not lora):
        raise BadRequest(f"lora_path must be the name of a loaded adapter, got {lora!r}")
    return GenerateRequest(rid, ids, sampling, ret, lora)


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
    lora: str | None = None
    """The adapter this request runs with (None: the base model)."""


def generate_response(r: Req) -> dict[str, Any]:
    """SGLang's ``/generate`` answer for a finished ``r``: output ids and ``meta_info`` with
    the weight-version spans of its tokens (and their log-probs when asked)."""
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
