"""Server launchers: engine choice, start-up failures with the log tail, stopping by pid
(children included), and a real CPU server launched, used through the client and stopped."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from inference import launch
from inference.launch import (
    EngineUnavailable,
    ServerStartError,
    _start,
    choose_engine,
    launch_cpu_server,
    launch_sglang,
    model_vocab_size,
)
from inference.protocol import SamplingParams
from procs import free_port

pytestmark = pytest.mark.timeout(60)


def pid_gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- choose_engine


def test_choose_engine_explicit_cpu_and_bad_name() -> None:
    assert choose_engine("cpu") == "cpu"
    with pytest.raises(ValueError, match="engine must be one of"):
        choose_engine("vllm")


@pytest.mark.parametrize(
    ("sglang", "cuda", "want"),
    [(True, True, "sglang"), (True, False, "cpu"), (False, True, "cpu"), (False, False, "cpu")],
)
def test_choose_engine_auto(
    monkeypatch: pytest.MonkeyPatch, sglang: bool, cuda: bool, want: str
) -> None:
    monkeypatch.setattr(launch, "sglang_installed", lambda: sglang)
    monkeypatch.setattr(launch, "cuda_available", lambda: cuda)
    assert choose_engine("auto") == want
    assert choose_engine() == want


def test_choose_engine_sglang_missing_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "sglang_installed", lambda: False)
    monkeypatch.setattr(launch, "cuda_available", lambda: True)
    with pytest.raises(EngineUnavailable, match=r"pip install 'sluice\[sglang\]'"):
        choose_engine("sglang")
    monkeypatch.setattr(launch, "sglang_installed", lambda: True)
    monkeypatch.setattr(launch, "cuda_available", lambda: False)
    with pytest.raises(EngineUnavailable, match="CUDA"):
        choose_engine("sglang")
    monkeypatch.setattr(launch, "cuda_available", lambda: True)
    assert choose_engine("sglang") == "sglang"


def test_choose_engine_on_this_machine() -> None:
    import importlib.util

    import torch

    real = importlib.util.find_spec("sglang") is not None and torch.cuda.is_available()
    assert choose_engine("auto") == ("sglang" if real else "cpu")


@pytest.mark.skipif(launch.sglang_installed(), reason="SGLang is installed here")
def test_launch_sglang_without_sglang(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match=r"sluice\[sglang\]"):
        launch_sglang(tmp_path)


def test_model_vocab_size(tmp_path: Path) -> None:
    assert model_vocab_size(tmp_path) is None
    (tmp_path / "config.json").write_text('{"vocab_size": 151936}')
    assert model_vocab_size(tmp_path) == 151936
    (tmp_path / "config.json").write_text('{"text_config": {"vocab_size": 7}}')
    assert model_vocab_size(tmp_path) == 7


# ---------------------------------------------------------------- process handling


def _run_script(tmp_path: Path, body: str, timeout: float, **kw: object) -> launch.ServerHandle:
    script = tmp_path / "srv.py"
    script.write_text(textwrap.dedent(body))
    port = free_port()
    return _start(
        [sys.executable, str(script), str(port), str(tmp_path)],
        engine="cpu",
        host="127.0.0.1",
        port=port,
        model_path="fake",
        weight_version=0,
        vocab_size=None,
        admin_api_key=None,
        log_path=tmp_path / "srv.log",
        env=dict(os.environ),
        timeout=timeout,
    )


def test_start_failure_raises_with_log_tail(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match=r"exited with code 3") as ei:
        _run_script(tmp_path, "import sys; print('boom: no GPU found'); sys.exit(3)", 10)
    assert "boom: no GPU found" in str(ei.value)


def test_start_timeout_stops_the_process(tmp_path: Path) -> None:
    body = """
        import os, sys, time
        open(os.path.join(sys.argv[2], "pid"), "w").write(str(os.getpid()))
        print("loading forever", flush=True)
        time.sleep(60)
    """
    with pytest.raises(ServerStartError, match=r"not healthy .* within 1s") as ei:
        _run_script(tmp_path, body, 1)
    assert "loading forever" in str(ei.value)
    assert pid_gone(int((tmp_path / "pid").read_text()))


HEALTHY_WITH_CHILD = """
    import http.server, os, signal, subprocess, sys
    port, d = int(sys.argv[1]), sys.argv[2]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(os.path.join(d, "child"), "w").write(str(child.pid))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a server that ignores SIGTERM

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_stop_escalates_and_takes_children(tmp_path: Path) -> None:
    handle = _run_script(tmp_path, HEALTHY_WITH_CHILD, 20)
    child = int((tmp_path / "child").read_text())
    assert handle.alive() and handle.alive()  # alive() does not reap
    t0 = time.monotonic()
    code = handle.stop(timeout=0.5)
    assert code == -9  # SIGTERM ignored -> SIGKILL
    assert time.monotonic() - t0 < 5
    assert not handle.alive()
    assert pid_gone(handle.pid) and pid_gone(child)
    assert handle.stop() is None  # idempotent


def test_kill_takes_children(tmp_path: Path) -> None:
    handle = _run_script(tmp_path, HEALTHY_WITH_CHILD, 20)
    child = int((tmp_path / "child").read_text())
    assert handle.kill() == -9
    assert pid_gone(child)


# ---------------------------------------------------------------- the real CPU server


def test_launch_cpu_server_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ServerStartError, match="exited with code") as ei:
        launch_cpu_server(missing, log_path=tmp_path / "cpu.log", timeout=60)
    msg = str(ei.value)
    assert "does not exist" in msg and str(missing) in msg  # the server's own words


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference.models import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("tiny"), vocab=64, layers=1, hidden=32)


async def test_launch_cpu_server_serves_and_stops(tiny_model: Path, tmp_path: Path) -> None:
    handle = launch_cpu_server(
        tiny_model, weight_version=3, admin_api_key="k3y", log_path=tmp_path / "cpu.log"
    )
    try:
        assert handle.alive() and handle.vocab_size == 64 and handle.engine == "cpu"
        assert handle.url == f"http://127.0.0.1:{handle.port}"
        async with handle.client() as c:
            assert await c.health()
            res = await c.generate([1, 5, 9], SamplingParams(6, ignore_eos=True))
            assert res.num_tokens == 6 and res.weight_version == 3
            await c.flush_cache()  # admin key from the handle
        assert "k3y" not in (tmp_path / "cpu.log").read_text()  # masked in our log line
    finally:
        code = handle.stop()
    assert code is not None and not handle.alive() and pid_gone(handle.pid)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", handle.port), timeout=1):
        pass


def test_sglang_command_line_is_the_same_for_the_launcher_and_the_demo(tmp_path: Path) -> None:
    """Token ids in and out, an explicit weight version, and the config's engine options, from
    one function for ``launch_sglang`` and ``sluice demo``."""
    from inference.launch import sglang_command
    from sluice.config import load_config
    from sluice.demo import server_spec

    cmd = sglang_command(
        "/m",
        30001,
        mem_fraction=0.3,
        deterministic=True,
        admin_api_key="k",
        extra_args=["--dtype", "bfloat16"],
    )
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    for flag, value in (
        ("--model-path", "/m"),
        ("--port", "30001"),
        ("--weight-version", "0"),
        ("--mem-fraction-static", "0.3"),
        ("--admin-api-key", "k"),
        ("--dtype", "bfloat16"),
    ):
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert "--skip-tokenizer-init" in cmd and "--enable-deterministic-inference" in cmd
    cfg = load_config(
        None,
        [
            "model.path=/m",
            "inference.mem_fraction=0.3",
            "inference.deterministic=true",
            "inference.admin_api_key=k",
            "inference.extra_args=[--dtype, bfloat16]",
        ],
    )
    spec = server_spec(cfg, "sglang", tmp_path / "config.yaml", 30001)
    assert spec.args == cmd


def test_cpu_server_command_line_is_the_same_for_the_launcher_and_the_demo(tmp_path: Path) -> None:
    """The demo's CPU server reads the run config; its line comes from ``cpu_server_command``
    as the launcher's does."""
    from inference.launch import cpu_server_command
    from sluice.config import load_config
    from sluice.demo import server_spec

    cfg = load_config(None, ["model.path=/m", "inference.threads=3"])
    spec = server_spec(cfg, "cpu", tmp_path / "config.yaml", 30001)
    assert spec.args == cpu_server_command(None, 30001, config_path=tmp_path / "config.yaml")
    assert spec.args[4:6] == ["--config", str(tmp_path / "config.yaml")]
    assert spec.env is not None and spec.env["OMP_NUM_THREADS"] == "3"
