"""``SGLangClient``: the one HTTP client for SGLang and the CPU reference server.

Speaks the subset of SGLang's HTTP protocol in docs/sglang-protocol.md (token in, token out,
``--skip-tokenizer-init``): this module sends the calls (session, retries, timeouts) and
``inference.responses`` parses the answers. numpy only; no torch.

Invariants:
- Nothing the client sends can crash a server through bad ids: every ``generate`` checks its
  ``input_ids`` (non-empty, integers, ``0 <= id < vocab_size``) before sending, and refuses to
  send when the vocabulary size is unknown unless ``validate_ids=False``
  (tests/unit/inference/test_inference_client_replay.py::test_oov_id_refused_before_sending).
- Only connection attempts that never reached the server are retried (same rid, jittered
  exponential backoff). A generate whose connection dropped after sending is *not* resent;
  ``generate_with_retry`` resubmits it under a NEW rid after a best-effort abort of the old one.
- Every call has a timeout; every failure is one of the errors in ``inference.protocol``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np

from inference.lora import adapter_version
from inference.protocol import (
    PAUSE_MODES,
    GenerateResult,
    InferenceError,
    InferenceTimeout,
    InvalidInputError,
    PauseMode,
    ProtocolError,
    SamplingParams,
    ServerDead,
    SGLangClientError,
)
from inference.responses import error_message, opt_int, parse_generate, parse_version

log = logging.getLogger(__name__)

# Errors raised before the request left this machine: safe to retry with the same rid.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
)
# Errors after the request may have reached the server: the server (or the link) is gone.
# (Timeouts are caught before these: aiohttp's ServerTimeoutError is a ClientConnectionError.)
_DROPPED_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)


class SGLangClient:
    """Async client for one inference server (SGLang or ``sluice serve``), one pooled
    ``aiohttp`` session per client. Use as ``async with SGLangClient(url) as c: ...`` or call
    ``close()``. Safe to share between many concurrent tasks of one event loop.

    ``vocab_size``: used when the server's ``model_info`` has none (SGLang's has none; read it
    from the model's ``config.json``, as ``ServerHandle.vocab_size`` does). ``api_key`` is sent
    on every call, ``admin_api_key`` (SGLang ``--admin-api-key``) instead on control calls.
    """

    def __init__(
        self,
        url: str,
        *,
        vocab_size: int | None = None,
        validate_ids: bool = True,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        timeout: float = 30.0,
        generate_timeout: float | None = 600.0,
        update_timeout: float = 600.0,
        connect_timeout: float = 5.0,
        connect_retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_connections: int = 1024,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server url {url!r} must start with http:// or https://")
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
        if connect_retries < 0:
            raise ValueError(f"connect_retries must be >= 0, got {connect_retries}")
        self.url = url.rstrip("/")
        self.validate_ids = validate_ids
        self.timeout = timeout
        self.generate_timeout = generate_timeout
        self.update_timeout = update_timeout
        self.connect_timeout = connect_timeout
        self.connect_retries = connect_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._api_key = api_key
        self._admin_api_key = admin_api_key
        self._max_connections = max_connections
        self._given_vocab = vocab_size
        self._vocab: int | None = None
        self._vocab_known = False
        self._vocab_lock = asyncio.Lock()
        self._model_info_path: str | None = None
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"SGLangClient({self.url!r})"

    async def __aenter__(self) -> SGLangClient:
        self._get_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Idle pooled connections are dropped before uvicorn's 5 s keep-alive closes them,
            # so a reused connection is not a half-closed one.
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=4.0)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    # ---------------------------------------------------------------- transport

    def _headers(self, admin: bool) -> dict[str, str]:
        key = self._admin_api_key if admin and self._admin_api_key else self._api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _sleep_for(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)

    async def _request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        timeout: float | None,
        admin: bool = False,
        retries: int | None = None,
    ) -> tuple[int, bytes]:
        """Send one request; return (status, body). Retries only connection attempts that
        never reached the server; raises ServerDead / InferenceTimeout, never aiohttp errors."""
        session = self._get_session()
        retries = self.connect_retries if retries is None else retries
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            ct = aiohttp.ClientTimeout(total=remaining, connect=self.connect_timeout)
            try:
                async with session.request(
                    method, self.url + path, json=payload, headers=self._headers(admin), timeout=ct
                ) as resp:
                    return resp.status, await resp.read()
            except _CONNECT_ERRORS as e:
                attempt += 1
                if attempt > retries or (deadline is not None and time.monotonic() >= deadline):
                    raise ServerDead(
                        f"{self.url}{path}: cannot connect after {attempt} attempt(s): {e}"
                    ) from e
                pause = self._sleep_for(attempt)
                log.warning(
                    "%s%s: %s; retry %d/%d in %.2fs", self.url, path, e, attempt, retries, pause
                )
                await asyncio.sleep(pause)
            except TimeoutError as e:
                raise InferenceTimeout(f"{self.url}{path}: no answer within {timeout}s") from e
            except _DROPPED_ERRORS as e:
                raise ServerDead(f"{self.url}{path}: connection dropped: {e!r}") from e

    async def _call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        timeout: float | None,
        admin: bool = False,
        retries: int | None = None,
    ) -> Any:
        """Request, raise ``InferenceError`` on an HTTP error, return the JSON body (or the
        text when it is not JSON, or None when empty)."""
        status, raw = await self._request(
            method, path, payload, timeout=timeout, admin=admin, retries=retries
        )
        if status >= 400:
            raise InferenceError(status, error_message(raw), path)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", errors="replace")

    async def _weight_call(
        self, path: str, payload: dict[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        body = await self._call(
            "POST",
            path,
            payload,
            timeout=self.update_timeout if timeout is None else timeout,
            admin=True,
        )
        if not isinstance(body, dict) or "success" not in body:
            raise ProtocolError(f"{path}: expected {{'success': ...}}, got {body!r}")
        if body["success"] is not True:
            raise InferenceError(200, str(body.get("message", body)), path)
        return body

    # ---------------------------------------------------------------- generation

    async def vocab_size(self) -> int | None:
        """The vocabulary size ids are checked against: the constructor's ``vocab_size`` when
        given (no call), else the server's ``model_info`` ``vocab_size`` (asked once per
        client; None when the server reports none, as SGLang 0.5.17 does)."""
        if self._vocab_known:
            return self._vocab
        async with self._vocab_lock:
            if not self._vocab_known:
                if self._given_vocab is not None:
                    self._vocab = self._given_vocab
                else:
                    info = await self.model_info()
                    server_vocab = opt_int(info.get("vocab_size"))
                    if server_vocab is not None and server_vocab <= 0:
                        raise ProtocolError(f"{self.url} reports vocab_size {server_vocab}")
                    self._vocab = server_vocab
                self._vocab_known = True
        return self._vocab

    async def _checked_ids(self, input_ids: Sequence[int] | np.ndarray) -> list[int]:
        arr = np.asarray(input_ids)
        if arr.ndim != 1:
            raise InvalidInputError(f"input_ids must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            raise InvalidInputError("input_ids is empty: the server needs at least one token")
        if arr.dtype.kind not in "iu":
            raise InvalidInputError(f"input_ids must be integers, got dtype {arr.dtype}")
        if int(arr.min()) < 0:
            pos = int(np.flatnonzero(arr < 0)[0])
            raise InvalidInputError(f"input_ids[{pos}] = {int(arr[pos])} is negative")
        if self.validate_ids:
            vocab = await self.vocab_size()
            if vocab is None:
                raise InvalidInputError(
                    f"vocabulary size of {self.url} unknown (its model_info has no vocab_size): "
                    "pass SGLangClient(vocab_size=...) (ServerHandle.vocab_size reads config.json) "
                    "or validate_ids=False"
                )
            if int(arr.max()) >= vocab:
                pos = int(np.flatnonzero(arr >= vocab)[0])
                raise InvalidInputError(
                    f"input_ids[{pos}] = {int(arr[pos])} is outside the vocabulary "
                    f"(vocab_size {vocab}); one such id crashes an SGLang server"
                )
        return [int(x) for x in arr.tolist()]

    async def generate(
        self,
        input_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams | dict[str, Any],
        rid: str | None = None,
        *,
        timeout: float | None = None,
        lora_path: str | None = None,
    ) -> GenerateResult:
        """Generate from ``input_ids``; returns the parsed answer (partial when aborted).

        ``rid`` defaults to a fresh UUID (rids must be unique among in-flight requests and
        ``/abort_request`` matches by prefix). ``timeout`` defaults to ``generate_timeout``.
        ``lora_path``: the loaded adapter to run with (``inference.lora.adapter_name(N)``); the
        server refuses a name it has not loaded, so every token of the answer was sampled with
        that adapter and is labelled with its version ``N`` (the server's own
        ``weight_version`` is the base model's, which a LoRA run never changes).
        """
        lora_version = None if lora_path is None else adapter_version(lora_path)
        ids = await self._checked_ids(input_ids)
        if isinstance(sampling, SamplingParams):
            sp = sampling.to_dict()
        elif isinstance(sampling, dict):
            sp = dict(sampling)
        else:
            raise InvalidInputError(
                f"sampling must be SamplingParams or dict, got {type(sampling).__name__}"
            )
        rid = rid or uuid.uuid4().hex
        payload = {
            "rid": rid,
            "input_ids": ids,
            "sampling_params": sp,
            "return_logprob": True,
            "logprob_start_len": -1,
            "stream": False,
        }
        if lora_path is not None:
            payload["lora_path"] = lora_path
        body = await self._call(
            "POST",
            "/generate",
            payload,
            timeout=self.generate_timeout if timeout is None else timeout,
        )
        res = parse_generate(body, rid)
        if lora_version is not None:
            res.weight_version = lora_version
            res.token_versions = np.full(res.num_tokens, lora_version, dtype=np.int32)
        return res

    async def generate_with_retry(
        self,
        input_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams | dict[str, Any],
        *,
        attempts: int = 3,
        timeout: float | None = None,
    ) -> GenerateResult:
        """``generate``, resubmitted under a NEW rid when the connection dropped or timed out
        (after a best-effort abort of the old rid, which may still be running). HTTP errors
        and invalid input are not retried. Raises the last error after ``attempts``."""
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        for attempt in range(1, attempts + 1):
            rid = uuid.uuid4().hex
            try:
                return await self.generate(input_ids, sampling, rid, timeout=timeout)
            except (ServerDead, InferenceTimeout) as e:
                if attempt == attempts:
                    raise
                log.warning("generate %s failed (%s); resubmitting under a new rid", rid, e)
                try:
                    await self.abort(rid)
                except SGLangClientError as abort_err:
                    log.warning("abort of %s failed: %s", rid, abort_err)
                await asyncio.sleep(self._sleep_for(attempt))
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- control

    async def pause(
        self, mode: PauseMode = "abort", *, timeout: float | None = None
    ) -> dict[str, Any]:
        """``/pause_generation`` with a JSON body (0.4.x ignored it and always aborted)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        body = await self._call(
            "POST", "/pause_generation", {"mode": mode}, timeout=timeout or self.timeout, admin=True
        )
        return body if isinstance(body, dict) else {"message": body}

    async def resume(self, *, timeout: float | None = None) -> dict[str, Any]:
        """``/continue_generation``."""
        body = await self._call(
            "POST", "/continue_generation", {}, timeout=timeout or self.timeout, admin=True
        )
        return body if isinstance(body, dict) else {"message": body}

    async def abort(self, rid: str | None = None, *, timeout: float | None = None) -> None:
        """Abort one request (``rid``; the server matches by prefix) or all (``rid=None``)."""
        payload: dict[str, Any] = {"rid": rid} if rid is not None else {"abort_all": True}
        await self._call(
            "POST", "/abort_request", payload, timeout=timeout or self.timeout, admin=True
        )

    async def update_weights_from_disk(
        self,
        path: str,
        version: int,
        *,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Load ``path`` as weight ``version``. With ``abort_all_requests`` in-flight requests
        return partial, labelled with the old version (the fast swap on SGLang 0.5.17).
        Never combine ``flush_cache=True`` with retracted requests: it kills SGLang 0.5.17."""
        _check_version(version)
        payload = {
            "model_path": str(path),
            "weight_version": str(version),
            "flush_cache": bool(flush_cache),
            "abort_all_requests": bool(abort_all_requests),
        }
        return await self._weight_call("/update_weights_from_disk", payload, timeout)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Join the trainer's broadcast group (``backend`` ``nccl`` or ``gloo``)."""
        if not (0 < master_port < 65536):
            raise ValueError(f"master_port must be in 1..65535, got {master_port}")
        if world_size < 2 or not (0 < rank_offset < world_size):
            raise ValueError(
                f"need world_size >= 2 and 0 < rank_offset < world_size, got {rank_offset}/{world_size}"
            )
        payload = {
            "master_address": master_address,
            "master_port": int(master_port),
            "rank_offset": int(rank_offset),
            "world_size": int(world_size),
            "group_name": group_name,
            "backend": backend,
        }
        return await self._weight_call("/init_weights_update_group", payload, timeout)

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        version: int,
        flush_cache: bool = True,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Receive one bucket of tensors broadcast by the trainer (rank 0) as ``version``."""
        _check_version(version)
        if not names or not (len(names) == len(dtypes) == len(shapes)):
            raise ValueError(
                f"names, dtypes, shapes must be non-empty and of equal length, got "
                f"{len(names)}, {len(dtypes)}, {len(shapes)}"
            )
        payload = {
            "names": list(names),
            "dtypes": list(dtypes),
            "shapes": [[int(d) for d in s] for s in shapes],
            "group_name": group_name,
            "flush_cache": bool(flush_cache),
            "weight_version": str(version),
        }
        return await self._weight_call("/update_weights_from_distributed", payload, timeout)

    async def update_weights_from_tensor(
        self,
        serialized_named_tensors: Sequence[str],
        version: int | None,
        *,
        flush_cache: bool = False,
        abort_all_requests: bool = False,
        load_format: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Load tensors handed over in-process-format (``weights.ipc``): one base64 payload
        per TP rank, each a ``ForkingPickler`` dump of ``[(name, tensor)]`` (CUDA IPC handles
        on a GPU, shared-memory names on the CPU). ``version``: the label after this call (None
        keeps the server's). The server unpickles the payload: send it only to a server this
        machine's worker launched, with the admin key (docs/weight-sync.md). The caller keeps
        the tensors alive until this returns."""
        if version is not None:
            _check_version(version)
        if not serialized_named_tensors or not all(
            isinstance(p, str) and p for p in serialized_named_tensors
        ):
            raise ValueError("serialized_named_tensors must be non-empty strings, one per TP rank")
        payload = {
            "serialized_named_tensors": list(serialized_named_tensors),
            "load_format": load_format,
            "flush_cache": bool(flush_cache),
            "abort_all_requests": bool(abort_all_requests),
            "weight_version": None if version is None else str(version),
        }
        return await self._weight_call("/update_weights_from_tensor", payload, timeout)

    async def _lora_call(
        self, path: str, payload: dict[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        body = await self._call(
            "POST",
            path,
            payload,
            timeout=self.update_timeout if timeout is None else timeout,
            admin=True,
        )
        if not isinstance(body, dict) or "success" not in body:
            raise ProtocolError(f"{path}: expected {{'success': ...}}, got {body!r:.200}")
        if body["success"] is not True:
            raise InferenceError(200, str(body.get("error_message") or body), path)
        return body

    async def load_lora_adapter(
        self, name: str, path: str, *, pinned: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        """``/load_lora_adapter``: load the PEFT adapter directory ``path`` as ``name``
        (refused when the name is taken, or the adapter does not fit the server's
        ``--max-lora-rank`` / ``--lora-target-modules``: ``InferenceError``)."""
        payload = {"lora_name": name, "lora_path": path, "pinned": bool(pinned)}
        return await self._lora_call("/load_lora_adapter", payload, timeout)

    async def load_lora_adapter_from_tensors(
        self,
        name: str,
        config: dict[str, Any],
        serialized_named_tensors: Sequence[str],
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """``/load_lora_adapter_from_tensors``: the adapter handed over in memory (one base64
        ``ForkingPickler`` dump of ``[(name, tensor)]`` per TP rank, as
        ``update_weights_from_tensor``), with its ``adapter_config.json`` as ``config``."""
        payload = {
            "lora_name": name,
            "config_dict": config,
            "serialized_named_tensors": list(serialized_named_tensors),
            "load_format": None,
        }
        return await self._lora_call("/load_lora_adapter_from_tensors", payload, timeout)

    async def unload_lora_adapter(
        self, name: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """``/unload_lora_adapter``: drop ``name`` (``InferenceError`` when not loaded)."""
        return await self._lora_call("/unload_lora_adapter", {"lora_name": name}, timeout)

    async def flush_cache(self, *, timeout: float | None = None) -> str:
        """``/flush_cache``; 400 (``InferenceError``) while requests are pending."""
        body = await self._call(
            "POST", "/flush_cache", None, timeout=timeout or self.timeout, admin=True
        )
        return body if isinstance(body, str) else json.dumps(body)

    async def model_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """``/model_info`` (``/get_model_info`` on servers that only have the old spelling)."""
        paths = (
            [self._model_info_path] if self._model_info_path else ["/model_info", "/get_model_info"]
        )
        for i, path in enumerate(paths):
            try:
                body = await self._call("GET", path, timeout=timeout or self.timeout)
            except InferenceError as e:
                if e.status == 404 and i + 1 < len(paths):
                    continue
                raise
            if not isinstance(body, dict):
                raise ProtocolError(f"{path}: expected a JSON object, got {body!r:.200}")
            self._model_info_path = path
            return body
        raise AssertionError("unreachable")

    async def weight_version(self, *, timeout: float | None = None) -> int | None:
        """The server's live weight version (None if it reports a non-numeric one)."""
        return parse_version((await self.model_info(timeout=timeout)).get("weight_version"))

    async def health(self, *, timeout: float | None = None, retries: int | None = None) -> bool:
        """True when ``/health`` answers 200, False for any other status (e.g. 503 while
        starting or paused); ``ServerDead`` when it cannot be reached."""
        status, _ = await self._request(
            "GET", "/health", timeout=timeout or self.timeout, retries=retries
        )
        return status == 200


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"weight version must be an int >= 0, got {version!r}")
