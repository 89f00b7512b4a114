"""Parsing SGLang's answers: pure functions over decoded JSON and raw bodies, numpy only, no HTTP.

The answers are those of the protocol in docs/sglang-protocol.md (token in, token out,
``--skip-tokenizer-init``); ``SGLangClient`` (``inference.client``) sends the calls and hands
their bodies here.

Invariants (tests/unit/inference/test_inference_client_replay.py replays every response
recorded from a live SGLang through the client and these functions):
- ``parse_generate`` returns a ``GenerateResult`` whose ``output_ids`` and ``logprobs`` have
  one length, each log-prob entry naming its own token; any other answer is a
  ``ProtocolError`` that says what is wrong (``test_protocol_errors``).
- Per-token versions come from the ``weight_versions`` spans, which must cover every output
  token exactly once (``test_weight_version_spans_two_versions``); without spans every token
  carries ``weight_version``; a non-numeric version (SGLang's ``"default"``) is None
  (``test_non_numeric_version_is_none``).
- ``error_message`` gives the server's own words from an error body, JSON or text
  (``test_recorded_http_errors``, ``test_error_string_body``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from inference.protocol import FinishReason, GenerateResult, ProtocolError

_FINISH_TYPES: tuple[str, ...] = ("stop", "length", "abort")
_MAX_MESSAGE = 2000


def error_message(raw: bytes) -> str:
    """The server's own words from an error body: ``{"error": {"message": ...}}``,
    ``{"error": "..."}``, ``{"message": ...}``, FastAPI's ``{"detail": ...}``, or the text."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:_MAX_MESSAGE] or "(empty body)"
    msg: Any = body
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            msg = err["message"]
        elif isinstance(err, str):
            msg = err
        elif "message" in body:
            msg = body["message"]
        elif body.get("error_message"):  # SGLang's LoRA answers
            msg = body["error_message"]
        elif "detail" in body:
            msg = body["detail"]
    return (msg if isinstance(msg, str) else json.dumps(msg))[:_MAX_MESSAGE]


def opt_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def opt_float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def parse_version(v: Any) -> int | None:
    """SGLang reports versions as strings (``"12"``); a non-numeric one (SGLang's default
    ``"default"``) is None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def parse_generate(body: Any, rid: str) -> GenerateResult:
    """Parse one non-streaming ``/generate`` answer (see ``GenerateResult`` for invariants).

    Every ``meta_info`` key is optional except ``finish_reason``; ``output_token_logprobs``
    may be absent only when there is no output.
    """
    if not isinstance(body, dict):
        raise ProtocolError(f"/generate {rid}: expected a JSON object, got {type(body).__name__}")
    meta = body.get("meta_info")
    if not isinstance(meta, dict):
        raise ProtocolError(f"/generate {rid}: no meta_info object in the answer")
    finish, finish_message = _finish_reason(meta.get("finish_reason"), rid)
    server_id = meta.get("id")
    if isinstance(server_id, str) and server_id != rid:
        raise ProtocolError(f"/generate: sent rid {rid!r}, answer is for {server_id!r}")
    output_ids, logprobs = _output_tokens(
        body.get("output_ids"), meta.get("output_token_logprobs"), finish, rid
    )
    n = len(output_ids)
    weight_version = parse_version(meta.get("weight_version"))
    token_versions = _token_versions(meta.get("weight_versions"), n, rid)
    if token_versions is None and weight_version is not None:
        token_versions = np.full(n, weight_version, dtype=np.int32)
    return GenerateResult(
        rid=rid,
        output_ids=output_ids,
        logprobs=logprobs,
        finish_reason=finish,
        finish_message=finish_message,
        weight_version=weight_version,
        token_versions=token_versions,
        prompt_tokens=opt_int(meta.get("prompt_tokens")),
        completion_tokens=opt_int(meta.get("completion_tokens")),
        cached_tokens=opt_int(meta.get("cached_tokens")),
        e2e_latency=opt_float(meta.get("e2e_latency")),
        meta_info=meta,
    )


def _finish_reason(fr: Any, rid: str) -> tuple[FinishReason, str | None]:
    """``(type, message)`` of a ``finish_reason`` object; its type must be stop|length|abort."""
    ftype = fr.get("type") if isinstance(fr, dict) else None
    if ftype not in _FINISH_TYPES:
        raise ProtocolError(f"/generate {rid}: finish_reason {fr!r} is not stop|length|abort")
    finish: FinishReason = ftype
    fmsg = fr.get("message") if isinstance(fr, dict) else None
    return finish, fmsg if isinstance(fmsg, str) else None


def _output_tokens(
    ids_raw: Any, lp_raw: Any, finish: FinishReason, rid: str
) -> tuple[np.ndarray, np.ndarray]:
    """``output_ids`` and their ``output_token_logprobs`` as int32 / float32 arrays of one
    length, each log-prob entry naming its own token."""
    if ids_raw is None and finish == "abort":
        ids_raw = []
    if not isinstance(ids_raw, list):
        raise ProtocolError(f"/generate {rid}: output_ids missing or not a list")
    n = len(ids_raw)
    if lp_raw is None and n == 0:
        lp_raw = []
    if not isinstance(lp_raw, list):
        raise ProtocolError(
            f"/generate {rid}: {n} output ids but no output_token_logprobs (was return_logprob lost?)"
        )
    if len(lp_raw) != n:
        raise ProtocolError(
            f"/generate {rid}: {n} output ids but {len(lp_raw)} output_token_logprobs"
        )
    output_ids = np.empty(n, dtype=np.int32)
    logprobs = np.empty(n, dtype=np.float32)
    for i, (tok, entry) in enumerate(zip(ids_raw, lp_raw, strict=True)):
        if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
            raise ProtocolError(f"/generate {rid}: output_ids[{i}] = {tok!r} is not a token id")
        if not isinstance(entry, list | tuple) or len(entry) < 2:
            raise ProtocolError(f"/generate {rid}: output_token_logprobs[{i}] = {entry!r}")
        lp, lp_tok = entry[0], entry[1]
        if isinstance(lp, bool) or not isinstance(lp, int | float):
            raise ProtocolError(f"/generate {rid}: logprob of token {i} is {lp!r}")
        if lp_tok != tok:
            raise ProtocolError(
                f"/generate {rid}: output_ids[{i}] = {tok} but its logprob entry is for {lp_tok!r}"
            )
        output_ids[i] = tok
        logprobs[i] = lp
    return output_ids, logprobs


def _token_versions(spans: Any, n: int, rid: str) -> np.ndarray | None:
    """Per-token versions from ``[{"version": "12", "start": 0, "end": 3}, ...]`` spans over
    the output tokens (``[start, end)``). They must cover every token exactly once. None when
    absent, empty, or any version is non-numeric (then the caller falls back)."""
    if not isinstance(spans, list) or not spans:
        return None
    out = np.full(n, -1, dtype=np.int64)
    for span in spans:
        if not isinstance(span, dict):
            raise ProtocolError(f"/generate {rid}: weight_versions span {span!r} is not an object")
        v = parse_version(span.get("version"))
        start, end = opt_int(span.get("start")), opt_int(span.get("end"))
        if start is None or end is None or not (0 <= start <= end <= n):
            raise ProtocolError(f"/generate {rid}: weight_versions span {span!r} outside [0, {n}]")
        if v is None:
            return None
        if (out[start:end] != -1).any():
            raise ProtocolError(f"/generate {rid}: weight_versions spans overlap at {span!r}")
        out[start:end] = v
    if (out == -1).any():
        missing = int(np.flatnonzero(out == -1)[0])
        raise ProtocolError(
            f"/generate {rid}: weight_versions spans leave token {missing} uncovered"
        )
    return out.astype(np.int32)
