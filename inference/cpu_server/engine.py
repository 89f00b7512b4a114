"""The CPU reference server's model engine: one running batch around the plain model forward.

Batching choice. transformers 5 ships a continuous-batching manager (``generate_batch`` /
``init_continuous_batching``, paged attention), but it samples inside its own loop with one
generation config: no per-request seed, temperature or top-p/top-k, log-probs of the
*filtered* distribution, and no way to return a running request's partial output on abort.
So the server keeps its own small scheduler (``inference/cpu_server/scheduler.py``) around this
engine:

- One running batch whose KV cache is a ``DynamicCache`` built from per-layer tensors
  ``[B, kv_heads, L, head_dim]``, **left-padded**, with a ``[B, L]`` attention mask and
  explicit ``position_ids`` (the count of real tokens before each one), exactly what
  ``generate`` does with left padding.
- Each ``step``: one decode forward of every running row, then one batched prefill of the
  requests admitted since (up to ``max_batch`` rows in all); the new rows' caches are
  left-padded to a common length and concatenated to the running batch, so a request joins at
  the next step. Finished or aborted rows are dropped with ``index_select``; all-padding
  columns on the left are trimmed.

Invariants (tests/integration/test_cpu_server.py):
- ``output_token_logprobs[i][0] == log_softmax(logits_i / T)[token_i]`` of the full
  distribution, float32, to 1e-4 of an unbatched transformers forward over prompt + output
  (``test_logprobs_match_transformers_forward``; the sampling rule is ``sample_rows``).
- Every token is stamped with the weight version it was sampled under (``Req.versions``).
- Finish order as SGLang: ``length`` when ``max_new_tokens`` is reached (checked first), else
  ``stop`` on an EOS (from the generation config) or a ``stop_token_ids`` id; ``ignore_eos``
  disables both, as SGLang's ``_check_token_based_finish`` does.
- A weight load checks every name and shape before it copies anything (all or nothing).

Distributed updates: gloo only. The server joins with public torch APIs
(``join_weight_group``): ``TCPStore(master_address, master_port, world_size,
is_master=False)`` wrapped in ``PrefixStore(group_name + "/", store)`` and
``ProcessGroupGloo(prefix_store, rank_offset, world_size)``. The sender (rank 0) builds the
same from a master ``TCPStore`` and, per ``/update_weights_from_distributed`` call, broadcasts
each tensor of ``names`` in order from rank 0 (``receive_broadcast``;
``test_distributed_update_matches_sender``).
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch

from inference.cpu_server.lora import AdapterSet
from inference.cpu_server.sampling import Req, sample_rows
from inference.models import eos_token_ids, load_model, load_state_dict

KV = list[tuple[torch.Tensor, torch.Tensor]]


class EngineFailure(RuntimeError):
    """The model forward raised; the affected requests are answered 500."""


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
        self.lora: AdapterSet | None = None
        """The LoRA adapters served (None: LoRA not enabled, ``enable_lora``)."""
        self.rows: list[Req] = []
        self.kv: KV = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    def enable_lora(self, max_rank: int, targets: list[str] | None) -> None:
        """Serve LoRA adapters of rank <= ``max_rank`` on ``targets`` (None: any linear)."""
        self.lora = AdapterSet(self.model, max_rank, targets)

    # ---- forward helpers

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: KV
    ) -> tuple[torch.Tensor, KV]:
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

    def _append_all(
        self, reqs: list[Req], tokens: list[int], lps: list[float]
    ) -> tuple[list[int], list[Req]]:
        """Append each row's token; returns (indices of the rows still running, finished)."""
        keep: list[int] = []
        finished: list[Req] = []
        for i, (r, t, lp) in enumerate(zip(reqs, tokens, lps, strict=True)):
            self._append(r, t, lp)
            if r.finish_reason is None:
                keep.append(i)
            else:
                finished.append(r)
        return keep, finished

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
    def _pad_left(kv: KV, mask: torch.Tensor, length: int) -> tuple[KV, torch.Tensor]:
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
            finished += self._decode()
        if admitted:
            finished += self._prefill(admitted)
        return finished

    def _decode(self) -> list[Req]:
        last = torch.tensor([[r.output_ids[-1]] for r in self.rows], dtype=torch.long)
        pos = torch.tensor(
            [[len(r.input_ids) + len(r.output_ids) - 1] for r in self.rows], dtype=torch.long
        )
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        if self.lora is not None:
            self.lora.rows = [r.lora for r in self.rows]
        logits, self.kv = self._forward(last, mask, pos, self.kv)
        self.mask = mask
        tokens, lps = sample_rows(logits, self.rows)
        keep, finished = self._append_all(self.rows, tokens, lps)
        self._keep_rows(keep)
        return finished

    def _prefill(self, admitted: list[Req]) -> list[Req]:
        width = max(len(r.input_ids) for r in admitted)
        ids = torch.zeros(len(admitted), width, dtype=torch.long)
        mask = torch.zeros(len(admitted), width, dtype=torch.long)
        for i, r in enumerate(admitted):
            n = len(r.input_ids)
            ids[i, width - n :] = torch.tensor(r.input_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
        if self.lora is not None:
            self.lora.rows = [r.lora for r in admitted]
        logits, kv = self._forward(ids, mask, pos, [])
        tokens, lps = sample_rows(logits, admitted)
        keep, finished = self._append_all(admitted, tokens, lps)
        if keep:
            self._join_batch([admitted[i] for i in keep], keep, kv, mask)
        return finished

    def _join_batch(self, rows: list[Req], keep: list[int], kv: KV, mask: torch.Tensor) -> None:
        """Add the prefilled ``rows`` (indices ``keep`` of ``kv``/``mask``) to the batch."""
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
        self.rows += rows

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

    def receive_weights(
        self, group: Any, names: Sequence[Any], dtypes: Sequence[Any], shapes: Sequence[Any]
    ) -> None:
        """Receive one broadcast bucket from rank 0 of ``group`` and load it (a subset)."""
        self.load_weights(receive_broadcast(group, names, dtypes, shapes), complete=False)

    def load_tensors(self, payload: str) -> int:
        """Load one ``/update_weights_from_tensor`` payload (a subset); returns its tensor
        count. The tensors live in the sender's shared memory until it returns."""
        state = unpickle_named_tensors(payload)
        self.load_weights(state, complete=False)
        return len(state)


_HANDOVER_FUNCTIONS = ("as_strided", "from_file")
"""The torch functions the CPU hand-over payload (``weights.ipc.Handover``) calls."""
_HANDOVER_GLOBALS = {
    ("torch", "as_strided"),
    ("torch", "from_file"),
    ("torch._C", "_VariableFunctionsClass"),
    ("functools", "partial"),
    ("multiprocessing.reduction", "_rebuild_partial"),
}
"""What the payload refers to besides torch dtypes and ``getattr`` (which may only fetch
``_HANDOVER_FUNCTIONS`` from torch's function table): nothing else is resolved while
unpickling, so a payload cannot reach anything else."""


_FUNCTION_TABLE: Any = torch._C._VariableFunctionsClass  # type: ignore[attr-defined]
"""Where ``torch.as_strided`` and ``torch.from_file`` pickle as being found."""


def _handover_getattr(obj: Any, name: str) -> Any:
    if obj is _FUNCTION_TABLE and name in _HANDOVER_FUNCTIONS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr(..., {name!r}) is not part of a tensor hand-over")


def _handover_global(module: str, name: str) -> Any:
    if (module, name) == ("builtins", "getattr"):
        return _handover_getattr
    if (module, name) in _HANDOVER_GLOBALS or (
        module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
    ):
        return getattr(importlib.import_module(module), name)
    raise pickle.UnpicklingError(f"{module}.{name} is not part of a tensor hand-over")


class _HandoverUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _handover_global(module, name)


def unpickle_named_tensors(payload: str) -> dict[str, torch.Tensor]:
    """SGLang's ``MultiprocessingSerializer`` format: base64 of a ``ForkingPickler`` dump of
    ``[(name, tensor)]``. On the CPU the sender (``weights.ipc.Handover``) puts each tensor in a
    memory-backed file that unpickling maps (``torch.from_file``); ``load_weights`` copies it
    into the model before the call returns, while the sender still keeps the file. The payload is a pickle:
    only admin-key holders may send it (``ADMIN_PATHS``), and it is read by an unpickler that
    resolves only the hand-over's own functions and torch dtypes (``_HANDOVER_GLOBALS``)."""
    import base64
    import binascii
    import io

    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"serialized_named_tensors is not base64: {e}") from None
    try:
        named = _HandoverUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise ValueError(f"serialized_named_tensors does not unpickle: {e}") from None
    if not isinstance(named, list) or not all(
        isinstance(x, tuple)
        and len(x) == 2
        and isinstance(x[0], str)
        and isinstance(x[1], torch.Tensor)
        for x in named
    ):
        raise ValueError("serialized_named_tensors must hold a list of (name, tensor)")
    return dict(named)


def join_weight_group(
    name: str,
    master_address: str,
    master_port: int,
    rank_offset: int,
    world_size: int,
    timeout_s: float,
) -> tuple[Any, Any]:
    """Join the gloo group ``name`` as rank ``rank_offset``; returns ``(store, group)`` (both
    must be kept alive as long as the group is used)."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(  # type: ignore[attr-defined]
        master_address, master_port, world_size, is_master=False, timeout=timeout
    )
    prefixed = dist.PrefixStore(name + "/", store)  # type: ignore[attr-defined]
    group = dist.ProcessGroupGloo(prefixed, rank_offset, world_size, timeout)
    return store, group


def receive_broadcast(
    group: Any, names: Sequence[Any], dtypes: Sequence[Any], shapes: Sequence[Any]
) -> dict[str, torch.Tensor]:
    """Each tensor of ``names`` in order, broadcast from rank 0 of ``group``."""
    import torch.distributed as dist

    state = {}
    for n, dt, shape in zip(names, dtypes, shapes, strict=True):
        t = torch.empty([int(s) for s in shape], dtype=getattr(torch, str(dt)))
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        group.broadcast([t], opts).wait()
        state[str(n)] = t
    return state
