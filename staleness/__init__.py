"""The version manager (policy version, admission gate, weight events, worker liveness) and the
pure staleness math (capacity, staleness, behaviour weights, decoupled-PPO loss, GRPO
advantages).

The version manager's modules: ``version_manager`` (the ``VersionManager`` class, a thin shell
around Redis), ``scripts`` (its Lua scripts, one atomic step each), ``records`` (what it hands
out: ``WeightEvent``, ``WorkerInfo``, ``GateSnapshot`` and its errors), ``checks`` (argument
checks), ``events`` (following weight publications). The math: ``gate`` (the staleness rule),
``weights``, ``loss``, ``advantages``; ``config`` holds the run file's sections.

Imports neither ``rollout_workers`` nor ``trainer`` nor the CLI. Names are loaded lazily, so
``from staleness import VersionManager`` does not import torch (``sluice status`` stays fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from staleness.advantages import grpo_advantages, turn_advantages
    from staleness.gate import admission_capacity, group_staleness, past_eta, staleness
    from staleness.loss import AGGREGATIONS, LossInputs, LossOutputs, decoupled_ppo_loss
    from staleness.records import (
        GateSnapshot,
        RunFinished,
        RunNotFound,
        RunSettingsMismatch,
        VersionError,
        WeightEvent,
        WorkerInfo,
    )
    from staleness.version_manager import WORKER_DEAD, VersionManager, list_runs
    from staleness.weights import (
        WEIGHT_LEVELS,
        WEIGHT_MODES,
        BehaviourWeights,
        behaviour_weights,
        logprob_gap,
    )

_WHERE: dict[str, str] = {
    "grpo_advantages": "staleness.advantages",
    "turn_advantages": "staleness.advantages",
    "admission_capacity": "staleness.gate",
    "staleness": "staleness.gate",
    "group_staleness": "staleness.gate",
    "past_eta": "staleness.gate",
    "AGGREGATIONS": "staleness.loss",
    "LossInputs": "staleness.loss",
    "LossOutputs": "staleness.loss",
    "decoupled_ppo_loss": "staleness.loss",
    "GateSnapshot": "staleness.records",
    "RunFinished": "staleness.records",
    "RunNotFound": "staleness.records",
    "RunSettingsMismatch": "staleness.records",
    "VersionError": "staleness.records",
    "WeightEvent": "staleness.records",
    "WorkerInfo": "staleness.records",
    "WORKER_DEAD": "staleness.version_manager",
    "VersionManager": "staleness.version_manager",
    "list_runs": "staleness.version_manager",
    "WEIGHT_LEVELS": "staleness.weights",
    "WEIGHT_MODES": "staleness.weights",
    "BehaviourWeights": "staleness.weights",
    "behaviour_weights": "staleness.weights",
    "logprob_gap": "staleness.weights",
}

__all__ = [
    "AGGREGATIONS",
    "WEIGHT_LEVELS",
    "WEIGHT_MODES",
    "WORKER_DEAD",
    "BehaviourWeights",
    "GateSnapshot",
    "LossInputs",
    "LossOutputs",
    "RunFinished",
    "RunNotFound",
    "RunSettingsMismatch",
    "VersionError",
    "VersionManager",
    "WeightEvent",
    "WorkerInfo",
    "admission_capacity",
    "behaviour_weights",
    "decoupled_ppo_loss",
    "group_staleness",
    "grpo_advantages",
    "list_runs",
    "logprob_gap",
    "past_eta",
    "staleness",
    "turn_advantages",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'staleness' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
