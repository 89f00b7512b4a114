"""Fault injection: SIGKILL a ``sluice train`` process at each point of a step, ``--resume``.

What must hold (trainer/ledger.py and trainer/resume.py, exactly once):
- following the checkpoint chain back from the committed pointer, every group id appears in
  exactly one step, and every group put into the buffer is there (none lost);
- the surviving model equals that of a run that never crashed on the same groups (replayed
  steps keep their recorded composition, optimizer and RNG come back exactly): so each
  group's update is in it exactly once;
- the run's version never goes back; the buffer ends empty (every group acked).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import (
    base_config,
    make_group,
    make_model,
    put_groups,
    read_metrics,
    run_train,
    write_config,
)

from buffer import RedisTrajectoryBuffer, connect, keys
from procs import RedisServer

N_GROUPS = 12  # 6 steps x 2 groups, checkpoint every 2 steps


def _groups(run: str) -> list:
    rng = np.random.default_rng(7)
    return [make_group(rng, run, group_id=f"g{i:02d}") for i in range(N_GROUPS)]


def _chain(ckpt: Path) -> list[list[str]]:
    """Group ids per checkpoint, newest first, following ``prev`` links."""
    out = []
    cur: str | None = str(ckpt)
    while cur:
        state = json.loads((Path(cur) / "state.json").read_text())
        out.append(state["groups"])
        cur = state["prev"]
    return out


async def _redis_state(url: str, run: str) -> tuple[dict[bytes, bytes], int, int, list[int]]:
    r = await connect(url)
    try:
        ptr = await r.hgetall(keys.trainer_checkpoint(run, "trainer-0"))
        buf = RedisTrajectoryBuffer(r, run, "probe")
        stats = await buf.stats()
        events = await r.xrange(keys.weight_events(run))
        versions = [int(f[b"version"]) for _, f in events]
        return ptr, stats.length, stats.pending, versions
    finally:
        await r.aclose()


def _final_weights(ptr: dict[bytes, bytes]) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ptr[b"path"].decode()) / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model, and the final weights of a run on the same groups that never crashed."""
    tmp = tmp_path_factory.mktemp("ref")
    model = make_model(tmp / "model")
    with RedisServer(directory=tmp / "redis") as srv:
        run = "ref"
        put_groups(srv.url, run, _groups(run))
        cfg = write_config(tmp / "c.yaml", **base_config(tmp, srv.url, run, model))
        p = run_train(cfg)
        assert p.returncode == 0, p.stderr[-3000:]
        ptr, length, pending, _ = asyncio.run(_redis_state(srv.url, run))
        assert (length, pending) == (0, 0)
        return model, _final_weights(ptr)


@pytest.mark.faults
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "point",
    [
        "mid_step:3",  # after the first backward of step 3 (step 2 was checkpointed)
        pytest.param("after_step:4", marks=pytest.mark.slow),  # trained, not published
        pytest.param("after_publish:3", marks=pytest.mark.slow),  # v3 out, not checkpointed
        pytest.param("mid_publish:5", marks=pytest.mark.slow),  # weights/v5 in a temp dir
        pytest.param("mid_checkpoint:4", marks=pytest.mark.slow),  # checkpoint half written
        "before_commit:4",  # checkpoint 4 durable on disk, Redis commit not done
    ],
)
def test_crash_then_resume_trains_every_group_exactly_once(
    point: str,
    reference: tuple[Path, dict[str, torch.Tensor]],
    redis_server: RedisServer,
    run_name: str,
    tmp_path: Path,
) -> None:
    model, ref_weights = reference
    url = redis_server.url
    put_groups(url, run_name, _groups(run_name))
    # reclaim_idle_ms=1: the resume also XAUTOCLAIMs its own pending entries (listed twice).
    conf = base_config(tmp_path, url, run_name, model, reclaim_idle_ms=1)
    cfg = write_config(tmp_path / "c.yaml", **conf)

    crashed = run_train(cfg, env={"SLUICE_TRAINER_CRASH_AT": point})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    _, _, pending_after_crash, versions_before = asyncio.run(_redis_state(url, run_name))
    assert pending_after_crash > 0  # unacked groups survived the crash

    if point.startswith("mid_step"):
        # A restart without --resume refuses to start over the run's state.
        refused = run_train(cfg)
        assert refused.returncode != 0 and "--resume" in refused.stderr

    resumed = run_train(cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "replaying" in resumed.stderr

    ptr, length, pending, versions = asyncio.run(_redis_state(url, run_name))
    assert int(ptr[b"step"]) == 6
    assert (length, pending) == (0, 0), "every group acked, nothing left pending"

    chain = _chain(Path(ptr[b"path"].decode()))
    trained = [g for groups in chain for g in groups]
    assert sorted(trained) == sorted(f"g{i:02d}" for i in range(N_GROUPS))  # each exactly once

    got = _final_weights(ptr)
    for name, ref in ref_weights.items():
        torch.testing.assert_close(got[name], ref, rtol=0, atol=1e-6, msg=name)

    # Versions never go back: publications strictly increase across the crash.
    assert versions == sorted(set(versions))
    assert versions[: len(versions_before)] == versions_before
    assert versions[-1] >= 6
    steps = read_metrics(tmp_path / run_name)
    assert [m["version"] for m in steps] == sorted(m["version"] for m in steps)


@pytest.mark.faults
@pytest.mark.timeout(240)
def test_sigterm_while_waiting_checkpoints_and_exits(
    redis_url: str, run_name: str, tmp_path: Path
) -> None:
    """SIGTERM while blocked on an empty buffer: the trainer checkpoints its trained steps,
    acks them and exits 0; --resume then continues from that step."""
    model = make_model(tmp_path / "model")
    put_groups(redis_url, run_name, _groups(run_name)[:6])  # 3 steps of data
    conf = base_config(tmp_path, redis_url, run_name, model, checkpoint_every=100)
    cfg = write_config(tmp_path / "c.yaml", **conf)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice", "train", "--config", str(cfg)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(read_metrics(tmp_path / run_name)) < 3:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    assert len(read_metrics(tmp_path / run_name)) == 3
    time.sleep(0.5)  # now blocked waiting for step 4's groups
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-3000:]
    ptr, length, pending, _ = asyncio.run(_redis_state(redis_url, run_name))
    assert int(ptr[b"step"]) == 3 and (length, pending) == (0, 0)

    put_groups(redis_url, run_name, _groups(run_name)[6:])
    resumed = run_train(cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ptr, length, pending, _ = asyncio.run(_redis_state(redis_url, run_name))
    assert int(ptr[b"step"]) == 6 and (length, pending) == (0, 0)
    trained = [g for groups in _chain(Path(ptr[b"path"].decode())) for g in groups]
    assert sorted(trained) == sorted(f"g{i:02d}" for i in range(N_GROUPS))


LORA = {"rank": 4, "alpha": 8, "dropout": 0.1}


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lora_crash_then_resume_trains_every_group_exactly_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """trainer.lora: checkpoints and publications hold the adapter only; a crash before the
    commit of checkpoint 4, then --resume, ends on the adapter (and optimizer state) of a run
    that never crashed, every group trained once. Dropout 0.1 in the gradient pass: its RNG
    comes back with the checkpoint too."""
    model = make_model(tmp_path / "model")
    url = redis_server.url
    finals = {}
    for run in ("lora-ref", "lora-crash"):
        put_groups(url, run, _groups(run))
        conf = base_config(tmp_path, url, run, model, reclaim_idle_ms=1, lora=LORA)
        cfg = write_config(tmp_path / f"{run}.yaml", **conf)
        if run == "lora-crash":
            crashed = run_train(cfg, env={"SLUICE_TRAINER_CRASH_AT": "before_commit:4"})
            assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
            resumed = run_train(cfg, "--resume")
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert "replaying" in resumed.stderr
        else:
            p = run_train(cfg)
            assert p.returncode == 0, p.stderr[-3000:]
        ptr, length, pending, _ = asyncio.run(_redis_state(url, run))
        assert int(ptr[b"step"]) == 6 and (length, pending) == (0, 0)
        ckpt = Path(ptr[b"path"].decode())
        assert not (ckpt / "model").exists()
        assert sorted(p.name for p in (ckpt / "adapter").iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        trained = [g for groups in _chain(ckpt) for g in groups]
        assert sorted(trained) == sorted(f"g{i:02d}" for i in range(N_GROUPS))
        finals[run] = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        opt = load_file(str(ckpt / "optimizer.safetensors"))
        n_adapter = sum(t.numel() for t in finals[run].values())
        assert sum(t.numel() for k, t in opt.items() if k.endswith(".exp_avg")) == n_adapter
        # every published version is an adapter directory, the base is never rewritten
        published = sorted((tmp_path / run / "weights").iterdir())
        assert published and all((d / "adapter_model.safetensors").is_file() for d in published)
        rows = read_metrics(tmp_path / run)
        assert all(r["weight_update_bytes"] < r["model_bytes"] / 5 for r in rows)
    ref, got = finals["lora-ref"], finals["lora-crash"]
    assert set(ref) == set(got) and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in ref)
    assert any(ref[k].abs().max() > 0 for k in ref if "lora_B" in k)  # it trained
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6, msg=name)
