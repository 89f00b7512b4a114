"""Bad inputs: each gets a clear message and loses nothing.

Already covered elsewhere (not repeated here):
- reward functions that raise, hang (timeout) or return NaN:
  tests/integration/test_rollout_worker.py::test_reward_failures_reject_the_group_with_their_reason;
- corrupt payloads decoded one by one (truncated, wrong dtype, ...) and dead-lettered by the
  buffer: tests/integration/test_buffer.py::test_decode_rejects_corrupt_payloads and
  ::test_corrupt_entries_are_dead_lettered_and_consumers_continue (the live-run version is
  tests/faults/test_security.py::test_secured_live_run);
- malformed JSONL lines parsed by the task: tests/unit/rollout_workers/test_rollout_workers_tasks.py::test_jsonl_task (the CLI
  path is here);
- model directory errors at the library level: tests/unit/inference/test_inference_models.py::test_model_dir_errors
  (the CLI path of each command is here).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession, web

from procs import RedisServer, free_port
from sluice.cli import COMMANDS, build_parser

pytestmark = [pytest.mark.faults]
ROOT = Path(__file__).resolve().parents[2]


def sluice(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_REDIS")}
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def config_commands() -> list[str]:
    """Every command whose parser takes ``--config`` (and ``--set``)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    out = []
    for name in COMMANDS:
        opts = {o for a in sub.choices[name]._actions for o in a.option_strings}  # type: ignore[union-attr]
        if "--config" in opts and "--set" in opts:
            out.append(name)
    return out


@pytest.mark.timeout(120)
def test_invalid_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    cmds = config_commands()
    assert {"serve", "rollout", "train"} <= set(cmds)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"trainer": {"lr": -1.0}, "rollout": {"n_samples": 0}}))
    for cmd in cmds:
        argv = [cmd, "--config", str(bad)]
        if cmd == "bench":
            continue
        res = sluice(*argv)
        assert res.returncode == 2, (cmd, res.returncode, res.stderr[-2000:])
        assert "trainer.lr" in res.stderr and "rollout.n_samples" in res.stderr, (cmd, res.stderr)
        assert "Traceback" not in res.stderr, (cmd, res.stderr)
        res = sluice(cmd, "--set", "staleness.eta=-3")
        assert res.returncode == 2 and "staleness.eta" in res.stderr, (cmd, res.stderr)
        assert "Traceback" not in res.stderr
    # Not YAML, a missing file, an unknown section: named too.
    (tmp_path / "notyaml.yaml").write_text("trainer: [unclosed")
    for path, word in ((tmp_path / "notyaml.yaml", "not valid YAML"), (tmp_path / "nope.yaml", "does not exist")):  # fmt: skip
        res = sluice("train", "--config", str(path))
        assert res.returncode == 2 and word in res.stderr and "Traceback" not in res.stderr
    res = sluice("train", "--set", "trainr.lr=1")
    assert res.returncode == 2 and "trainr" in res.stderr
    # sluice status takes a URL, not a config: a bad one is exit 2 as well.
    res = sluice("status", "--redis-url", "http://127.0.0.1:1/0")
    assert res.returncode == 2 and "redis://" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.timeout(60)
def test_rollout_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt_ids": [1, 5, 6], "answer": 7}\n\n{"prompt_ids": [1, "x"]}\n')
    model = tmp_path / "model"
    from faults.harness import make_model

    make_model(model)
    res = sluice(
        "rollout",
        "--set", f"model.path={model}",
        "--set", "task.name=jsonl",
        "--set", f"task.options={{path: {data}, reward: 'math:isfinite', eos_token_id: 2}}",
        "--servers", f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert res.returncode != 0
    assert f"{data}:3" in res.stderr and "token ids" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.timeout(120)
def test_model_dir_missing_files_or_pickles_is_refused_by_every_command(tmp_path: Path) -> None:
    """serve, rollout and train refuse a model dir without config.json, without weights, or
    with only pickled weights (``pytorch_model.bin``: never unpickled), naming what is wrong."""
    from concurrent.futures import ThreadPoolExecutor

    d = tmp_path / "m"
    d.mkdir()
    cmds = [
        ["serve", "--model", str(d), "--port", str(free_port())],
        ["rollout", "--set", f"model.path={d}", "--servers", "http://127.0.0.1:1"],
        ["train", "--set", f"model.path={d}", "--set", "redis.url=redis://127.0.0.1:1/0"],
    ]

    def run_all(word: str, which: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda c: sluice(*c), which))
        for cmd, res in zip(which, results, strict=True):
            assert res.returncode != 0, (cmd, res.stderr)
            assert word in res.stderr, (cmd, word, res.stderr[-2000:])
            assert "Traceback" not in res.stderr, (cmd, res.stderr[-2000:])
        return results

    run_all("no config.json", cmds[1:])
    (d / "config.json").write_text('{"model_type": "llama"}')
    run_all("no *.safetensors", cmds[::2])
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    res = run_all("safetensors", cmds)[0]
    assert "pickled weights (pytorch_model.bin)" in res.stderr


@pytest.mark.timeout(90)
def test_wrong_redis_password_every_command(redis_factory: Any, tmp_path: Path) -> None:
    srv: RedisServer = redis_factory(password="the-right-pw-9")
    wrong = srv.url.replace("the-right-pw-9", "a-wrong-pw-31")
    from faults.harness import make_model

    model = make_model(tmp_path / "model")
    common = ["--set", f"redis.url={wrong}", "--set", f"model.path={model}"]
    for cmd in (
        ["train", *common, "--set", f"run.dir={tmp_path / 'run'}"],
        ["rollout", *common, "--servers", f"http://127.0.0.1:{free_port()}"],
        ["status", "--redis-url", wrong],
        ["run", "set-eta", "3", "--redis-url", wrong, "--run", "x"],
    ):
        res = sluice(*cmd)
        out = res.stdout + res.stderr
        assert res.returncode != 0, cmd
        assert "credentials" in out or "password" in out, (cmd, out[-2000:])
        assert "a-wrong-pw-31" not in out and "the-right-pw-9" not in out, cmd
        assert "Traceback" not in out, (cmd, out[-2000:])


# ------------------------------------------------------------------ inference server faults


class FaultProxy:
    """A real HTTP server in front of a real CPU server: forwards every call, except that the
    next ``/generate`` calls get the scripted answers (``400``, ``500`` or ``hang``)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.script: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.generates = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/generate":
            self.generates += 1
            if self.script:
                what = self.script.pop(0)
                if what == "hang":
                    await asyncio.sleep(3)  # the client gives up after 1 s
                return web.json_response(
                    {"error": {"message": f"injected {what}"}}, status=int(what)
                )
        async with self.session.request(
            request.method, self.upstream + request.path, data=body, headers=request.headers
        ) as r:
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)

    async def __aenter__(self) -> FaultProxy:
        self.session = ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        await self.session.close()


@pytest.mark.timeout(120)
async def test_server_400_500_and_timeout_reject_the_group_and_the_worker_goes_on(
    redis_url: str, run_name: str, tmp_path: Path
) -> None:
    from cpu_server_fixture import make_model as make_llama

    from inference.launch import launch_cpu_server
    from rollout_workers.pool import make_servers
    from sluice.commands.rollout import open_worker
    from sluice.config import load_config
    from staleness import VersionManager

    model = make_llama(tmp_path / "model")
    cfg = load_config(
        None,
        [
            f"redis.url={redis_url}",
            f"run.name={run_name}",
            f"model.path={model}",
            "staleness.eta=100",
            "staleness.batch_groups=4",
            "rollout.n_samples=1",
            "rollout.max_inflight_groups=1",
            "rollout.health_interval_s=0.3",
        ],
    )
    with launch_cpu_server(model, log_path=tmp_path / "srv.log") as srv:
        async with FaultProxy(srv.url) as proxy:
            # 400 (not retried); 500 four times (three retries, then given up); a hang.
            proxy.script = ["400", "500", "500", "500", "500", "hang"]
            servers = make_servers([proxy.url])
            servers[0].client.generate_timeout = 1.0
            worker = await open_worker(cfg, servers, worker_id="w-bad", max_groups=3)
            pushed = await asyncio.wait_for(worker.run(), 90)
    assert pushed == 3  # the worker kept running and pushed its groups after the faults
    assert proxy.script == []
    c = worker.counters
    assert c.rejected_by == {"inference_error": 3}, c.rejected_by
    async with await VersionManager.open(redis_url, run_name) as vm:
        snap = await vm.snapshot()
    assert snap.rejected_by == {"inference_error": 3}
    assert (snap.finished, snap.inflight_total) == (3, 0)
    assert snap.admitted == snap.finished + snap.rejected
    log = tmp_path / "srv.log"
    assert log.exists()
