"""The inference contract the rollout worker depends on (no HTTP, no torch: numpy only).

``InferenceClient`` is what a worker talks to; ``SGLangClient`` (``inference.client``)
implements it over SGLang's HTTP protocol (docs/sglang-protocol.md) and so does the CPU
reference server through the same client. ``GenerateResult`` is the parsed answer of one
``/generate`` call; its per-token arrays always have the same length.

Errors, one type per thing a caller can act on:

- ``InvalidInputError`` (a ``ValueError``): the request was refused *before* sending (empty
  input, an id outside the vocabulary, a bad sampling value). Nothing reached the server.
- ``InferenceError``: the server answered with an HTTP error (``status``, ``message``) or a
  weight update answered ``{"success": false}``. The server is alive.
- ``ProtocolError``: a 2xx answer that breaks the protocol (lengths disagree, missing fields).
- ``ServerDead``: the connection dropped mid-call or the server could not be reached after
  the retries. A generate that failed this way may or may not have run.
- ``InferenceTimeout`` (also a ``TimeoutError``): the call exceeded its timeout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

FinishReason = Literal["stop", "length", "abort"]
PauseMode = Literal["abort", "retract", "in_place"]
PAUSE_MODES: tuple[str, ...] = ("abort", "retract", "in_place")


class SGLangClientError(Exception):
    """Base of every error the inference client raises (except ``InvalidInputError``)."""


class InvalidInputError(ValueError):
    """A request refused before sending; nothing reached the server."""


class InferenceError(SGLangClientError):
    """The server answered an HTTP error, or a weight update reported ``success: false``.

    ``status`` is the HTTP status (200 for a ``success: false`` body), ``message`` the server's
    own words (from ``{"error": {"message"}}``, ``{"error": "..."}``, ``{"message"}`` or a text
    body), ``path`` the endpoint.
    """

    def __init__(self, status: int, message: str, path: str = "") -> None:
        self.status = status
        self.message = message
        self.path = path
        super().__init__(f"{path or 'request'} -> HTTP {status}: {message}")


class ProtocolError(SGLangClientError):
    """A successful HTTP answer whose body breaks the protocol."""


class ServerDead(SGLangClientError):
    """The connection dropped, or the server refused connections after every retry."""


class InferenceTimeout(SGLangClientError, TimeoutError):
    """A call exceeded its timeout (the server may still be working on it)."""


@dataclass(frozen=True)
class SamplingParams:
    """SGLang ``sampling_params`` for one request; only known keys are ever sent.

    0.5.23 answers 400 (0.5.17: 500) to an unknown key, so ``to_dict`` emits exactly these
    fields and omits ``sampling_seed`` when unset. ``top_k=-1`` is the whole vocabulary.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InvalidInputError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 0:
            raise InvalidInputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidInputError(
                f"temperature must be a finite number >= 0, got {self.temperature}"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise InvalidInputError(f"top_k must be -1 (all) or >= 1, got {self.top_k}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidInputError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied (validated again)."""
        d = {**self.__dict__, **changes}
        return SamplingParams(**d)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "ignore_eos": bool(self.ignore_eos),
        }
        if self.stop_token_ids:
            d["stop_token_ids"] = list(self.stop_token_ids)
        if self.sampling_seed is not None:
            d["sampling_seed"] = int(self.sampling_seed)
        return d


@dataclass
class GenerateResult:
    """One parsed ``/generate`` answer.

    Invariants (checked by the parser, else ``ProtocolError``):
    ``len(output_ids) == len(logprobs)``, and ``token_versions`` is None or has that length too.
    ``token_versions`` comes only from the server: per-token ``weight_versions`` spans when the
    server sends them (newer than 0.5.17), else the response's ``weight_version`` repeated, else
    None — never the caller's guess. ``output_ids`` keep the stop token that ended generation.
    An aborted request (``finish_reason == "abort"``) carries its partial output.
    """

    rid: str
    output_ids: np.ndarray  # int32 [n]
    logprobs: np.ndarray  # float32 [n], log_softmax(logits / T) of each output token
    finish_reason: FinishReason
    finish_message: str | None
    weight_version: int | None
    token_versions: np.ndarray | None  # int32 [n] or None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    e2e_latency: float | None
    meta_info: dict[str, Any] = field(repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.output_ids.shape[0])

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"


@runtime_checkable
class InferenceClient(Protocol):
    """What a rollout worker calls on an inference server (SGLang or the CPU server), and
    nothing more: ``SGLangClient`` (``inference.client``) implements it, and the worker's unit
    tests use fakes of it. Every signature is ``SGLangClient``'s own, keyword arguments
    included (``rollout_workers/ports.py`` has mypy check the assignment)."""

    async def generate(
        self,
        input_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams | dict[str, Any],
        rid: str | None = None,
        *,
        timeout: float | None = None,
        lora_path: str | None = None,
    ) -> GenerateResult:
        """Generate from ``input_ids`` (with the loaded adapter ``lora_path``, if given); an
        aborted request returns its partial output."""
        ...

    async def pause(
        self, mode: PauseMode = "abort", *, timeout: float | None = None
    ) -> dict[str, Any]:
        """``/pause_generation``: hold (or abort) the server's requests."""
        ...

    async def resume(self, *, timeout: float | None = None) -> dict[str, Any]:
        """``/continue_generation``."""
        ...

    async def abort(self, rid: str | None = None, *, timeout: float | None = None) -> None:
        """Abort one request (``rid``, matched by prefix) or all (``rid=None``)."""
        ...

    async def update_weights_from_disk(
        self,
        path: str,
        version: int,
        *,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Load ``path`` as weight ``version``."""
        ...

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
        """Join the trainer's broadcast group."""
        ...

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
        """Receive one bucket of the trainer's broadcast, labelled ``version``."""
        ...

    async def load_lora_adapter(
        self, name: str, path: str, *, pinned: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        """Load the LoRA adapter directory ``path`` under ``name``."""
        ...

    async def unload_lora_adapter(
        self, name: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Drop the adapter ``name``."""
        ...

    async def weight_version(self, *, timeout: float | None = None) -> int | None:
        """The server's live weight version (None if it reports a non-numeric one)."""
        ...

    async def health(self, *, timeout: float | None = None, retries: int | None = None) -> bool:
        """True when ``/health`` answers 200; ``ServerDead`` when it cannot be reached."""
        ...

    async def close(self) -> None:
        """Release the client's connections."""
        ...
