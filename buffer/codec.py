"""msgpack codec for ``TrajectoryGroup`` — never pickle.

A payload (schema version 3) is a msgpack header followed by the arrays' raw bytes::

    b"SLTG"  u32 little-endian H  header (msgpack map, H bytes)  zero padding to a multiple of 8
    array data: p, len, o, l, v, mk, nt, ts — each n x itemsize raw little-endian bytes, back
    to back

The header's keys are short and part of the wire format (they never change; the Python names
are the ``TrajectoryGroup`` fields): ``sv`` schema version, ``run`` run id, ``pid`` *prompt* id
(not a process id), ``gid`` group id, ``w`` worker id, ``av`` admission version, ``ct`` / ``ft``
created / finished unix time, ``m`` metadata, and per sample ``r`` rewards, ``f`` finish
reasons, ``i`` indices; ``tr`` (optional: only when an episode scored its turns) per sample
``None`` or one finite float per model turn (the sample's ``nt``), summing to its ``r``.
Every array is ``{"t": dtype, "n": length}`` under its key (``p``
prompt token ids, ``len`` sample lengths, ``o`` output ids, ``l`` behaviour log-probs, ``v``
token versions, ``mk`` loss mask (0/1, one per output token), ``nt`` turns per sample, ``ts``
turn starts, ``nt[i]`` of them for sample ``i``); its bytes are found by position (the arrays tile the data area in that
order, exactly: nothing missing, nothing extra). The decoder reads the small header with
msgpack and returns the arrays as read-only ``numpy.frombuffer`` views of the payload, 8-byte
aligned: a group of 200 KB is not copied again after Redis handed it over (a msgpack ``bin``
field would be). Decoding validates
everything it is given (magic, schema version, field types, allowed dtypes, lengths that agree
and tile the data exactly, bounded sizes) and raises ``CodecError`` naming the first problem;
it never executes anything from the payload.
"""

from __future__ import annotations

import math
import struct
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


MAGIC = b"SLTG"
_PREFIX = struct.Struct("<4sI")
_MAX_TOKENS_PER_GROUP = MAX_TOKENS_PER_SAMPLE * MAX_SAMPLES_PER_GROUP
# The arrays in the data area, in this order: header key, dtype, bound on the length.
_ARRAYS = (
    ("p", "<i4", MAX_PROMPT_TOKENS),
    ("len", "<i4", MAX_SAMPLES_PER_GROUP),
    ("o", "<i4", _MAX_TOKENS_PER_GROUP),
    ("l", "<f4", _MAX_TOKENS_PER_GROUP),
    ("v", "<i4", _MAX_TOKENS_PER_GROUP),
    ("mk", "<i4", _MAX_TOKENS_PER_GROUP),
    ("nt", "<i4", MAX_SAMPLES_PER_GROUP),
    ("ts", "<i4", _MAX_TOKENS_PER_GROUP),
)
_ALIGN = 8


class CodecError(ValueError):
    """A payload that cannot be decoded into a valid ``TrajectoryGroup``; the message names why."""


def _arr(a: npt.NDArray[Any], dtype: str) -> npt.NDArray[Any]:
    return np.ascontiguousarray(a, dtype=_DTYPES[dtype])


def encode_group(g: TrajectoryGroup) -> bytes:
    """Serialize a group. Raises ``CodecError`` for a group that would not decode.

    Per-sample arrays are laid end to end, one array per field plus a length array, so that
    decoding is five ``frombuffer`` views whatever the group size; the bytes are copied once,
    straight from the samples' arrays into the payload.
    """
    for s in g.samples:
        assert s.loss_mask is not None and s.turn_starts is not None
        if s.turn_rewards is not None and s.turn_rewards.shape[0] != s.num_turns:
            raise CodecError(
                f"sample {s.index}: {s.turn_rewards.shape[0]} turn rewards for {s.num_turns} turns"
            )
        if not (
            s.output_ids.shape
            == s.behaviour_logp.shape
            == s.token_versions.shape
            == s.loss_mask.shape
        ):
            raise CodecError(
                f"sample {s.index}: output_ids {s.output_ids.shape}, behaviour_logp "
                f"{s.behaviour_logp.shape}, token_versions {s.token_versions.shape} and "
                f"loss_mask {s.loss_mask.shape} differ"
            )
    lens = np.fromiter((s.num_tokens for s in g.samples), dtype="<i4", count=len(g.samples))
    pieces = [
        [_arr(g.prompt_ids, "<i4")],
        [lens],
        [_arr(s.output_ids, "<i4") for s in g.samples],
        [_arr(s.behaviour_logp, "<f4") for s in g.samples],
        [_arr(s.token_versions, "<i4") for s in g.samples],
        [_arr(s.loss_mask, "<i4") for s in g.samples],  # type: ignore[arg-type]
        [np.fromiter((s.num_turns for s in g.samples), dtype="<i4", count=len(g.samples))],
        [_arr(s.turn_starts, "<i4") for s in g.samples],  # type: ignore[arg-type]
    ]
    # The wire keys (module docstring): "pid" is the prompt id, never a process id.
    doc: dict[str, Any] = {
        "sv": g.schema_version,
        "run": g.run_id,
        "pid": g.prompt_id,
        "gid": g.group_id,
        "w": g.worker_id,
        "av": int(g.admission_version),
        "ct": float(g.created_at),
        "ft": float(g.finished_at),
        "m": dict(g.metadata),
        "r": [float(s.reward) for s in g.samples],
        "f": [s.finish_reason for s in g.samples],
        "i": [int(s.index) for s in g.samples],
    }
    if any(s.turn_rewards is not None for s in g.samples):
        doc["tr"] = [
            None if s.turn_rewards is None else [float(x) for x in s.turn_rewards]
            for s in g.samples
        ]
    for (k, dtype, _), arr in zip(_ARRAYS, pieces, strict=True):
        doc[k] = {"t": dtype, "n": sum(int(a.shape[0]) for a in arr)}
    return pack(doc, [a for arr in pieces for a in arr])


def pack(header: dict[str, Any], arrays: list[npt.NDArray[Any]]) -> bytes:
    """The container: magic, header length, msgpack header, zero padding, then the bytes of
    ``arrays`` end to end. (Public so that tests can build payloads wrong in one chosen way.)"""
    head = msgpack.packb(header, use_bin_type=True)
    pad = -(_PREFIX.size + len(head)) % _ALIGN
    parts: list[Any] = [_PREFIX.pack(MAGIC, len(head)), head, bytes(pad)]
    parts += [a.data.cast("B") for a in arrays if a.size]
    return b"".join(parts)


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


def _array_length(d: dict[str, Any], key: str, want: str, limit: int) -> int:
    """The length of array ``key`` as the header declares it, checked (dtype, bounds)."""
    a = d.get(key)
    if type(a) is dict and a.get("t") == want:  # the common case, checked inline
        n = a.get("n")
        if type(n) is int and 0 <= n <= limit:
            return n
    a = _field(d, key, dict, "group")
    dt = a.get("t")
    if dt != want:
        raise CodecError(f"group: array {key!r} has dtype {dt!r}, expected {want!r}")
    n = a.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CodecError(f"group: array {key!r} has invalid length {n!r}")
    raise CodecError(f"group: array {key!r} length {n} exceeds the limit {limit}")


_unpackb = msgpack.unpackb
_ONLY_FLOAT = {float}
_ONLY_INT = {int}
_ITEMSIZE = {name: dt.itemsize for name, dt in _DTYPES.items()}
MAX_HEADER_BYTES = 1 << 20


def _header(payload: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """The msgpack header and the offset where the array data starts."""
    size = len(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise CodecError(f"payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}")
    if size < _PREFIX.size or bytes(payload[:4]) != MAGIC:
        raise CodecError(
            f"not a sluice trajectory payload: no {MAGIC!r} magic (garbage, another writer's "
            "entry, or a schema older than 2)"
        )
    hlen = _PREFIX.unpack_from(payload)[1]
    end = _PREFIX.size + hlen
    if hlen > MAX_HEADER_BYTES or end > size:
        raise CodecError(
            f"header of {hlen} bytes does not fit the payload of {size} bytes (limit "
            f"{MAX_HEADER_BYTES}); truncated or corrupt"
        )
    try:
        doc = _unpackb(
            memoryview(payload)[_PREFIX.size : end],
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_STR_LEN,
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"header is not a msgpack document: {type(e).__name__}: {e}") from None
    if type(doc) is not dict:
        raise CodecError(f"header must be a map, got {type(doc).__name__}")
    data = end + (-end % _ALIGN)
    if data > size or any(payload[end:data]):
        raise CodecError("padding after the header is missing or not zero; truncated or corrupt")
    return doc, data


def _arrays(
    payload: bytes | bytearray | memoryview, doc: dict[str, Any], start: int
) -> list[npt.NDArray[Any]]:
    """The eight arrays (p, len, o, l, v, mk, nt, ts) as read-only views of the payload: they tile the data
    area from ``start`` in ``_ARRAYS`` order, exactly."""
    spans = []
    off = start
    for k, dtype, limit in _ARRAYS:
        n = _array_length(doc, k, dtype, limit)
        spans.append((off, n, _DTYPES[dtype]))
        off += n * _ITEMSIZE[dtype]
    if off != len(payload):
        raise CodecError(
            f"array data is {len(payload) - start} bytes, the header describes {off - start}; "
            "truncated or corrupt"
        )
    return [np.frombuffer(payload, dtype=dt, count=n, offset=at) for at, n, dt in spans]


def _metadata(doc: dict[str, Any]) -> dict[str, MetaValue]:
    meta = doc.get("m")
    if type(meta) is not dict:
        meta = _field(doc, "m", dict, "group")
    metadata: dict[str, MetaValue] = {}
    if meta:
        if len(meta) > MAX_METADATA_ITEMS:
            raise CodecError(f"group: metadata has {len(meta)} items, allowed {MAX_METADATA_ITEMS}")
        for k, v in meta.items():
            if not isinstance(k, str) or not (v is None or isinstance(v, str | int | float | bool)):
                raise CodecError(f"group: metadata {k!r} must map str to a scalar")
            metadata[k] = v
    return metadata


def _sample_lengths(
    lens_arr: npt.NDArray[Any], o: npt.NDArray[Any], lp: npt.NDArray[Any], tv: npt.NDArray[Any]
) -> list[int]:
    """The per-sample token counts, checked against the bounds and the token arrays."""
    # Small per-group lists are checked in plain Python: cheaper than numpy calls at n ~ 8.
    lens: list[int] = lens_arr.tolist()
    n = len(lens)
    if n < 1:
        raise CodecError(f"group: {n} samples, allowed 1..{MAX_SAMPLES_PER_GROUP}")
    if min(lens) < 0 or max(lens) > MAX_TOKENS_PER_SAMPLE:
        raise CodecError(f"group: sample lengths must lie in 0..{MAX_TOKENS_PER_SAMPLE}")
    total = sum(lens)
    if not (o.shape[0] == lp.shape[0] == tv.shape[0] == total):
        raise CodecError(
            f"group: lengths disagree (sample lengths sum to {total}; output_ids {o.shape[0]}, "
            f"behaviour_logp {lp.shape[0]}, token_versions {tv.shape[0]})"
        )
    return lens


def _episode_arrays(
    lens: list[int], mk: npt.NDArray[Any], nt: npt.NDArray[Any], ts: npt.NDArray[Any]
) -> list[int]:
    """Loss mask (0/1, one per output token) and turns (per-sample counts, starts within
    ``0..len`` and non-decreasing), checked; returns the per-sample turn counts."""
    if mk.shape[0] != sum(lens):
        raise CodecError(f"group: loss_mask has {mk.shape[0]} entries for {sum(lens)} tokens")
    if mk.size and (int(mk.min()) < 0 or int(mk.max()) > 1):
        raise CodecError("group: loss_mask values must be 0 or 1")
    turns: list[int] = nt.tolist()
    if len(turns) != len(lens):
        raise CodecError(f"group: {len(turns)} turn counts for {len(lens)} samples")
    if (turns and min(turns) < 0) or sum(turns) != ts.shape[0]:
        raise CodecError(
            f"group: turn counts (sum {sum(turns)}) disagree with turn_starts ({ts.shape[0]})"
        )
    a = 0
    for length, k in zip(lens, turns, strict=True):
        t = ts[a : a + k]
        if k and (int(t[0]) < 0 or int(t[-1]) > length or (k > 1 and bool((t[1:] < t[:-1]).any()))):
            raise CodecError(f"group: turn_starts {t.tolist()} not non-decreasing in 0..{length}")
        a += k
    return turns


def _per_sample(doc: dict[str, Any], n: int) -> tuple[list[float], list[str], list[int]]:
    """Rewards (finite floats), finish reasons and indices: one of each per sample."""
    rewards = doc.get("r")
    if type(rewards) is not list:
        rewards = _field(doc, "r", list, "group")
    finishes = doc.get("f")
    if type(finishes) is not list:
        finishes = _field(doc, "f", list, "group")
    indices = doc.get("i")
    if type(indices) is not list:
        indices = _field(doc, "i", list, "group")
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
    return rewards, finishes, indices


def _turn_rewards(
    doc: dict[str, Any], turns: list[int], rewards: list[float]
) -> list[npt.NDArray[np.float32] | None]:
    """The optional per-turn rewards (``tr``): per sample None or ``turns[i]`` finite floats
    whose sum is the sample's reward (to float rounding)."""
    tr = doc.get("tr")
    if tr is None:
        return [None] * len(turns)
    if type(tr) is not list or len(tr) != len(turns):
        raise CodecError(f"group: turn rewards must be a list of {len(turns)} entries")
    out: list[npt.NDArray[np.float32] | None] = []
    for k, r, x in zip(turns, rewards, tr, strict=True):
        if x is None:
            out.append(None)
            continue
        if type(x) is not list or len(x) != k or not all(type(v) is float for v in x):
            raise CodecError(f"group: turn rewards {x!r} are not {k} floats (one per turn)")
        if not all(map(math.isfinite, x)):
            raise CodecError(f"group: turn rewards {x!r} hold a non-finite number")
        if not math.isclose(sum(x), r, rel_tol=1e-5, abs_tol=1e-5):
            raise CodecError(f"group: turn rewards {x!r} do not sum to the reward {r!r}")
        out.append(np.asarray(x, dtype=np.float32))
    return out


def _ids(doc: dict[str, Any]) -> tuple[str, str, str, str]:
    """Run id, prompt id (wire key ``pid``), group id and worker id."""
    run_id = doc.get("run")
    prompt_id = doc.get("pid")
    group_id = doc.get("gid")
    worker_id = doc.get("w")
    if not (
        type(run_id) is str
        and type(prompt_id) is str
        and type(group_id) is str
        and type(worker_id) is str
        and len(run_id) <= MAX_STR_LEN
        and len(prompt_id) <= MAX_STR_LEN
        and len(group_id) <= MAX_STR_LEN
        and len(worker_id) <= MAX_STR_LEN
    ):  # the checked path, in the order the fields are reported
        run_id = _field(doc, "run", str, "group")
        prompt_id = _field(doc, "pid", str, "group")
        group_id = _field(doc, "gid", str, "group")
        worker_id = _field(doc, "w", str, "group")
    return run_id, prompt_id, group_id, worker_id


def _versions_and_times(doc: dict[str, Any]) -> tuple[int, float, float]:
    """Admission version, created-at and finished-at (an int time is taken as a float)."""
    av = doc.get("av")
    if type(av) is not int:
        av = _field(doc, "av", int, "group")
    ct = doc.get("ct")
    if type(ct) is not float:
        ct = float(_field(doc, "ct", (int, float), "group"))
    ft = doc.get("ft")
    if type(ft) is not float:
        ft = float(_field(doc, "ft", (int, float), "group"))
    return av, ct, ft


def decode_group(payload: bytes) -> TrajectoryGroup:
    """Parse and validate. Raises ``CodecError`` (only) on any malformed payload.

    The fast path checks the common case inline (exact types, the encoder's dtypes); anything
    unexpected falls back to ``_field`` / ``_array_length``, which raise the message naming the
    problem, so every check applies and every error reads the same on either path. The checks
    run in a fixed order (header, schema version, arrays, metadata, sample lengths, per-sample
    fields, ids, versions and times), so a payload with several problems names the first.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    doc, start = _header(payload)
    sv = doc.get("sv")
    if sv != SCHEMA_VERSION:
        raise CodecError(f"unknown schema version {sv!r} (this build reads {SCHEMA_VERSION})")
    p_ids, lens_arr, o, lp, tv, mk, nt, ts = _arrays(payload, doc, start)
    metadata = _metadata(doc)
    lens = _sample_lengths(lens_arr, o, lp, tv)
    turns = _episode_arrays(lens, mk, nt, ts)
    rewards, finishes, indices = _per_sample(doc, len(lens))
    turn_rewards = _turn_rewards(doc, turns, rewards)
    samples = []
    a = c = 0
    for length, k, reward, finish, index, tr in zip(
        lens, turns, rewards, finishes, indices, turn_rewards, strict=True
    ):
        b = a + length
        samples.append(
            Sample(o[a:b], lp[a:b], tv[a:b], reward, finish, index, mk[a:b], ts[c : c + k], tr)
        )
        a = b
        c += k
    run_id, prompt_id, group_id, worker_id = _ids(doc)
    av, ct, ft = _versions_and_times(doc)
    return TrajectoryGroup(
        run_id=run_id,
        prompt_id=prompt_id,
        group_id=group_id,
        prompt_ids=p_ids,
        samples=samples,
        worker_id=worker_id,
        admission_version=av,
        created_at=ct,
        finished_at=ft,
        metadata=metadata,
        schema_version=sv,
    )
