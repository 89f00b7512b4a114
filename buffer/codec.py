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


def decode_group(payload: bytes) -> TrajectoryGroup:
    """Parse and validate. Raises ``CodecError`` (only) on any malformed payload."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise CodecError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        doc = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, max_bin_len=MAX_PAYLOAD_BYTES
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"not a msgpack document: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict):
        raise CodecError(f"top level must be a map, got {type(doc).__name__}")
    sv = doc.get("sv")
    if sv != SCHEMA_VERSION:
        raise CodecError(f"unknown schema version {sv!r} (this build reads {SCHEMA_VERSION})")
    where = "group"
    meta = _field(doc, "m", dict, where)
    if len(meta) > MAX_METADATA_ITEMS:
        raise CodecError(f"group: metadata has {len(meta)} items, allowed {MAX_METADATA_ITEMS}")
    metadata: dict[str, MetaValue] = {}
    for k, v in meta.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, str | int | float | bool)):
            raise CodecError(f"group: metadata {k!r} must map str to a scalar")
        metadata[k] = v
    # Small per-group lists are checked in plain Python: cheaper than numpy calls at n ~ 8.
    lens = _decode_arr(doc, "len", "<i4", MAX_SAMPLES_PER_GROUP, where).tolist()
    n = len(lens)
    if n < 1:
        raise CodecError(f"group: {n} samples, allowed 1..{MAX_SAMPLES_PER_GROUP}")
    if min(lens) < 0 or max(lens) > MAX_TOKENS_PER_SAMPLE:
        raise CodecError(f"group: sample lengths must lie in 0..{MAX_TOKENS_PER_SAMPLE}")
    total = sum(lens)
    limit = MAX_TOKENS_PER_SAMPLE * MAX_SAMPLES_PER_GROUP
    o = _decode_arr(doc, "o", "<i4", limit, where)
    lp = _decode_arr(doc, "l", "<f4", limit, where)
    tv = _decode_arr(doc, "v", "<i4", limit, where)
    if not (o.shape[0] == lp.shape[0] == tv.shape[0] == total):
        raise CodecError(
            f"group: lengths disagree (sample lengths sum to {total}; output_ids {o.shape[0]}, "
            f"behaviour_logp {lp.shape[0]}, token_versions {tv.shape[0]})"
        )
    rewards = _field(doc, "r", list, where)
    finishes = _field(doc, "f", list, where)
    indices = _field(doc, "i", list, where)
    if not (len(rewards) == len(finishes) == len(indices) == n):
        raise CodecError(
            f"group: {n} sample lengths but {len(rewards)} rewards, {len(finishes)} finish "
            f"reasons, {len(indices)} indices"
        )
    if not all(type(r) is float for r in rewards):  # the encoder writes floats only
        bad = next(r for r in rewards if type(r) is not float)
        raise CodecError(f"group: reward {bad!r} is not a float")
    if not all(map(math.isfinite, rewards)):
        bad = next(r for r in rewards if not math.isfinite(r))
        raise CodecError(f"group: reward {bad!r} is not a finite number")
    if not FINISH_REASONS.issuperset(finishes):
        bad = next(f for f in finishes if f not in FINISH_REASONS)
        raise CodecError(f"group: finish reason {bad!r} not in {sorted(FINISH_REASONS)}")
    if not all(type(i) is int for i in indices):
        bad = next(i for i in indices if type(i) is not int)
        raise CodecError(f"group: sample index {bad!r} is not an integer")
    samples = []
    a = 0
    for j, length in enumerate(lens):
        b = a + length
        samples.append(
            Sample(
                output_ids=o[a:b],
                behaviour_logp=lp[a:b],
                token_versions=tv[a:b],
                reward=rewards[j],
                finish_reason=finishes[j],
                index=indices[j],
            )
        )
        a = b
    return TrajectoryGroup(
        run_id=_field(doc, "run", str, where),
        prompt_id=_field(doc, "pid", str, where),
        group_id=_field(doc, "gid", str, where),
        prompt_ids=_decode_arr(doc, "p", "<i4", MAX_PROMPT_TOKENS, where),
        samples=samples,
        worker_id=_field(doc, "w", str, where),
        admission_version=_field(doc, "av", int, where),
        created_at=float(_field(doc, "ct", (int, float), where)),
        finished_at=float(_field(doc, "ft", (int, float), where)),
        metadata=metadata,
        schema_version=sv,
    )
