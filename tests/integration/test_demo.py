"""sluice demo: config layering (fast), the whole demo end to end, and supervision: SIGKILL the
demo's worker, then its trainer, mid-run; both come back and the run reaches its target with
nothing lost. The end-to-end runs start real processes (redis-server, CPU server, worker,
trainer) and take a minute or two each on 2 cores."""

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

from procs import pid_alive
from sluice import cli
from sluice.config import ConfigError
from sluice.demo import DEMO_DEFAULTS, load_demo_config, split_password

ROOT = Path(__file__).resolve().parents[2]


def _events(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "events.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _pids(run_dir: Path) -> set[int]:
    out = set()
    for e in _events(run_dir):
        for k in ("pid", "new_pid"):
            if isinstance(e.get(k), int):
                out.add(e[k])
    return out


def _steps(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _wait(cond: Callable[[], bool], timeout: float, what: str, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"demo exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _no_process_left(run_dir: Path) -> None:
    pids = _pids(run_dir)
    assert len(pids) >= 4  # redis, server, trainer, worker
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)], "processes left behind"


# ---------------------------------------------------------------------- fast
@pytest.mark.timeout(30)
def test_examples_demo_yaml_is_the_demo_defaults() -> None:
    raw = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    assert raw == DEMO_DEFAULTS
    assert load_demo_config(ROOT / "examples" / "demo.yaml") == load_demo_config(None)


@pytest.mark.timeout(30)
def test_demo_config_layers(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("task: {name: reverse, options: {n_digits: 3}}\ntrainer: {lr: 0.01}\n")
    cfg = load_demo_config(f, ["trainer.max_steps=9"])
    assert cfg.task.options == {"n_digits": 3}  # the file's task options replace the demo's
    assert cfg.trainer.lr == 0.01 and cfg.trainer.max_steps == 9
    assert cfg.trainer.reward_target == DEMO_DEFAULTS["trainer"]["reward_target"]
    assert cfg.staleness.batch_groups == DEMO_DEFAULTS["staleness"]["batch_groups"]
    with pytest.raises(ConfigError, match=r"trainer\.lr = -1"):
        load_demo_config(f, ["trainer.lr=-1"])
    assert split_password("redis://u:pw@h:1/0") == ("redis://u@h:1/0", "pw")
    assert split_password("redis://:pw@h:1/0") == ("redis://h:1/0", "pw")
    assert split_password("redis://h:1/0") == ("redis://h:1/0", None)


@pytest.mark.timeout(30)
def test_demo_refuses_a_used_run_dir_and_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert cli.main(["demo", "--no-live", "--run-dir", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["demo", "--no-live", "--eta", "-1"]) == 2  # one line, no traceback
    assert "sluice demo: --eta out of range: -1" in capsys.readouterr().err
    assert cli.main(["demo", "--no-live", "--max-restarts", "-1"]) == 2


# ---------------------------------------------------------------------- end to end
def _start_demo(run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    with open(run_dir.parent / f"{run_dir.name}.out", "wb") as log:  # the child keeps its copy
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sluice",
                "demo",
                "--no-live",
                "--run-dir",
                str(run_dir),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=run_dir.parent,
        )


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the demo stops its own children
        proc.wait(timeout=60)
        raise


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, float]:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    t0 = time.monotonic()
    proc = _start_demo(run_dir)
    code = _finish(proc, 540)
    return code, run_dir, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_end_to_end(demo_run: tuple[int, Path, float]) -> None:
    code, run_dir, took = demo_run
    out = (run_dir.parent / "run.out").read_text()
    assert code == 0, out[-3000:]
    s = json.loads((run_dir / "report" / "summary.json").read_text())
    assert s["initial_reward"] <= 0.3
    assert s["final_reward"] >= 0.9 and s["reached_target"] is True
    eta = s["eta"]
    assert eta == DEMO_DEFAULTS["staleness"]["eta"]
    # The trainer trained nothing over eta: every group it received above eta was dropped.
    over = sum(n for k, n in s["staleness_hist"].items() if int(k) > eta or int(k) < 0)
    assert over == s["dropped_groups"]
    assert s["groups_per_s"] > 0 and s["wall_s"] > 0
    for f in ("report.md", "reward.png", "staleness.png", "throughput.png"):
        assert (run_dir / "report" / f).is_file(), f
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "trainer.log").is_file()
    assert "report:" in out
    _no_process_left(run_dir)
    assert took < 600


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_gate_bounds_staleness(demo_run: tuple[int, Path, float]) -> None:
    """Nothing over eta is trained, and next to nothing is thrown away: the trainer takes the
    earliest-expiring groups and waits for the ones still generating that would otherwise
    expire (docs/staleness.md, "No waste at steady state"), so groups overtaken in the stream
    are trained in time instead of dropped, and workers rarely have a group to cancel."""
    code, run_dir, _ = demo_run
    assert code == 0
    s = json.loads((run_dir / "report" / "summary.json").read_text())
    eta = s["eta"]
    # From the trainer's per-step staleness_max_trained: what reached the optimizer.
    assert s["max_staleness_trained"] is not None, "no step logged staleness_max_trained"
    assert s["max_staleness_trained"] <= eta, s["staleness_hist"]
    # ... and from each step's histogram of its trained groups (their own oldest tokens)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r and "event" not in r]
    trained = {int(k) for r in steps for k in r["staleness_hist_trained"]}
    assert trained and max(trained) <= eta and min(trained) >= 0, trained
    assert sum(sum(r["staleness_hist_trained"].values()) for r in steps) == sum(
        len(r["group_ids"]) for r in steps
    )
    # Waste: dropped + cancelled over the groups generated (goal 0.5%, measured 0 of 3,744 on
    # a loaded machine; 16 of 3,776 before); 1% leaves room for a slow CI machine.
    assert s["dropped_or_cancelled_share"] <= 0.01, (s["dropped_groups"], s["cancelled_groups"])
    assert s["waste_share"] is not None and s["waste_share"] <= 0.01


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(600)
def test_demo_restarts_killed_worker_and_trainer(tmp_path: Path, redis_url: str) -> None:
    run_dir = tmp_path / "run"
    run = "demo-faults"
    proc = _start_demo(
        run_dir,
        "--redis-url",
        redis_url,
        "--set",
        f"run.name={run}",
        "--set",
        "rollout.heartbeat_ttl_s=3",
    )
    try:
        _wait(lambda: len(_steps(run_dir)) >= 5, 240, "step 5", proc)
        worker = next(e["pid"] for e in _events(run_dir) if e["name"] == "worker")
        os.kill(worker, signal.SIGKILL)
        _wait(
            lambda: any(
                e["kind"] == "restarted" and e["name"] == "worker" for e in _events(run_dir)
            ),
            30,
            "the worker's restart",
            proc,
        )
        # Past the step-10 checkpoint, so the crash loses recorded steps that must be replayed.
        _wait(
            lambda: max((r["step"] for r in _steps(run_dir)), default=0) >= 13, 240, "step 13", proc
        )
        trainer = next(e["pid"] for e in _events(run_dir) if e["name"] == "trainer")
        os.kill(trainer, signal.SIGKILL)
        _wait(
            lambda: any(
                e["kind"] == "restarted" and e["name"] == "trainer" for e in _events(run_dir)
            ),
            30,
            "the trainer's restart",
            proc,
        )
        code = _finish(proc, 480)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "run.out").read_text()
    assert code == 0, out[-3000:]
    ev = [e for e in _events(run_dir) if e["kind"] == "restarted"]
    assert [(e["name"], e["exit"]) for e in ev] == [
        ("worker", "killed by SIGKILL"),
        ("trainer", "killed by SIGKILL"),
    ]
    assert "worker (pid" in out and "killed by SIGKILL: restarted" in out
    s = json.loads((run_dir / "report" / "summary.json").read_text())
    assert s["final_reward"] >= 0.9 and s["restarts"] == {"worker": 1, "trainer": 1}
    assert s["replayed_steps"] >= 1  # the trainer resumed and replayed its lost steps
    _no_process_left(run_dir)

    # Nothing lost: the admission counters balance and every finished group was trained once or
    # is still in the stream.
    async def check() -> None:
        from buffer import RedisTrajectoryBuffer
        from buffer.connection import connect
        from staleness import VersionManager

        client = await connect(redis_url)
        try:
            vm = await VersionManager.from_client(client, run)
            await vm.reap()  # the killed worker's heartbeat has long expired
            snap = await vm.snapshot()
            stats = await RedisTrajectoryBuffer(client, run).stats()
        finally:
            await client.aclose()
        assert snap.admitted == snap.finished + snap.rejected + snap.inflight_total
        assert snap.inflight_total == 0, snap.inflight
        assert snap.rejected_by.get("worker_dead", 0) >= 0
        assert stats.dead_letter == 0
        by_step: dict[int, dict[str, Any]] = {}
        for r in _steps(run_dir):
            by_step[r["step"]] = r
        kept = sum(r["groups"] - r["dropped"] for r in by_step.values())
        # A group pushed by the killed worker whose slot was then reaped counts as rejected
        # (worker_dead), not finished, though it is trained: at most its in-flight groups.
        slack = kept + stats.length - snap.finished
        assert 0 <= slack <= DEMO_DEFAULTS["rollout"]["max_inflight_groups"], (
            kept,
            stats.length,
            snap.finished,
        )

    asyncio.run(check())
