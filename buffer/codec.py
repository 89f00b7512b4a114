"""msgpack codec for ``TrajectoryGroup`` — never pickle.

Arrays travel as ``{"t": dtype, "n": length, "b": raw little-endian bytes}``. Decoding
validates everything it is given (schema version, field types, allowed dtypes, lengths that
agree, bounded sizes) and raises ``CodecError`` naming the first problem; it never executes
anything from the payload.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from buffer.schema import SCHEMA_VERSION, MetaValue, Sample, TrajectoryGroup

# Bounds that keep a corrupt or hostile entry from allocating without limit.
MAX_TOKENS_PER_SAMPLE = 1 << 20
MAX_PROMPT_TOKENS = 1 << 20
MAX_SAMPLES_PER_GROUP = 4096
MAX_PAYLOAD_BYTES = 512 << 20
MAX_METADATA_ITEMS = 64
MAX_STR_LEN = 4096

_DTYPES: dict[str, np.dtype[Any]] = {
    "<i4": np.dtype("<i4"),
    "<f4": np.dtype("<f4"),
}
FINISH_REASONS = frozenset({"stop", "length", "abort"})


class CodecError(ValueError):
    """A payload that cannot be decoded into a valid ``TrajectoryGroup``; the message names why."""


def _arr(a: npt.NDArray[Any], dtype: str) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype=_DTYPES[dtype])
    return {"t": dtype, "n": int(a.shape[0]), "b": a.tobytes()}


def encode_group(g: TrajectoryGroup) -> bytes:
    """Serialize a group. Raises ``CodecError`` for a group that would not decode.

    Per-sample arrays are concatenated into one array per field plus a length array, so that
    decoding is a handful of ``frombuffer`` views whatever the group size.
    """
    for s in g.samples:
        if not (s.output_ids.shape == s.behaviour_logp.shape == s.token_versions.shape):
            raise CodecError(
                f"sample {s.index}: output_ids {s.output_ids.shape}, behaviour_logp "
                f"{s.behaviour_logp.shape} and token_versions {s.token_versions.shape} differ"
            )
    lens = np.fromiter((s.num_tokens for s in g.samples), dtype="<i4", count=len(g.samples))

    def cat(name: str, dtype: str) -> dict[str, Any]:
        parts = [getattr(s, name) for s in g.samples]
        return _arr(np.concatenate(parts) if parts else np.zeros(0), dtype)

    doc = {
        "sv": g.schema_version,
        "run": g.run_id,
        "pid": g.prompt_id,
        "gid": g.group_id,
        "p": _arr(g.prompt_ids, "<i4"),
        "w": g.worker_id,
        "av": int(g.admission_version),
        "ct": float(g.created_at),
        "ft": float(g.finished_at),
        "m": dict(g.metadata),
        "len": _arr(lens, "<i4"),
        "o": cat("output_ids", "<i4"),
        "l": cat("behaviour_logp", "<f4"),
        "v": cat("token_versions", "<i4"),
        "r": [float(s.reward) for s in g.samples],
        "f": [s.finish_reason for s in g.samples],
        "i": [int(s.index) for s in g.samples],
    }
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def _field(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise CodecError(f"{where}: missing field {key!r}")
    v = d[key]
    if isinstance(v, bool) and typ in (int, float, (int, float)):
        raise CodecError(f"{where}: field {key!r} must be {typ}, got bool")
    if not isinstance(v, typ):
        raise CodecError(f"{where}: field {key!r} has type {type(v).__name__}")
    if isinstance(v, str) and len(v) > MAX_STR_LEN:
        raise CodecError(f"{where}: field {key!r} longer than {MAX_STR_LEN} characters")
    return v


def _decode_arr(d: dict[str, Any], key: str, want: str, limit: int, where: str) -> npt.NDArray[Any]:
    a = _field(d, key, dict, where)
    dt = a.get("t")
    if dt != want:
        raise CodecError(f"{where}: array {key!r} has dtype {dt!r}, expected {want!r}")
    n = a.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CodecError(f"{where}: array {key!r} has invalid length {n!r}")
    if n > limit:
        raise CodecError(f"{where}: array {key!r} length {n} exceeds the limit {limit}")
    b = a.get("b")
    if not isinstance(b, bytes):
        raise CodecError(f"{where}: array {key!r} payload is not bytes")
    dtype = _DTYPES[want]
    if len(b) != n * dtype.itemsize:
        raise CodecError(
            f"{where}: array {key!r} has {len(b)} bytes, expected {n * dtype.itemsize} "
            f"({n} x {want}); truncated or corrupt"
        )
    return np.frombuffer(b, dtype=dtype)


_unpackb = msgpack.unpackb
_ONLY_FLOAT = {float}
_ONLY_INT = {int}
_MAX_TOKENS_PER_GROUP = MAX_TOKENS_PER_SAMPLE * MAX_SAMPLES_PER_GROUP
_ITEMSIZE = {name: dt.itemsize for name, dt in _DTYPES.items()}


def _arr_fast(d: dict[str, Any], key: str, want: str, limit: int) -> npt.NDArray[Any]:
    """``_decode_arr`` for the common case (a well-formed array); anything else goes to
    ``_decode_arr``, which names the problem."""
    a = d.get(key)
    if type(a) is dict and a.get("t") == want:
        n = a.get("n")
        b = a.get("b")
        if (
            type(n) is int
            and 0 <= n <= limit
            and type(b) is bytes
            and len(b) == n * _ITEMSIZE[want]
        ):
            return np.frombuffer(b, dtype=_DTYPES[want])
    return _decode_arr(d, key, want, limit, "group")


def decode_group(payload: bytes) -> TrajectoryGroup:
    """Parse and validate. Raises ``CodecError`` (only) on any malformed payload.

    The fast path checks the common case inline (exact types, the encoder's dtypes); anything
    unexpected falls back to ``_field`` / ``_decode_arr``, which raise the message naming the
    problem, so every check applies and every error reads the same on either path.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise CodecError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        doc = _unpackb(payload, raw=False, strict_map_key=True, max_bin_len=MAX_PAYLOAD_BYTES)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"not a msgpack document: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict):
        raise CodecError(f"top level must be a map, got {type(doc).__name__}")
    sv = doc.get("sv")
    if sv != SCHEMA_VERSION:
        raise CodecError(f"unknown schema version {sv!r} (this build reads {SCHEMA_VERSION})")
    where = "group"
    meta = doc.get("m")
    if type(meta) is not dict:
        meta = _field(doc, "m", dict, where)
    metadata: dict[str, MetaValue] = {}
    if meta:
        if len(meta) > MAX_METADATA_ITEMS:
            raise CodecError(f"group: metadata has {len(meta)} items, allowed {MAX_METADATA_ITEMS}")
        for k, v in meta.items():
            if not isinstance(k, str) or not (v is None or isinstance(v, str | int | float | bool)):
                raise CodecError(f"group: metadata {k!r} must map str to a scalar")
            metadata[k] = v
    # Small per-group lists are checked in plain Python: cheaper than numpy calls at n ~ 8.
    lens = _arr_fast(doc, "len", "<i4", MAX_SAMPLES_PER_GROUP).tolist()
    n = len(lens)
    if n < 1:
        raise CodecError(f"group: {n} samples, allowed 1..{MAX_SAMPLES_PER_GROUP}")
    if min(lens) < 0 or max(lens) > MAX_TOKENS_PER_SAMPLE:
        raise CodecError(f"group: sample lengths must lie in 0..{MAX_TOKENS_PER_SAMPLE}")
    total = sum(lens)
    o = _arr_fast(doc, "o", "<i4", _MAX_TOKENS_PER_GROUP)
    lp = _arr_fast(doc, "l", "<f4", _MAX_TOKENS_PER_GROUP)
    tv = _arr_fast(doc, "v", "<i4", _MAX_TOKENS_PER_GROUP)
    if not (o.shape[0] == lp.shape[0] == tv.shape[0] == total):
        raise CodecError(
            f"group: lengths disagree (sample lengths sum to {total}; output_ids {o.shape[0]}, "
            f"behaviour_logp {lp.shape[0]}, token_versions {tv.shape[0]})"
        )
    rewards = doc.get("r")
    if type(rewards) is not list:
        rewards = _field(doc, "r", list, where)
    finishes = doc.get("f")
    if type(finishes) is not list:
        finishes = _field(doc, "f", list, where)
    indices = doc.get("i")
    if type(indices) is not list:
        indices = _field(doc, "i", list, where)
    if not (len(rewards) == len(finishes) == len(indices) == n):
        raise CodecError(
            f"group: {n} sample lengths but {len(rewards)} rewards, {len(finishes)} finish "
            f"reasons, {len(indices)} indices"
        )
    if set(map(type, rewards)) != _ONLY_FLOAT:  # the encoder writes floats only
        bad = next(r for r in rewards if type(r) is not float)
        raise CodecError(f"group: reward {bad!r} is not a float")
    if not all(map(math.isfinite, rewards)):
        bad = next(r for r in rewards if not math.isfinite(r))
        raise CodecError(f"group: reward {bad!r} is not a finite number")
    if not FINISH_REASONS.issuperset(finishes):
        bad = next(f for f in finishes if f not in FINISH_REASONS)
        raise CodecError(f"group: finish reason {bad!r} not in {sorted(FINISH_REASONS)}")
    if set(map(type, indices)) != _ONLY_INT:
        bad = next(i for i in indices if type(i) is not int)
        raise CodecError(f"group: sample index {bad!r} is not an integer")
    samples = []
    a = 0
    for length, reward, finish, index in zip(lens, rewards, finishes, indices, strict=True):
        b = a + length
        samples.append(Sample(o[a:b], lp[a:b], tv[a:b], reward, finish, index))
        a = b
    run_id = doc.get("run")
    prompt_id = doc.get("pid")
    group_id = doc.get("gid")
    worker_id = doc.get("w")
    if (
        type(run_id) is str
        and type(prompt_id) is str
        and type(group_id) is str
        and type(worker_id) is str
        and len(run_id) <= MAX_STR_LEN
        and len(prompt_id) <= MAX_STR_LEN
        and len(group_id) <= MAX_STR_LEN
        and len(worker_id) <= MAX_STR_LEN
    ):
        prompt_ids = _arr_fast(doc, "p", "<i4", MAX_PROMPT_TOKENS)
    else:  # the checked path, in the order the fields are reported
        run_id = _field(doc, "run", str, where)
        prompt_id = _field(doc, "pid", str, where)
        group_id = _field(doc, "gid", str, where)
        prompt_ids = _arr_fast(doc, "p", "<i4", MAX_PROMPT_TOKENS)
        worker_id = _field(doc, "w", str, where)
    av = doc.get("av")
    if type(av) is not int:
        av = _field(doc, "av", int, where)
    ct = doc.get("ct")
    if type(ct) is not float:
        ct = float(_field(doc, "ct", (int, float), where))
    ft = doc.get("ft")
    if type(ft) is not float:
        ft = float(_field(doc, "ft", (int, float), where))
    return TrajectoryGroup(
        run_id=run_id,
        prompt_id=prompt_id,
        group_id=group_id,
        prompt_ids=prompt_ids,
        samples=samples,
        worker_id=worker_id,
        admission_version=av,
        created_at=ct,
        finished_at=ft,
        metadata=metadata,
        schema_version=sv,
    )
