"""inference/launch.py: the one command line per engine, and the launchers' use of it (no
process is started: ``_start`` is replaced by a recorder)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from inference import launch
from inference.launch import cpu_server_command, sglang_command


def value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_cpu_server_command_defaults_leave_settings_to_the_server() -> None:
    cmd = cpu_server_command("/m", 30001)
    assert cmd == [
        sys.executable, "-m", "sluice", "serve",
        "--model", "/m", "--host", "127.0.0.1", "--port", "30001",
    ]  # fmt: skip


def test_cpu_server_command_flags_admin_key_and_extra_args() -> None:
    cmd = cpu_server_command(
        Path("/m"),
        30001,
        host="0.0.0.0",
        weight_version=3,
        threads=2,
        admin_api_key="k3y",
        extra_args=["--dtype", "float64"],
    )
    assert cmd[1:4] == ["-m", "sluice", "serve"]
    for flag, want in (
        ("--model", "/m"),
        ("--host", "0.0.0.0"),
        ("--port", "30001"),
        ("--weight-version", "3"),
        ("--threads", "2"),
        ("--admin-api-key", "k3y"),
    ):
        assert value(cmd, flag) == want, flag
    assert cmd[-2:] == ["--dtype", "float64"]  # extra args last: they win over ours
    assert "--config" not in cmd


def test_cpu_server_command_from_a_run_config() -> None:
    cmd = cpu_server_command(None, 30001, config_path="/run/config.yaml")
    assert cmd[4:] == ["--config", "/run/config.yaml", "--host", "127.0.0.1", "--port", "30001"]
    assert "--model" not in cmd and "--admin-api-key" not in cmd
    assert "--admin-api-key" not in cpu_server_command("/m", 1, admin_api_key="")


def test_sglang_command_flags_admin_key_and_extra_args() -> None:
    plain = sglang_command("/m", 30001)
    assert plain[1:3] == ["-m", "sglang.launch_server"]
    assert "--skip-tokenizer-init" in plain and value(plain, "--weight-version") == "0"
    for absent in ("--mem-fraction-static", "--enable-deterministic-inference", "--admin-api-key"):
        assert absent not in plain
    cmd = sglang_command(
        "/m",
        30001,
        host="0.0.0.0",
        weight_version=5,
        tp_size=2,
        mem_fraction=0.3,
        deterministic=True,
        admin_api_key="k",
        extra_args=["--dtype", "bfloat16"],
    )
    for flag, want in (
        ("--model-path", "/m"),
        ("--host", "0.0.0.0"),
        ("--port", "30001"),
        ("--weight-version", "5"),
        ("--tp-size", "2"),
        ("--mem-fraction-static", "0.3"),
        ("--admin-api-key", "k"),
    ):
        assert value(cmd, flag) == want, flag
    assert "--enable-deterministic-inference" in cmd
    assert cmd[-2:] == ["--dtype", "bfloat16"]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the launchers hand to ``_start`` (args, env, ...), instead of starting it."""
    calls: list[dict[str, Any]] = []

    def record(args: list[str], **kw: Any) -> None:
        calls.append({"args": args, **kw})

    monkeypatch.setattr(launch, "_start", record)
    return calls


def test_launch_cpu_server_uses_the_builder(started: list[dict[str, Any]], tmp_path: Path) -> None:
    launch.launch_cpu_server(
        tmp_path,
        30001,
        weight_version=2,
        threads=3,
        admin_api_key="k",
        log_path=tmp_path / "cpu.log",
        extra_args=["--max-batch", "8"],
    )
    (call,) = started
    assert call["args"] == cpu_server_command(
        str(tmp_path),
        30001,
        weight_version=2,
        threads=3,
        admin_api_key="k",
        extra_args=["--max-batch", "8"],
    )
    assert call["env"]["OMP_NUM_THREADS"] == "3" and call["env"]["PYTHONUNBUFFERED"] == "1"
    assert (call["engine"], call["port"], call["admin_api_key"]) == ("cpu", 30001, "k")


def test_launch_sglang_uses_the_builder_on_its_gpus(
    started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(launch, "sglang_installed", lambda: True)
    launch.launch_sglang(tmp_path, 30001, gpu=1, tp_size=2, log_path=tmp_path / "s.log")
    (call,) = started
    assert call["args"] == sglang_command(str(tmp_path), 30001, tp_size=2)
    assert call["env"]["CUDA_VISIBLE_DEVICES"] == "1,2"
    with pytest.raises(ValueError, match="tp_size 2 needs as many GPUs"):
        launch.launch_sglang(tmp_path, 30001, gpu="0", tp_size=2)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"weight_version": True}, "weight_version must be an int >= 0"),
        ({"weight_version": -1}, "weight_version must be an int >= 0"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"threads": 0}, "threads must be >= 1"),
    ],
)
def test_launch_cpu_server_checks_its_arguments(
    started: list[dict[str, Any]], kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        launch.launch_cpu_server("/m", 30001, **kw)
    assert started == []
