"""buffer.codec: the wire format pinned to the byte, and the header's short keys (``pid`` is the
prompt id) checked by name. Pure Python, no Redis."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from buffer.codec import CodecError, decode_group, encode_group, pack
from buffer.schema import Sample, TrajectoryGroup

# encode_group(_group()), written by the schema-3 encoder: b"SLTG", u32 LE header length, the
# msgpack header (sv, run, pid, gid, w, av, ct, ft, m, r, f, i, then p/len/o/l/v/mk/nt/ts as
# {"t": dtype, "n": length}), zero padding to 8 bytes, then p, len, o, l, v, mk, nt, ts raw
# little-endian.
GOLDEN = bytes.fromhex(
    "534c5447eb000000de0014a2737603a372756ea572756e2d31a3706964a870726f6d70742d37a3676964a3"
    "672d31a177a27730a2617603a26374cb3ff8000000000000a26674cb4002000000000000a16d82a4746173"
    "6ba772657665727365a46576616cc2a17292cb3ff0000000000000cb0000000000000000a16692a473746f"
    "70a66c656e677468a169920001a17082a174a33c6934a16e02a36c656e82a174a33c6934a16e02a16f82a1"
    "74a33c6934a16e04a16c82a174a33c6634a16e04a17682a174a33c6934a16e04a26d6b82a174a33c6934a1"
    "6e04a26e7482a174a33c6934a16e02a2747382a174a33c6934a16e03000000000005000000060000000300"
    "00000100000001000000020000000300000009000000000000bf000080be000080bf000000c00300000003"
    "00000004000000040000000100000000000000010000000100000002000000010000000000000002000000"
    "00000000"
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
                loss_mask=np.array([1, 0, 1], np.int32),  # an episode: token 1 was appended
                turn_starts=np.array([0, 2], np.int32),  # two model turns
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
    assert [s.loss_mask.tolist() for s in g.samples] == [[1, 0, 1], [1]]  # type: ignore[union-attr]
    assert [s.turn_starts.tolist() for s in g.samples] == [[0, 2], [0]]  # type: ignore[union-attr]
    assert [s.num_turns for s in g.samples] == [2, 1]
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
        np.frombuffer(data, dt, 4, 16 + 16 * i) for i, dt in enumerate(["<i4", "<f4", "<i4", "<i4"])
    ]
    arrays += [np.frombuffer(data, "<i4", 2, 80), np.frombuffer(data, "<i4", 3, 88)]
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
        ({"sv": 2}, "unknown schema version 2 (this build reads 3"),
    ],
)
def test_header_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(CodecError, match=message.replace("(", r"\(")):
        decode_group(_with_header(**change))


def _with_arrays(mk: list[int], nt: list[int], ts: list[int]) -> bytes:
    """The golden group with its episode arrays replaced."""
    g = _group()
    g.samples[0].loss_mask = np.array(mk[:3], np.int32)
    g.samples[1].loss_mask = np.array(mk[3:], np.int32)
    g.samples[0].turn_starts = np.array(ts[: nt[0]], np.int32)
    g.samples[1].turn_starts = np.array(ts[nt[0] :], np.int32)
    return encode_group(g)


@pytest.mark.parametrize(
    ("mk", "nt", "ts", "message"),
    [
        ([1, 2, 1, 1], [2, 1], [0, 2, 0], "loss_mask values must be 0 or 1"),
        ([1, 0, 1, 1], [2, 1], [2, 0, 0], r"turn_starts \[2, 0\] not non-decreasing in 0..3"),
        ([1, 0, 1, 1], [2, 1], [0, 4, 0], r"turn_starts \[0, 4\] not non-decreasing in 0..3"),
    ],
)
def test_episode_arrays_are_checked(
    mk: list[int], nt: list[int], ts: list[int], message: str
) -> None:
    with pytest.raises(CodecError, match=message):
        decode_group(_with_arrays(mk, nt, ts))


def test_a_loss_mask_of_the_wrong_length_is_refused_at_encoding() -> None:
    g = _group()
    g.samples[0].loss_mask = np.array([1, 0], np.int32)
    with pytest.raises(CodecError, match="loss_mask"):
        encode_group(g)


def test_a_single_turn_sample_defaults_to_all_trained_one_turn() -> None:
    s = Sample(
        np.array([4, 5], np.int32), np.zeros(2, np.float32), np.zeros(2, np.int32), 0.0, "stop", 0
    )
    assert s.loss_mask.tolist() == [1, 1] and s.turn_starts.tolist() == [0]  # type: ignore[union-attr]
    empty = Sample(
        np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int32), 0.0, "abort", 0
    )
    assert empty.num_turns == 0 and empty.num_trained_tokens == 0


def test_turn_rewards_round_trip_and_stay_optional() -> None:
    g = _group()
    assert b"\xa2tr" not in encode_group(g)  # no scored turns: the header has no "tr" key
    g.samples[0].turn_rewards = np.array([0.25, 0.75], np.float32)  # sums to its reward 1.0
    back = decode_group(encode_group(g))
    assert back.samples[0].turn_rewards is not None
    assert back.samples[0].turn_rewards.tolist() == [0.25, 0.75]
    assert back.samples[1].turn_rewards is None


@pytest.mark.parametrize(
    ("tr", "message"),
    [
        ([[0.5], None], r"turn rewards \[0.5\] are not 2 floats"),
        ([[0.5, 1], None], "are not 2 floats"),
        ([[0.5, 0.25], None], "do not sum to the reward 1.0"),
        ([[0.5, float("inf")], None], "non-finite"),
        ([[0.5, 0.5]], "a list of 2 entries"),
    ],
)
def test_turn_rewards_are_checked(tr: list[Any], message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_group(_with_header(tr=tr))


def test_turn_rewards_of_the_wrong_count_are_refused_at_encoding() -> None:
    g = _group()
    g.samples[0].turn_rewards = np.array([1.0], np.float32)
    with pytest.raises(CodecError, match="1 turn rewards for 2 turns"):
        encode_group(g)
