"""``weights.ipc`` (the trainer's side of ``weight_sync=ipc``) and ``weights.receive.IpcReceiver``
(the worker's), with fakes for the run and the servers; the real path, through a CPU server
process: tests/integration/test_ipc_weight_sync.py."""

from __future__ import annotations

import base64
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.protocol import InferenceError, InferenceTimeout
from staleness.records import WeightEvent
from staleness.version_manager import SyncServer
from weights.ipc import Handover, IpcSync, is_local_url, plan_buckets, send_buckets
from weights.plan import FMT_IPC_ANNOUNCE, FMT_IPC_DONE, IpcPlan
from weights.publish import IpcPublisher
from weights.receive import IpcReceiver


def test_buckets_count_bytes_in_the_sent_dtype_and_keep_the_order() -> None:
    mib = 1024 * 1024
    named = [
        ("a", torch.zeros(mib // 4)),  # 1 MiB of float32, 0.5 MiB as bfloat16
        ("b", torch.zeros(mib // 4)),
        ("c", torch.zeros(mib)),  # 4 MiB of float32: alone at 1 MiB buckets
        ("d", torch.zeros(3)),
    ]
    own = plan_buckets(named, 1)
    assert [b["names"] for b in own] == [["a"], ["b"], ["c"], ["d"]]
    half = plan_buckets(named, 1, torch.bfloat16)
    assert [b["names"] for b in half] == [["a", "b"], ["c"], ["d"]]
    assert half[2] == {"names": ["d"], "dtypes": ["bfloat16"], "shapes": [[3]]}
    assert [n for b in half for n in b["names"]] == ["a", "b", "c", "d"]


def test_plan_round_trips_and_refuses_an_empty_one() -> None:
    plan = IpcPlan(
        3, ["http://127.0.0.1:1"], [{"names": ["a"], "dtypes": ["f"], "shapes": []}], 5.0
    )
    assert IpcPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="0 servers"):
        IpcPlan.from_json(IpcPlan(3, [], plan.buckets, 5.0).to_json())
    with pytest.raises(ValueError, match="bad ipc"):
        IpcPlan.from_json('{"version": 1}')


def test_only_loopback_or_this_host_is_local() -> None:
    names = frozenset({"localhost", "myhost", "10.1.2.3"})
    assert is_local_url("http://127.0.0.1:30000", names)
    assert is_local_url("http://127.5.0.1:30000", names)
    assert is_local_url("http://[::1]:30000", names)
    assert is_local_url("http://myhost:1", names)
    assert is_local_url("http://10.1.2.3:1", names)
    assert not is_local_url("http://10.1.2.4:1", names)
    assert not is_local_url("http://otherhost:1", names)


def test_handover_maps_cpu_tensors_in_files_removed_on_close() -> None:
    """The payload unpickles (in any torch process: only public torch functions) to views of
    memory-backed files; ``close`` removes the files, and a mapping taken before keeps its
    values."""
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:]  # not contiguous
    b = torch.ones(5, dtype=torch.bfloat16)
    hand = Handover([("w", t), ("b", b)])
    assert len(hand.files) == 2 and all(f.exists() for f in hand.files)
    (n1, back), (n2, back_b) = pickle.loads(base64.b64decode(hand.payload))
    assert (n1, n2) == ("w", "b")
    assert torch.equal(back, t) and back.dtype == torch.float32
    assert torch.equal(back_b, b) and back_b.dtype == torch.bfloat16
    files = list(hand.files)
    hand.close()
    assert not any(f.exists() for f in files)
    assert torch.equal(back, t)


class _Client:
    """Records each ``update_weights_from_tensor`` call (and the tensors it carried)."""

    def __init__(self, log: list[tuple[Any, ...]], url: str, fail_at: int | None = None) -> None:
        self.log, self.url, self.fail_at, self.calls = log, url, fail_at, 0

    async def update_weights_from_tensor(
        self,
        payloads: list[str],
        version: int | None,
        *,
        flush_cache: bool,
        abort_all_requests: bool,
        timeout: float,
    ) -> dict[str, Any]:
        named = pickle.loads(base64.b64decode(payloads[0]))
        self.log.append(
            (
                self.url,
                len(payloads),
                [n for n, _ in named],
                version,
                flush_cache,
                abort_all_requests,
            )
        )
        self.calls += 1
        if self.fail_at == self.calls:
            raise InferenceError(400, "boom", "/update_weights_from_tensor")
        return {"success": True}


async def test_send_buckets_orders_abort_first_and_label_last() -> None:
    params = {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(4)}
    buckets = [{"names": ["a", "b"]}, {"names": ["c"]}]
    log: list[tuple[Any, ...]] = []
    clients: Any = [(_Client(log, "u1"), 1), (_Client(log, "u2"), 2)]
    await send_buckets(clients, params, buckets, 7, dtype=torch.bfloat16, timeout_s=1.0)
    assert log == [
        ("u1", 1, ["a", "b"], None, False, True),
        ("u2", 2, ["a", "b"], None, False, True),
        ("u1", 1, ["c"], 7, True, False),
        ("u2", 2, ["c"], 7, True, False),
    ]
    assert params["a"].dtype == torch.float32  # the model is untouched: copies are sent


async def test_send_buckets_stops_after_a_failed_bucket() -> None:
    params = {"a": torch.ones(2), "c": torch.ones(4)}
    log: list[tuple[Any, ...]] = []
    clients: Any = [(_Client(log, "u1", fail_at=1), 1), (_Client(log, "u2"), 1)]
    with pytest.raises(InferenceError):
        await send_buckets(
            clients, params, [{"names": ["a"]}, {"names": ["c"]}], 2, dtype=None, timeout_s=1.0
        )
    assert [e[:3] for e in log] == [("u1", 1, ["a"]), ("u2", 1, ["a"])]  # no second bucket


class _Worker:
    def __init__(self, id: str, alive: bool = True) -> None:
        self.id, self.alive = id, alive


class _Snap:
    def __init__(self, workers: list[_Worker]) -> None:
        self.workers = workers


class _Vm:
    def __init__(self, log: list[tuple[Any, ...]], reg: dict[str, SyncServer], acks: set[str]):
        self.log, self.reg, self.acks = log, reg, acks

    async def sync_server_records(self, kind: str) -> dict[str, SyncServer]:
        return {u: r for u, r in self.reg.items() if r.kind == kind}

    async def snapshot(self) -> _Snap:
        return _Snap([_Worker("w1"), _Worker("dead", alive=False)])

    async def announce_weights(self, version: int, location: str, fmt: str) -> str:
        self.log.append(("announce", version, fmt, IpcPlan.from_json(location).servers))
        return "0-1"

    async def wait_sync_acks(self, version: int, urls: set[str], timeout_s: float) -> set[str]:
        self.log.append(("wait_acks", version, sorted(urls)))
        return self.acks & urls

    async def publish_weights(self, version: int, location: str, fmt: str = "safetensors") -> str:
        self.log.append(("publish", version, fmt))
        return "0-2"

    async def record_disk_weights(self, version: int, location: str, fmt: str = "x") -> bool:
        self.log.append(("disk", version))
        return True


def _registry(host: str) -> dict[str, SyncServer]:
    import socket

    here = socket.gethostname()
    return {
        "http://127.0.0.1:1": SyncServer("w1", "ipc", here),
        "http://127.0.0.1:2": SyncServer("dead", "ipc", here),  # its worker's heartbeat expired
        "http://127.0.0.1:3": SyncServer("w1", "ipc", host),  # another host's loopback
        "http://127.0.0.1:4": SyncServer("w1"),  # registered for distributed
    }


async def test_targets_are_live_ipc_servers_of_this_host() -> None:
    sync = IpcSync(_Vm([], _registry("elsewhere"), set()))
    assert await sync.targets() == {"http://127.0.0.1:1": 1}


class _Model(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 2)

    def save_pretrained(self, path: str, safe_serialization: bool, **kw: Any) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"w")


@pytest.mark.parametrize(
    ("acks", "version", "expected"),
    [
        # nobody acknowledges in time: nothing is sent, the disk copy is published
        (set(), 4, ["announce", "wait_acks", "disk", "publish safetensors"]),
        # every target acknowledged, the call fails (no server listens): disk again
        ({"http://127.0.0.1:1"}, 4, ["announce", "wait_acks", "disk", "publish safetensors"]),
        # disk copy due (6 % 3 == 0): written before the announcement, not twice
        (set(), 6, ["disk", "announce", "wait_acks", "publish safetensors"]),
    ],
)
async def test_ipc_publisher_falls_back_to_disk(
    tmp_path: Path, acks: set[str], version: int, expected: list[str]
) -> None:
    log: list[tuple[Any, ...]] = []
    vm = _Vm(log, _registry("elsewhere"), acks)
    # port 1: nothing listens there, so a call fails at once (ServerDead)
    sync = IpcSync(vm, timeout_s=2.0)
    pub = IpcPublisher(vm, sync, tmp_path, keep=5, disk_every=3)
    await pub.publish(version, _Model())
    short = [e[0] if e[0] != "publish" else f"publish {e[2]}" for e in log]
    assert short == expected
    assert log[short.index("announce")][3] == ["http://127.0.0.1:1"]


async def test_ipc_publisher_publishes_done_after_a_transfer(tmp_path: Path) -> None:
    log: list[tuple[Any, ...]] = []

    class _Sync:
        group = "http://127.0.0.1:1"

        async def broadcast(self, version: int, model: torch.nn.Module) -> bool:
            log.append(("send", version))
            return True

    vm = _Vm(log, {}, set())
    await IpcPublisher(vm, _Sync(), tmp_path, keep=5, disk_every=3).publish(4, _Model())
    assert log == [("send", 4), ("publish", 4, FMT_IPC_DONE)]
    assert not (tmp_path / "v4").exists()


# ------------------------------------------------------------------ the worker's side


class _Server:
    url = "http://127.0.0.1:1"
    version: int | None = 2
    group: str | None = None
    mixed = False


class _Run:
    def __init__(self, latest: WeightEvent | None) -> None:
        self.latest, self.acked = latest, []  # type: list[tuple[int, str]]

    async def ack_sync(self, version: int, url: str) -> None:
        self.acked.append((version, url))

    async def latest_weights(self) -> WeightEvent | None:
        return self.latest


class _ServerClient:
    """Reports ``versions`` in turn from ``/model_info`` (the last one for ever)."""

    def __init__(self, versions: list[int]) -> None:
        self.versions, self.loads = versions, []  # type: list[tuple[str, int]]

    async def weight_version(self, *, timeout: float | None = None) -> int:
        return self.versions.pop(0) if len(self.versions) > 1 else self.versions[0]

    async def update_weights_from_disk(self, path: str, version: int, **kw: Any) -> dict[str, Any]:
        self.loads.append((path, version))
        return {"success": True}


def _plan(timeout_s: float = 5.0) -> IpcPlan:
    return IpcPlan(
        3, [_Server.url], [{"names": ["a"], "dtypes": ["f"], "shapes": [[1]]}], timeout_s
    )


async def test_receiver_acks_then_returns_once_the_server_reports_the_version() -> None:
    run, server, client = _Run(None), _Server(), _ServerClient([2, 2, 3])
    await IpcReceiver(_plan(), run).receive(client, server)  # type: ignore[arg-type]
    assert run.acked == [(3, _Server.url)]
    assert server.mixed and client.loads == []  # the caller (pool.loaded) clears the mark


async def test_receiver_loads_the_disk_fallback_of_its_version() -> None:
    run = _Run(WeightEvent(3, "/w/v3", "safetensors", 0.0))
    client = _ServerClient([2])
    await IpcReceiver(_plan(), run).receive(client, _Server())  # type: ignore[arg-type]
    assert client.loads == [("/w/v3", 3)]


async def test_receiver_fails_when_done_but_its_server_is_not_at_the_version() -> None:
    run = _Run(WeightEvent(3, "ipc:x", FMT_IPC_DONE, 0.0))
    with pytest.raises(InferenceError, match="reports v2"):
        await IpcReceiver(_plan(), run).receive(_ServerClient([2]), _Server())  # type: ignore[arg-type]


async def test_receiver_times_out_without_an_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("weights.receive.EXTRA_WAIT_S", 0.0)
    run = _Run(WeightEvent(2, "/w/v2", "safetensors", 0.0))
    with pytest.raises(InferenceTimeout):
        await IpcReceiver(_plan(0.1), run).receive(_ServerClient([2]), _Server())  # type: ignore[arg-type]


def test_refusal_names_non_targets() -> None:
    class _Other(_Server):
        url = "http://127.0.0.1:9"

    rec = IpcReceiver(_plan(), _Run(None))
    assert rec.refusal(_Server()) is None  # type: ignore[arg-type]
    assert "not a target" in (rec.refusal(_Other()) or "")  # type: ignore[arg-type]
    assert FMT_IPC_ANNOUNCE == "ipc"


def test_the_cpu_server_resolves_nothing_but_the_handover_while_unpickling() -> None:
    """The payload is a pickle: the CPU server's unpickler resolves only the hand-over's own
    functions and torch dtypes, so a payload naming anything else is refused, not run."""
    import base64
    import os
    import pickle

    import pytest

    from inference.cpu_server.engine import unpickle_named_tensors

    class Hostile:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, ("true",))

    payload = base64.b64encode(pickle.dumps([("x", Hostile())])).decode()
    with pytest.raises(ValueError, match="not part of a tensor hand-over"):
        unpickle_named_tensors(payload)


def test_the_handover_unpickler_lets_getattr_fetch_only_the_handover_functions() -> None:
    import pickle

    import pytest
    import torch

    from inference.cpu_server.engine import _handover_global

    fetch = _handover_global("builtins", "getattr")
    table = torch._C._VariableFunctionsClass
    assert fetch(table, "from_file") is table.from_file
    for obj, name in ((table, "__class__"), (pickle, "loads"), (table, "zeros")):
        with pytest.raises(pickle.UnpicklingError, match="not part of a tensor hand-over"):
            fetch(obj, name)
