"""``weights.publish``: what each transport writes and records, in which order, with fakes for
the run's records and the broadcast (the real broadcast: ``tests/integration/test_weight_sync.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from weights.plan import FMT_DONE
from weights.publish import DiskPublisher, DistributedPublisher, WeightPublisher


class _Model(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(1, 1)

    def save_pretrained(self, path: str, safe_serialization: bool) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"w")


class _Records:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    async def publish_weights(self, version: int, location: str, fmt: str = "safetensors") -> str:
        self.log.append(("publish", version, location, fmt))
        return "0-1"

    async def record_disk_weights(
        self, version: int, location: str, fmt: str = "safetensors"
    ) -> bool:
        self.log.append(("disk", version, location, fmt))
        return True


class _Sync:
    group = "sluice-g1"

    def __init__(self, log: list[tuple[Any, ...]], ok: bool) -> None:
        self.log, self.ok = log, ok

    async def broadcast(self, version: int, model: torch.nn.Module) -> bool:
        self.log.append(("broadcast", version))
        return self.ok


async def test_disk_publishes_each_version_dir_and_prunes(tmp_path: Path) -> None:
    log: list[tuple[Any, ...]] = []
    pub: WeightPublisher = DiskPublisher(_Records(log), tmp_path, keep=2)
    for v in (1, 2, 3):
        await pub.publish(v, _Model())
    assert log == [
        ("publish", v, str((tmp_path / f"v{v}").resolve()), "safetensors") for v in (1, 2, 3)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2", "v3"]


async def test_the_timer_sees_every_record_call(tmp_path: Path) -> None:
    timed: list[object] = []

    async def timer(call: Any) -> Any:
        timed.append(call)
        return await call

    await DiskPublisher(_Records([]), tmp_path, keep=1, timed=timer).publish(1, _Model())
    assert len(timed) == 1


@pytest.mark.parametrize(
    ("version", "ok", "expected"),
    [
        # a broadcast that works, no disk copy due (4 % 3 != 0): published as distributed-done
        (4, True, [("broadcast", 4), ("publish", 4, "group:sluice-g1", FMT_DONE)]),
        # disk copy due (6 % 3 == 0): written and recorded BEFORE the broadcast
        (6, True, [("disk", 6), ("broadcast", 6), ("publish", 6, "group:sluice-g1", FMT_DONE)]),
        # the broadcast fails: the disk copy is written, recorded, and published as safetensors
        (4, False, [("broadcast", 4), ("disk", 4), ("publish", 4, "v4", "safetensors")]),
        # failed with the copy already written for this version: not written twice
        (6, False, [("disk", 6), ("broadcast", 6), ("publish", 6, "v6", "safetensors")]),
    ],
)
async def test_distributed_order_of_calls(
    tmp_path: Path, version: int, ok: bool, expected: list[tuple[Any, ...]]
) -> None:
    log: list[tuple[Any, ...]] = []
    pub = DistributedPublisher(_Records(log), _Sync(log, ok), tmp_path, keep=5, disk_every=3)
    await pub.publish(version, _Model())
    short = []
    for entry in log:
        if entry[0] == "disk":
            assert entry[2] == str((tmp_path / f"v{entry[1]}").resolve())
            short.append(entry[:2])
        elif entry[0] == "publish" and entry[3] == "safetensors":
            short.append((*entry[:2], Path(entry[2]).name, entry[3]))
        else:
            short.append(entry)
    assert short == expected
    assert (tmp_path / f"v{version}").is_dir() == (version % 3 == 0 or not ok)
