"""buffer.codec: the wire format pinned to the byte, and the header's short keys (``pid`` is the
prompt id) checked by name. Pure Python, no Redis."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from buffer.codec import CodecError, decode_group, encode_group, pack
from buffer.schema import Sample, TrajectoryGroup

# encode_group(_group()), written by the schema-2 encoder: b"SLTG", u32 LE header length 0xc4,
# the msgpack header (sv, run, pid, gid, w, av, ct, ft, m, r, f, i, then p/len/o/l/v as
# {"t": dtype, "n": length}), zero padding to 8 bytes, then p, len, o, l, v raw little-endian.
GOLDEN = bytes.fromhex(
    "534c5447c4000000de0011a2737602a372756ea572756e2d31a3706964a870726f6d70742d37a3676964a3"
    "672d31a177a27730a2617603a26374cb3ff8000000000000a26674cb4002000000000000a16d82a4746173"
    "6ba772657665727365a46576616cc2a17292cb3ff0000000000000cb0000000000000000a16692a47374"
    "6f70a66c656e677468a169920001a17082a174a33c6934a16e02a36c656e82a174a33c6934a16e02a16f"
    "82a174a33c6934a16e04a16c82a174a33c6634a16e04a17682a174a33c6934a16e04000000000500000006"
    "000000030000000100000001000000020000000300000009000000000000bf000080be000080bf000000c0"
    "03000000030000000400000004000000"
)


def _group() -> TrajectoryGroup:
    return TrajectoryGroup(
        run_id="run-1",
        prompt_id="prompt-7",
        prompt_ids=np.array([5, 6], np.int32),
        samples=[
            Sample(
                np.array([1, 2, 3], np.int32),
                np.array([-0.5, -0.25, -1.0], np.float32),
                np.array([3, 3, 4], np.int32),
                1.0,
                "stop",
                0,
            ),
            Sample(
                np.array([9], np.int32),
                np.array([-2.0], np.float32),
                np.array([4], np.int32),
                0.0,
                "length",
                1,
            ),
        ],
        worker_id="w0",
        admission_version=3,
        group_id="g-1",
        created_at=1.5,
        finished_at=2.25,
        metadata={"task": "reverse", "eval": False},
    )


def test_encoding_is_pinned_to_the_byte() -> None:
    assert encode_group(_group()) == GOLDEN


def test_golden_payload_decodes_to_every_field() -> None:
    g = decode_group(GOLDEN)
    assert (g.run_id, g.prompt_id, g.group_id, g.worker_id) == ("run-1", "prompt-7", "g-1", "w0")
    assert (g.admission_version, g.created_at, g.finished_at) == (3, 1.5, 2.25)
    assert g.metadata == {"task": "reverse", "eval": False}
    assert g.prompt_ids.tolist() == [5, 6]
    assert [s.output_ids.tolist() for s in g.samples] == [[1, 2, 3], [9]]
    assert [s.behaviour_logp.tolist() for s in g.samples] == [[-0.5, -0.25, -1.0], [-2.0]]
    assert [s.token_versions.tolist() for s in g.samples] == [[3, 3, 4], [4]]
    assert [(s.reward, s.finish_reason, s.index) for s in g.samples] == [
        (1.0, "stop", 0),
        (0.0, "length", 1),
    ]


def _with_header(**change: Any) -> bytes:
    """The golden payload with header fields changed (a value of None removes the key)."""
    hlen = int.from_bytes(GOLDEN[4:8], "little")
    head = msgpack.unpackb(GOLDEN[8 : 8 + hlen], raw=False)
    for k, v in change.items():
        if v is None:
            del head[k]
        else:
            head[k] = v
    data = GOLDEN[8 + hlen + (-(8 + hlen) % 8) :]
    arrays = [np.frombuffer(data, "<i4", 2, 0), np.frombuffer(data, "<i4", 2, 8)]
    arrays += [
        np.frombuffer(data, dt, 4, 16 + 16 * i) for i, dt in enumerate(["<i4", "<f4", "<i4"])
    ]
    return pack(head, arrays)


def test_pack_rebuilds_the_golden_payload() -> None:
    assert _with_header() == GOLDEN


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pid": None}, "group: missing field 'pid'"),  # the prompt id's wire key
        ({"pid": 7}, "group: field 'pid' has type int"),
        ({"run": "x" * 5000}, "field 'run' longer than 4096"),
        ({"av": True}, "field 'av' must be"),
        ({"ct": "soon"}, "field 'ct' has type str"),
        ({"r": [1.0]}, "2 sample lengths but 1 rewards"),
        ({"r": [1, 0.0]}, "reward 1 is not a float"),
        ({"f": ["stop", "done"]}, "finish reason 'done'"),
        ({"i": [0, 1.0]}, "sample index 1.0 is not an integer"),
        ({"m": {"k": [1]}}, "metadata 'k' must map str to a scalar"),
        ({"len": {"t": "<i4", "n": -1}}, "array 'len' has invalid length -1"),
    ],
)
def test_header_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(CodecError, match=message.replace("(", r"\(")):
        decode_group(_with_header(**change))
