"""The trajectory wire format: one group = ``n`` samples of one prompt.

Every array travels as raw little-endian bytes with its dtype and length (see ``codec``).
``SCHEMA_VERSION`` is bumped on any incompatible change; decoders refuse versions they do not
know.

Version 3 (agentic episodes, docs/agents.md): a sample is one *episode*, the tokens after the
prompt in the order they entered the context: the model's sampled tokens and the tokens the
environment appended (tool output, the next user message). ``loss_mask`` tells them apart and
``turn_starts`` marks where each model turn begins. A single-turn sample is the one-turn case:
mask all ones, ``turn_starts == [0]``.

Per-turn rewards (optional within version 3): an episode may score each model turn;
``turn_rewards`` then holds them and ``reward`` is their sum (the episode's return). The
trainer credits a turn's tokens with the rewards from that turn on (``staleness.advantages.
turn_advantages``). A decoder of version 3 that predates the field reads such a group as an
episode-level one (its ``reward``), which is still a sound signal.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

SCHEMA_VERSION = 3

# Scalars allowed in ``TrajectoryGroup.metadata`` values.
MetaValue = str | int | float | bool | None


@dataclass
class Sample:
    """One completion of the group's prompt.

    Invariants (tests/unit/buffer/test_buffer_codec.py): ``len(output_ids) ==
    len(behaviour_logp) == len(token_versions) == len(loss_mask)``; ``turn_starts`` is
    non-decreasing within ``0..len(output_ids)``. An appended (``loss_mask == 0``) token carries
    behaviour log-prob 0 and the version of the last sampled token before it (the first sampled
    token after it when there is none before; the admission version when the episode sampled
    nothing), so the oldest of ``token_versions`` is always the oldest *trained* token's: the
    staleness rule reads it unchanged.
    """

    output_ids: npt.NDArray[np.int32]
    """int32[T]: generated token ids, in order (the stop/EOS token that ended it included)."""
    behaviour_logp: npt.NDArray[np.float32]
    """float32[T]: log-prob of each output token under the policy that sampled it, as the
    inference server reported it (of the temperature-scaled distribution)."""
    token_versions: npt.NDArray[np.int32]
    """int32[T]: policy (weight) version that generated each token; a sample interrupted by a
    weight update spans several versions, non-decreasing."""
    reward: float
    """Scalar reward of this sample (finite)."""
    finish_reason: str
    """"stop" | "length" | "abort" (the last only for samples a worker gave up on)."""
    index: int
    """Position of the sample within its group, 0..n-1."""
    loss_mask: npt.NDArray[np.int32] | None = None
    """int32[T]: 1 on tokens the policy sampled (trained), 0 on tokens the environment appended
    (never trained, context only). None at construction = all ones (a single-turn sample)."""
    turn_starts: npt.NDArray[np.int32] | None = None
    """int32[K]: offset in ``output_ids`` of the first token of each of the K model turns (one
    per generate call of the episode). None at construction = ``[0]`` (one turn; ``[]`` for a
    sample without tokens)."""
    turn_rewards: npt.NDArray[np.float32] | None = None
    """float32[K] or None: the reward of each model turn when the episode scored its turns
    (one per ``turn_starts`` entry, finite; ``reward`` is then their sum); None when the
    episode has one reward."""

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = np.ones(self.output_ids.shape[0], dtype=np.int32)
        if self.turn_starts is None:
            self.turn_starts = np.zeros(1 if self.output_ids.shape[0] else 0, dtype=np.int32)

    @property
    def num_turns(self) -> int:
        """Model turns of the episode (generate calls that produced tokens)."""
        assert self.turn_starts is not None
        return int(self.turn_starts.shape[0])

    @property
    def num_trained_tokens(self) -> int:
        assert self.loss_mask is not None
        return int(self.loss_mask.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.output_ids.shape[0])


@dataclass
class TrajectoryGroup:
    """``n`` samples of one prompt, the unit that is admitted, pushed, trained and acked."""

    run_id: str
    """Run namespace (``sluice:{run_id}:...`` in Redis)."""
    prompt_id: str
    """Stable id of the prompt within its dataset/task."""
    prompt_ids: npt.NDArray[np.int32]
    """int32[P]: prompt token ids."""
    samples: list[Sample]
    """The group's samples (GRPO normalises rewards within a group)."""
    worker_id: str
    """Id of the rollout worker that produced the group."""
    admission_version: int
    """Trainer version at the moment the group was admitted by the staleness gate."""
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """UUID (hex) of the group; unique across the run; the exactly-once key."""
    created_at: float = field(default_factory=time.time)
    """Unix time the group was admitted."""
    finished_at: float = field(default_factory=time.time)
    """Unix time the last sample finished."""
    metadata: dict[str, MetaValue] = field(default_factory=dict)
    """Small map of str to scalar (task name, eval flags, ...)."""
    schema_version: int = SCHEMA_VERSION

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def num_output_tokens(self) -> int:
        return sum(s.num_tokens for s in self.samples)

    def min_version(self) -> int:
        """Oldest policy version of any token in the group (admission version if no tokens)."""
        mins = [int(s.token_versions.min()) for s in self.samples if s.num_tokens]
        return min(mins) if mins else self.admission_version
