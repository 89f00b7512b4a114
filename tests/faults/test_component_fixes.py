"""One focused test per component bug the fault scenarios found (docs/reliability.md,
"Found and fixed")."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from trainer_helpers import base_config, make_group, make_model, put_groups, write_config

from buffer import RedisTrajectoryBuffer, RedisUnavailable, connect, keys
from procs import RedisServer, free_port
from sluice.config import load_config
from staleness import VersionManager

pytestmark = [pytest.mark.faults]
ROOT = Path(__file__).resolve().parents[2]


def _restart_later(srv: RedisServer, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), srv.start()), daemon=True)
    t.start()
    return t


@pytest.mark.timeout(30)
async def test_connect_waits_for_a_restarting_redis(redis_server: RedisServer) -> None:
    """A process started while Redis restarts used to exit at once ("connection refused");
    ``connect`` now retries transient errors for ``wait_s`` and still fails fast on auth."""
    redis_server.kill()
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable, match="cannot reach"):
        await connect(redis_server.url, wait_s=0)
    assert time.monotonic() - t0 < 2
    t = _restart_later(redis_server, 1.0)
    client = await connect(redis_server.url, wait_s=15)
    assert await client.ping()
    await client.aclose()
    t.join()


@pytest.mark.timeout(30)
async def test_wrong_password_is_not_retried(redis_factory: object) -> None:
    srv = redis_factory(password="right-pw-1")  # type: ignore[operator]
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"credentials|password") as e:
        await connect(srv.url.replace("right-pw-1", "wrong-pw-2"), wait_s=10)
    assert time.monotonic() - t0 < 3 and "wrong-pw-2" not in str(e.value)


@pytest.mark.timeout(60)
async def test_trainer_redis_calls_survive_a_restart(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The trainer's step records, checkpoint pointer and eta reads were plain Redis calls: a
    Redis restart mid-run crashed the trainer (seen in test_redis_sigkill_restart_from_aof).
    They now go through ``with_retries``."""
    from trainer.ledger import StepLedger

    model = make_model(tmp_path / "model")
    conf = base_config(tmp_path, redis_server.url, "fix", model)
    cfg = load_config(write_config(tmp_path / "c.yaml", **conf))
    url, tc, eta = redis_server.url, cfg.trainer, cfg.staleness.eta
    vm = await VersionManager.open(url, "fix", eta=eta, batch_groups=cfg.staleness.batch_groups)
    buf = await RedisTrajectoryBuffer.open(url, "fix", tc.consumer)
    ledger = StepLedger(buf, "fix", tc.consumer, rank=0, world_size=1, default_eta=eta)
    try:
        redis_server.kill()
        with pytest.raises(Exception, match=r"(?i)connect|closed|refused"):
            await ledger.redis.hgetall(ledger.k_steps[0])  # a bare call fails in the outage
        t = _restart_later(redis_server, 1.5)
        assert await ledger.records(0) == {}
        assert await ledger.eta() == 100
        t.join()
    finally:
        await buf.close()
        await vm.close()


@pytest.mark.timeout(120)
def test_dead_lettered_group_hands_its_slot_back(redis_url: str, tmp_path: Path) -> None:
    """eta=0, B=2: two admitted groups fill the gate; one arrives corrupt and is
    dead-lettered. Before the fix its slot stayed 'finished' for ever: capacity 0, the trainer
    waited for a second group no worker could admit. Now the trainer hands the slot back
    (rejected, reason dead_letter) and the run goes on."""
    run = "deadslot"
    model = make_model(tmp_path / "model")
    conf = base_config(tmp_path, redis_url, run, model, max_steps=1)
    conf["staleness"] = {"eta": 0, "batch_groups": 2}
    cfg = write_config(tmp_path / "c.yaml", **conf)
    rng = np.random.default_rng(0)

    async def fill() -> None:
        async with await VersionManager.open(redis_url, run, eta=0, batch_groups=2) as vm:
            assert await vm.try_admit("w", 5) == 2
            buf = await RedisTrajectoryBuffer.open(redis_url, run, "w")
            await buf.put(make_group(rng, run))
            await buf.redis.xadd(keys.stream(run), {"d": b"\x93corrupt", "g": "bad"})
            await buf.close()
            assert await vm.finish("w", 2) == 2
            assert await vm.try_admit("w", 1) == 0  # the gate is full

    asyncio.run(fill())
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice", "train", "--config", str(cfg)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:

        async def gate() -> object:
            async with await VersionManager.open(redis_url, run) as vm:
                return await vm.snapshot()

        deadline = time.monotonic() + 60
        snap = asyncio.run(gate())
        while snap.rejected_by.get("dead_letter") != 1:  # type: ignore[attr-defined]
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
            snap = asyncio.run(gate())
        assert snap.capacity == 1 and snap.admitted == snap.finished + snap.rejected  # type: ignore[attr-defined]
        put_groups(redis_url, run, [make_group(rng, run)])  # the slot it got back, used
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "dead-lettering" in err and "slots handed back" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _rollout(cfg: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sluice", "rollout", "--config", str(cfg), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


@pytest.mark.timeout(90)
async def test_rollout_sigterm_while_starting_exits_0(redis_url: str, tmp_path: Path) -> None:
    """SIGTERM while the worker waits for a server that is down was ignored for up to 120 s
    (then exit 1). Now it exits 0 at once: it holds nothing yet. (SIGTERM during the imports
    before that is handled the same way, by a handler installed first thing in
    ``sluice rollout``; a signal in the interpreter's own start-up still kills it.)"""
    model = make_model(tmp_path / "model")
    conf = base_config(tmp_path, redis_url, "early", model)
    conf["inference"] = {"servers": [f"http://127.0.0.1:{free_port()}"]}  # nobody listens
    cfg = write_config(tmp_path / "c.yaml", **conf)
    w = _rollout(cfg, tmp_path / "w.log", "--worker-id", "E")
    client = await connect(redis_url)
    try:
        deadline = time.monotonic() + 60
        while not await client.zscore(keys.worker_expiry("early"), "E"):
            assert w.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # now polling the dead server's /health
        t0 = time.monotonic()
        w.send_signal(signal.SIGTERM)
        assert w.wait(20) == 0, (tmp_path / "w.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 10
    finally:
        await client.aclose()
        if w.poll() is None:
            w.kill()
            w.wait()


async def test_with_retries_treats_a_closed_uvloop_transport_as_transient() -> None:
    """After a Redis SIGKILL + restart, a worker's weight-event watcher died of uvloop's
    ``RuntimeError: ... the handler is closed`` (not a ConnectionError), which ended the
    worker. It is now retried like a lost connection; other RuntimeErrors still propagate."""
    from buffer.connection import closed_transport, with_retries

    msg = "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError(msg)
        return "ok"

    assert await with_retries(flaky, what="t", base_delay=0.001) == "ok" and calls == 3
    assert closed_transport(RuntimeError(msg)) and not closed_transport(RedisUnavailable(msg))

    async def broken() -> None:
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        await with_retries(broken, what="t")
