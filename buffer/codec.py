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
    """Serialize a group. Raises ``CodecError`` for a group that would not decode."""
    samples = []
    for s in g.samples:
        if not (s.output_ids.shape == s.behaviour_logp.shape == s.token_versions.shape):
            raise CodecError(
                f"sample {s.index}: output_ids {s.output_ids.shape}, behaviour_logp "
                f"{s.behaviour_logp.shape} and token_versions {s.token_versions.shape} differ"
            )
        samples.append(
            {
                "o": _arr(s.output_ids, "<i4"),
                "l": _arr(s.behaviour_logp, "<f4"),
                "v": _arr(s.token_versions, "<i4"),
                "r": float(s.reward),
                "f": s.finish_reason,
                "i": int(s.index),
            }
        )
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
        "s": samples,
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
    raw_samples = _field(doc, "s", list, where)
    if not 1 <= len(raw_samples) <= MAX_SAMPLES_PER_GROUP:
        raise CodecError(f"group: {len(raw_samples)} samples, allowed 1..{MAX_SAMPLES_PER_GROUP}")
    meta = _field(doc, "m", dict, where)
    if len(meta) > MAX_METADATA_ITEMS:
        raise CodecError(f"group: metadata has {len(meta)} items, allowed {MAX_METADATA_ITEMS}")
    metadata: dict[str, MetaValue] = {}
    for k, v in meta.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, str | int | float | bool)):
            raise CodecError(f"group: metadata {k!r} must map str to a scalar")
        metadata[k] = v
    samples = []
    for j, rs in enumerate(raw_samples):
        w = f"sample {j}"
        if not isinstance(rs, dict):
            raise CodecError(f"{w}: must be a map")
        o = _decode_arr(rs, "o", "<i4", MAX_TOKENS_PER_SAMPLE, w)
        lp = _decode_arr(rs, "l", "<f4", MAX_TOKENS_PER_SAMPLE, w)
        v = _decode_arr(rs, "v", "<i4", MAX_TOKENS_PER_SAMPLE, w)
        if not (o.shape == lp.shape == v.shape):
            raise CodecError(
                f"{w}: lengths disagree (output_ids {o.shape[0]}, behaviour_logp "
                f"{lp.shape[0]}, token_versions {v.shape[0]})"
            )
        reward = _field(rs, "r", (int, float), w)
        if not math.isfinite(reward):
            raise CodecError(f"{w}: reward {reward!r} is not finite")
        finish = _field(rs, "f", str, w)
        if finish not in FINISH_REASONS:
            raise CodecError(f"{w}: finish reason {finish!r} not in {sorted(FINISH_REASONS)}")
        samples.append(
            Sample(
                output_ids=o,
                behaviour_logp=lp,
                token_versions=v,
                reward=float(reward),
                finish_reason=finish,
                index=_field(rs, "i", int, w),
            )
        )
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
