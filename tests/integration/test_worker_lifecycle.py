"""A rollout worker's life as a user meets it, through the CLI (issue 16): a worker whose server
starts late is alive the whole time it waits (never reaped as dead); one whose server never
answers says what it waits for and exits 1 in one line; the trainer's clean end makes the
workers started by hand exit 0 (or wait for the run to start again); ``sluice status`` tells a
cleanly stopped worker from a killed one. Real Redis, real ``sluice serve``, ``sluice
rollout`` and ``sluice train`` processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cpu_server_fixture import cpu_server_factory, make_model  # noqa: F401

from inference.launch import ServerHandle, launch_cpu_server
from procs import free_port
from sluice.config import load_config
from staleness import RunNotFound, VersionManager

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "v0", seed=1)


def run_config(path: Path, redis_url: str, run: str, model: Path, *sets: str) -> Path:
    cfg = load_config(
        None,
        [
            f"redis.url={redis_url}",
            f"run.name={run}",
            f"run.dir={path.parent / run}",
            "run.seed=3",
            f"model.path={model}",
            "task.name=reverse",
            "staleness.eta=2",
            "staleness.batch_groups=2",
            "rollout.n_samples=2",
            "rollout.max_inflight_groups=2",
            "rollout.health_interval_s=0.3",
            "rollout.metrics_interval_s=0.5",
            "trainer.threads=1",
            "trainer.lr=0.001",
            "trainer.publish_every=1",
            "trainer.checkpoint_every=1",
            *sets,
        ],
    )
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def sluice(cmd: str, cfg: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sluice", cmd, "--config", str(cfg), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
        )


def stop(*procs: subprocess.Popen[bytes] | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


async def exited(p: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    deadline = time.monotonic() + timeout
    while p.poll() is None:
        assert time.monotonic() < deadline, f"still running after {timeout}s:\n" + tail(log)
        await asyncio.sleep(0.2)
    return int(p.returncode)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


async def open_run(redis_url: str, run: str, timeout: float = 60) -> VersionManager:
    """The run's version manager, once a process created the run."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await VersionManager.open(redis_url, run)
        except RunNotFound:
            assert time.monotonic() < deadline, f"run {run} never created"
            await asyncio.sleep(0.1)


@pytest.mark.timeout(180)
async def test_a_worker_whose_server_starts_late_is_never_reaped(
    redis_url: str, run_name: str, model: Path, tmp_path: Path
) -> None:
    """Heartbeat TTL 1 s; the server starts ~5 s after the worker (then takes seconds to
    load); meanwhile a reaper calls ``reap`` 5 times a second, as a trainer or another worker
    would. The worker is alive in every look, nothing is rejected as worker_dead, and it
    pushes its groups."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = run_config(
        tmp_path / "run.yaml",
        redis_url,
        run_name,
        model,
        "rollout.heartbeat_ttl_s=1.0",
        "rollout.server_wait_s=120",
    )
    log = tmp_path / "worker.log"
    w = sluice("rollout", cfg, log, "--servers", url, "--worker-id", "L", "--max-groups", "4")
    srv: ServerHandle | None = None
    vm = await open_run(redis_url, run_name)
    reaped: dict[str, int] = {}
    looks: list[bool] = []
    reaping = True

    async def reaper() -> None:
        while reaping:
            reaped.update(await vm.reap())
            snap = await vm.snapshot()
            # Its heartbeat entry, from the first heartbeat until its clean exit deregisters
            # it (a reap would take it away too: that is ``reaped``).
            looks.extend(x.alive for x in snap.workers if x.id == "L")
            await asyncio.sleep(0.2)

    task = asyncio.create_task(reaper())
    try:
        await asyncio.sleep(5.0)  # 5 heartbeat TTLs with no server
        assert w.poll() is None, tail(log)
        srv = await asyncio.to_thread(
            launch_cpu_server, model, port, log_path=tmp_path / "server.log"
        )
        assert await exited(w, 120, log) == 0, tail(log)
        reaping = False
        await task
        snap = await vm.snapshot()
        assert "L" not in reaped, (reaped, tail(log))
        assert len(looks) > 20 and all(looks), looks
        assert snap.rejected_by.get("worker_dead", 0) == 0 and snap.late == 0, snap
        assert snap.finished >= 4 and snap.inflight_total == 0
        text = log.read_text()
        assert f"waiting for an inference server to answer /health at {url}" in text
        assert f"inference server {url} answers after" in text
    finally:
        reaping = False
        if not task.done():
            task.cancel()
        await vm.close()
        stop(w)
        if srv is not None:
            srv.stop()


@pytest.mark.timeout(90)
def test_a_worker_with_no_server_exits_1_in_one_line(
    redis_url: str, run_name: str, model: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    cfg = run_config(tmp_path / "run.yaml", redis_url, run_name, model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_REDIS")}
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "sluice", "rollout", "--config", str(cfg), "--servers", url,
         "--set", "rollout.server_wait_s=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("sluice rollout:")]
    assert errors == [lines[-1]], lines  # one line, the last
    assert "no inference server answered /health within 2s (rollout.server_wait_s)" in errors[0]
    assert url in errors[0] and "sluice serve" in errors[0] and "--servers" in errors[0]
    assert any(f"waiting for an inference server to answer /health at {url}" in x for x in lines)
    assert time.monotonic() - t0 < 45


@pytest.mark.timeout(300)
async def test_the_trainers_end_makes_its_workers_exit_or_wait(
    redis_url: str,
    run_name: str,
    model: Path,
    tmp_path: Path,
    cpu_server_factory: Callable[..., ServerHandle],  # noqa: F811
) -> None:
    """``max_steps`` 2: the worker started by hand exits 0 on its own once the trainer ended.
    Then a worker with ``on_run_finished: wait`` started on the finished run waits; the run
    resumed (``--resume --max-steps 3``) clears the mark, trains on that worker's groups and
    ends again; the worker stays until SIGTERM."""
    srv = cpu_server_factory(model)
    cfg = run_config(tmp_path / "run.yaml", redis_url, run_name, model, "trainer.max_steps=2")
    wlog, tlog = tmp_path / "worker.log", tmp_path / "train.log"
    w = sluice("rollout", cfg, wlog, "--servers", srv.url, "--worker-id", "F")
    t = sluice("train", cfg, tlog)
    g: subprocess.Popen[bytes] | None = None
    t2: subprocess.Popen[bytes] | None = None
    vm = await open_run(redis_url, run_name)
    try:
        assert await exited(t, 200, tlog) == 0, tail(tlog)
        mark = await vm.run_finished()
        assert mark is not None and mark.step == 2, tail(tlog)
        assert await exited(w, 30, wlog) == 0, tail(wlog)  # on its own
        assert f"run {run_name} finished at step 2: worker exits" in wlog.read_text()
        snap = await vm.snapshot()
        assert snap.inflight_total == 0 and snap.admitted == snap.finished + snap.rejected
        assert "F" not in [x.id for x in snap.workers]  # a clean stop deregisters

        glog, t2log = tmp_path / "waiter.log", tmp_path / "train2.log"
        g = sluice(
            "rollout", cfg, glog, "--servers", srv.url, "--worker-id", "G",
            "--set", "rollout.on_run_finished=wait",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while "before this worker started" not in glog.read_text():
            assert g.poll() is None and time.monotonic() < deadline, tail(glog)
            await asyncio.sleep(0.2)
        t2 = sluice("train", cfg, t2log, "--resume", "--max-steps", "3")
        assert await exited(t2, 200, t2log) == 0, tail(t2log)
        again = await vm.run_finished()
        assert again is not None and again.step == 3 and again != mark, tail(t2log)
        deadline = time.monotonic() + 30
        while f"run {run_name} finished at step 3: worker waits" not in glog.read_text():
            assert g.poll() is None and time.monotonic() < deadline, tail(glog)
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        assert g.poll() is None, tail(glog)
        g.send_signal(signal.SIGTERM)
        assert await exited(g, 30, glog) == 0, tail(glog)
        assert "worker exits" not in glog.read_text()
    finally:
        await vm.close()
        stop(w, t, g, t2)


def status_json(redis_url: str, run: str) -> dict[str, Any]:
    return json.loads(status(redis_url, run, "--json"))  # type: ignore[no-any-return]


def status(redis_url: str, run: str, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_REDIS")}
    res = subprocess.run(
        [sys.executable, "-m", "sluice", "status", "--redis-url", redis_url, "--run", run,
         *extra],
        cwd=ROOT, env=dict(env, COLUMNS="200"), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.timeout(180)
async def test_status_tells_a_stopped_worker_from_a_killed_one(
    redis_url: str,
    run_name: str,
    model: Path,
    tmp_path: Path,
    cpu_server_factory: Callable[..., ServerHandle],  # noqa: F811
) -> None:
    srv = cpu_server_factory(model)
    cfg = run_config(
        tmp_path / "run.yaml", redis_url, run_name, model, "rollout.heartbeat_ttl_s=1.0"
    )
    slog, klog = tmp_path / "s.log", tmp_path / "k.log"
    s = sluice("rollout", cfg, slog, "--servers", srv.url, "--worker-id", "S")
    k = sluice("rollout", cfg, klog, "--servers", srv.url, "--worker-id", "K")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, tail(slog) + tail(klog)
            try:
                wm = status_json(redis_url, run_name)["worker_metrics"]
            except AssertionError:  # the run does not exist yet
                wm = {}
            if all(wm.get(x, {}).get("status") == "running" for x in "SK"):
                break
            await asyncio.sleep(0.3)
        assert {wm[x]["liveness"] for x in "SK"} == {"alive"}
        s.send_signal(signal.SIGTERM)
        assert await exited(s, 30, slog) == 0, tail(slog)
        k.send_signal(signal.SIGKILL)
        k.wait(10)
        killed_at = time.time()
        await asyncio.sleep(2.0)  # K's heartbeat (TTL 1 s) expires; nobody reaps it yet
        d = status_json(redis_url, run_name)
        wm = d["worker_metrics"]
        assert [x["id"] for x in d["workers"]] == ["K"] and not d["workers"][0]["alive"]
        assert wm["S"]["status"] == "stopped" and wm["S"]["liveness"] == "stopped"
        assert wm["K"]["status"] == "running" and wm["K"]["liveness"] == "lost"
        assert killed_at - 2.0 < wm["K"]["last_heartbeat"] <= killed_at + 0.5
        table = status(redis_url, run_name)
        lost = f"lost (no heartbeat since {time.strftime('%H:%M:%S', time.localtime(wm['K']['last_heartbeat']))})"
        assert table.count(lost) == 1, table  # the metrics row (workers: expired, reap pending)
        assert "expired (reap pending)" in table
        async with await VersionManager.open(redis_url, run_name) as vm:
            await vm.reap()  # K's slots come back; its heartbeat entry goes
        d = status_json(redis_url, run_name)
        assert d["workers"] == [] and d["inflight"] == 0
        assert d["worker_metrics"]["K"]["liveness"] == "lost"
        assert d["worker_metrics"]["S"]["liveness"] == "stopped"
        table = status(redis_url, run_name)
        rows = [x for x in table.splitlines() if "│ K " in x or "│ S " in x]
        assert len(rows) == 4, table  # each in the workers table and the metrics table
        assert all("lost (no heartbeat since" in x for x in rows if "│ K " in x), table
        assert all("stopped" in x for x in rows if "│ S " in x), table
        assert "running" not in table and "expired" not in table, table
    finally:
        stop(s, k)
