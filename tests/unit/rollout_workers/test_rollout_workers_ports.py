"""The Protocols the rollout worker uses match their implementations, signature by signature
(mypy checks the same statically: the ``TYPE_CHECKING`` block of ``rollout_workers/ports.py``),
and the unit tests' fakes satisfy them."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from rollout_fakes import (
    FakeBuffer,
    FakeClient,
    FakeEvals,
    FakePrompts,
    FakeRecords,
    FakeVersions,
)

from buffer.redis_buffer import RedisTrajectoryBuffer
from inference.client import SGLangClient
from inference.protocol import InferenceClient
from rollout_workers.evaluator import RedisEvalStore
from rollout_workers.metrics import RedisRecords
from rollout_workers.ports import (
    EvalStore,
    MetricsSink,
    PromptLeases,
    TrajectorySink,
    VersionSource,
)
from rollout_workers.prompts import PromptSource
from staleness.version_manager import VersionManager

PAIRS: list[tuple[type[Any], type[Any]]] = [
    (InferenceClient, SGLangClient),
    (VersionSource, VersionManager),
    (TrajectorySink, RedisTrajectoryBuffer),
    (PromptLeases, PromptSource),
    (MetricsSink, RedisRecords),
    (EvalStore, RedisEvalStore),
]


def members(proto: type[Any]) -> list[str]:
    return [n for n, v in vars(proto).items() if not n.startswith("_") and callable(v)]


def shape(fn: Any) -> list[tuple[str, Any, bool, str]]:
    """Each parameter's name, kind, whether it has a default, and its annotation."""
    sig = inspect.signature(fn)
    return [
        (p.name, p.kind, p.default is not inspect.Parameter.empty, str(p.annotation))
        for p in sig.parameters.values()
    ]


@pytest.mark.parametrize(("proto", "impl"), PAIRS, ids=lambda t: t.__name__)
def test_each_protocol_method_has_its_implementations_signature(
    proto: type[Any], impl: type[Any]
) -> None:
    assert members(proto), proto
    for name in members(proto):
        want, have = getattr(proto, name), getattr(impl, name)
        assert shape(want) == shape(have), f"{proto.__name__}.{name}"
        assert inspect.signature(want).return_annotation == (
            inspect.signature(have).return_annotation
        ), f"{proto.__name__}.{name}"
        assert inspect.iscoroutinefunction(want) == inspect.iscoroutinefunction(have), name


def test_the_inference_protocol_is_what_the_worker_calls() -> None:
    assert set(members(InferenceClient)) == {
        "generate",
        "pause",
        "resume",
        "abort",
        "update_weights_from_disk",
        "init_weights_update_group",
        "update_weights_from_distributed",
        "load_lora_adapter",
        "unload_lora_adapter",
        "weight_version",
        "health",
        "close",
    }


def test_the_fakes_satisfy_the_protocols() -> None:
    assert isinstance(FakeClient(), InferenceClient)
    assert isinstance(FakeVersions(), VersionSource)
    assert isinstance(FakeBuffer(), TrajectorySink)
    assert isinstance(FakePrompts([]), PromptLeases)
    assert isinstance(FakeRecords(), MetricsSink)
    assert isinstance(FakeEvals(), EvalStore)
