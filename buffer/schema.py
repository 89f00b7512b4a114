"""The trajectory wire format: one group = ``n`` samples of one prompt.

Every array travels as raw little-endian bytes with its dtype and length (see ``codec``).
``SCHEMA_VERSION`` is bumped on any incompatible change; decoders refuse versions they do not
know.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

SCHEMA_VERSION = 2

# Scalars allowed in ``TrajectoryGroup.metadata`` values.
MetaValue = str | int | float | bool | None


@dataclass
class Sample:
    """One completion of the group's prompt.

    Invariant: ``len(output_ids) == len(behaviour_logp) == len(token_versions)``.
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
